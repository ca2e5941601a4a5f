"""The mixture context: sequence probabilities equal Σ_c w_c p(y | c) exactly, and SMC samples it."""

import math
from collections import Counter

import numpy as np
import pytest
from exact import complete_sequences

import steer
from steer.errors import SteerError
from steer.mixture import MixtureContext
from steer.scheduler import run_batched
from steer.context import LMContext

PROMPTS, WEIGHTS = ["a", "bb"], [0.3, 0.7]


class Mix(steer.Program):
    def __init__(self, lm, max_tokens=3):
        super().__init__()
        self.mixture = MixtureContext(lm, PROMPTS, WEIGHTS)
        self.max_tokens, self.logp = max_tokens, 0.0

    async def step(self):
        token = await self.sample(self.mixture.next_token())
        if token.is_eos or len(self.mixture.generated) >= self.max_tokens:
            self.finish()

    def __str__(self):
        return str(tuple(self.mixture.generated))


def exact_mixture(lm, max_tokens=3):
    tables = [complete_sequences(lm, LMContext(lm, p, heal=False).tokens, max_tokens) for p in PROMPTS]
    return {seq: math.log(sum(w * math.exp(t[seq]) for w, t in zip(WEIGHTS, tables))) for seq in tables[0]}


def test_sequence_log_probability_is_the_exact_mixture(tiny_lm):
    exact = exact_mixture(tiny_lm)
    for seq, want in list(exact.items())[:12]:
        mixture = MixtureContext(tiny_lm, PROMPTS, WEIGHTS)

        async def score():
            total = 0.0
            for token in seq:
                dist = mixture.next_token()
                total += await dist.log_prob(token)
                dist.commit(token)
            return total

        got = []

        async def record():
            got.append(await score())

        run_batched([record()])
        assert got[0] == pytest.approx(want, abs=1e-5)  # float32 log-probs


@pytest.mark.slow
def test_smc_samples_follow_the_mixture(tiny_lm):
    exact = exact_mixture(tiny_lm)
    post = steer.smc(Mix(tiny_lm), particles=4000, seed=0)
    counts = Counter(str(p) for p in post.particles)
    tv = 0.5 * sum(abs(counts.get(str(s), 0) / 4000 - math.exp(lp)) for s, lp in exact.items())
    assert tv < 0.05
    assert abs(post.log_ml) < 1e-6  # sampling from the target itself: every weight is 1


def test_bad_mixtures_are_refused(tiny_lm):
    with pytest.raises(SteerError, match="at least one prompt"):
        MixtureContext(tiny_lm, [])
    with pytest.raises(SteerError, match="one non-negative weight per prompt"):
        MixtureContext(tiny_lm, ["a"], [0.5, 0.5])
    assert np.allclose(MixtureContext(tiny_lm, ["a", "b"]).weights, [0.5, 0.5])
