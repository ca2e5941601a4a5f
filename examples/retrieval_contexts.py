"""Retrieved passages as separate contexts, combined two ways:

- intersection: a continuation likely under every passage, target ∝ Π_i p(x | passage_i, question)
  (prompt intersection);
- mixture: parallel retrieval-augmented generation (RA-DIT), p(x) = Σ_i p_R(i | question)
  p(x | passage_i, question), with p_R the softmax of the retrieval scores.

    steer index build --docs examples/data/wikipedia_passages.jsonl.gz --out examples/wiki-index
    python examples/retrieval_contexts.py --combine mixture --question "What does anarchism advocate?"
"""

import numpy as np
from _common import parse, report
from prompt_intersection import Intersection

import steer
from retrieval.retriever import Retriever, background_prompt


class Mixture(steer.Program):
    def __init__(self, lm, prompts, weights, max_tokens=24):
        super().__init__()
        self.mixture = steer.MixtureContext(lm, prompts, weights)
        self.max_tokens = max_tokens

    async def step(self):
        token = await self.sample(self.mixture.next_token())
        if token.is_eos or len(self.mixture.generated) >= self.max_tokens or "\n" in token.text:
            self.finish()

    def __str__(self):
        return self.mixture.text


def retrieval_program(lm: steer.LanguageModel, retriever: Retriever, question: str, k: int = 2,
                      max_tokens: int = 24, combine: str = "intersection", temperature: float = 0.05):
    hits = retriever.search(question, k)
    prompts = [background_prompt([h.text], f"Question: {question}\nAnswer:") for h in hits]
    if combine == "intersection":
        return Intersection(lm, prompts, max_tokens)
    scores = np.array([h.score for h in hits]) / temperature
    weights = np.exp(scores - scores.max())
    return Mixture(lm, prompts, weights / weights.sum(), max_tokens)


if __name__ == "__main__":
    args = parse(__doc__, particles=4, max_tokens=24, k=2, index="examples/wiki-index",
                 question="What does anarchism advocate?", combine="intersection")
    lm = steer.load_model(args.model)
    program = retrieval_program(lm, Retriever.load(args.index), args.question, args.k, args.max_tokens, args.combine)
    report(steer.run(program, args.method, particles=args.particles, seed=args.seed))
