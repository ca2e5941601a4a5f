"""Every word at most five letters (Lew et al. 2023, section 4): a locally constrained proposal.

    python examples/short_words.py --particles 8 --max-tokens 24
"""

import steer
from _common import parse, report


class ShortWords(steer.Program):
    """Continue the prompt using only words of at most `max_letters` letters."""

    def __init__(self, lm, prompt, max_tokens=24, max_letters=5):
        super().__init__()
        self.ctx = steer.LMContext(lm, prompt)
        self.max_tokens = max_tokens
        self.short = steer.masks.word_length(max=max_letters)

    async def step(self):
        # Observing "the next token keeps every word short" adds log P(allowed) to the weight and
        # restricts the sample that follows to the allowed tokens.
        await self.observe(self.ctx.allowed(self.short), True)
        token = await self.sample(self.ctx.next_token())
        if token.is_eos or len(self.ctx.generated) >= self.max_tokens or "\n" in token.text:
            self.finish()


if __name__ == "__main__":
    args = parse(__doc__, max_tokens=24, prompt="The best way to spend a rainy afternoon is")
    lm = steer.load_model(args.model)
    posterior = steer.run(ShortWords(lm, args.prompt, args.max_tokens), args.method,
                          particles=args.particles, seed=args.seed)
    report(posterior)
