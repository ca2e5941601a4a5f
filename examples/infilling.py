"""Infilling between fixed segments (Lew et al. 2023): the model writes the gaps, the segments are
observed, so particles whose gap leads naturally into the next segment gain weight.

    python examples/infilling.py --particles 8
"""

import steer
from _common import parse, report


class Infill(steer.Program):
    """Text = segments[0] gap segments[1] gap ... ; each SMC step writes one gap then observes a segment."""

    def __init__(self, lm, segments, max_gap=12, p_stop=0.25):
        super().__init__()
        self.first = segments[0]
        self.ctx = steer.LMContext(lm, segments[0])
        self.segments = list(segments[1:])
        self.max_gap, self.p_stop = max_gap, p_stop
        self.gap = steer.masks.word_length(max=30, allow_eos=False)

    async def step(self):
        # Gap length: 1 + Geometric(p_stop), truncated; its prior is part of the model.
        n = 1 + min(await self.sample(steer.Geometric(self.p_stop)), self.max_gap - 1)
        goal = self.ctx.written + n  # tokens that write text (a re-write of the healed prompt is not one)
        while self.ctx.written < goal:
            # the target is the model conditioned on the gap not ending the text (as in infilling.steer):
            # observing the mask adds its probability to the weight, then the token is drawn within it
            await self.observe(self.ctx.allowed(self.gap), True)
            await self.sample(self.ctx.next_token())
        segment = self.segments.pop(0)
        await self.observe(self.ctx.continuation(), segment)  # one batched forward, whatever its length
        if not self.segments:
            self.finish()

    def result(self):
        return self.first + self.ctx.text


if __name__ == "__main__":
    args = parse(__doc__, particles=8)
    lm = steer.load_model(args.model)
    segments = ["The Eiffel Tower is", " tall and was built", " 1889."]
    posterior = steer.run(Infill(lm, segments), args.method, particles=args.particles, seed=args.seed)
    report(posterior)
