"""The HTML trace page shows every step, every particle and every resampling event."""

import html

import steer
from steer.report import render_html
from steer.context import LMContext


class Angle(steer.Program):
    def __init__(self, lm):
        super().__init__()
        self.ctx = LMContext(lm, "a")

    async def step(self):
        token = await self.sample(self.ctx.next_token())
        self.score(1.0 if token.id == 2 else 0.0)
        if len(self.ctx.generated) >= 4:
            self.finish()

    def __str__(self):
        return "<" + self.ctx.text + ">"  # needs escaping


def test_page_has_each_step_particle_and_resampling(tiny_lm):
    post = steer.smc(Angle(tiny_lm), particles=5, seed=3, ess_threshold=1.0, record_particles=True)
    page = render_html(post, title="t & t")
    assert page.count("<details>") == len(post.trace) == 4
    assert page.count("class='rs'>resampled") == sum(r.resampled for r in post.trace) > 0
    for record in post.trace:
        for text in record.particles:
            assert f"<td class='text'>{html.escape(text)}</td>" in page
    assert "t &amp; t" in page and page.count("<svg") == 3
