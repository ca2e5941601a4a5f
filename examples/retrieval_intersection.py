"""Retrieved passages as separate contexts: one context per passage, and a continuation that is
likely under every one of them (prompt intersection, target ∝ Π_i p(x | passage_i, question)).

    steer index build --docs examples/data/wikipedia_passages.jsonl.gz --out examples/wiki-index
    python examples/retrieval_intersection.py --index examples/wiki-index --question "What is anarchism?"
"""

from _common import parse, report
from prompt_intersection import Intersection

import steer
from retrieval.retriever import Retriever, background_prompt


def retrieval_program(lm: steer.LanguageModel, retriever: Retriever, question: str, k: int = 2,
                      max_tokens: int = 24) -> Intersection:
    prompt = f"Question: {question}\nAnswer:"
    return Intersection(lm, [background_prompt([p], prompt) for p in retriever.passages(question, k)], max_tokens)


if __name__ == "__main__":
    args = parse(__doc__, particles=4, max_tokens=24, k=2, index="examples/wiki-index",
                 question="What does anarchism advocate?")
    lm = steer.load_model(args.model)
    program = retrieval_program(lm, Retriever.load(args.index), args.question, args.k, args.max_tokens)
    report(steer.run(program, args.method, particles=args.particles, seed=args.seed))
