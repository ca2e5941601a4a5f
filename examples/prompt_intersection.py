"""Prompt intersection (Lew et al. 2023): one continuation that is likely after two different prompts.
The target is proportional to p(x | prompt 1) * p(x | prompt 2).

    python examples/prompt_intersection.py --particles 8
"""

import steer
from _common import parse, report


class Intersection(steer.Program):
    def __init__(self, lm, prompts, max_tokens=12):
        super().__init__()
        self.contexts = [steer.LMContext(lm, p) for p in prompts]
        self.max_tokens = max_tokens

    async def step(self):
        first, *others = self.contexts
        token = await self.sample(first.next_token())
        for ctx in others:  # all contexts are served by the same batched forward pass
            await self.observe(ctx.next_token(), token)
        if token.is_eos or len(first.generated) >= self.max_tokens or "." in token.text:
            self.finish()

    def __str__(self):
        return self.contexts[0].text


if __name__ == "__main__":
    args = parse(__doc__, particles=8, max_tokens=12)
    lm = steer.load_model(args.model)
    prompts = ["My favorite physicist is probably", "My favorite writer is probably"]
    posterior = steer.run(Intersection(lm, prompts, args.max_tokens), args.method,
                          particles=args.particles, seed=args.seed)
    report(posterior)
