"""The samplers against exact enumeration on a tiny model: posterior and unbiased log_ml."""

import math

import numpy as np
import pytest

import steer
from steer.context import LMContext
from exact import complete_sequences

A, B = 2, 3  # token ids of "a" and "b" in the tiny vocabulary (<eos>=0, <bos>=1)
T = 3


class NoDoubleB(steer.Program):
    """Up to T tokens; a mask forbids "b" right after "b" (locally constrained proposal); at the end the
    text must contain an "a" (hard condition); a twist favours "a" along the way (must not matter)."""

    def __init__(self, lm):
        super().__init__()
        self.ctx = LMContext(lm, "")

    def allowed(self, ctx):
        generated = ctx.generated
        return [t for t in range(ctx.lm.vocab.size) if not (generated and generated[-1] == B and t == B)]

    async def step(self):
        token = await self.sample(self.ctx.next_token(), proposal=self.ctx.next_token(self.allowed))
        self.twist(0.7 if token.id == A else -0.3)
        if token.is_eos or len(self.ctx.generated) >= T:
            self.condition(A in self.ctx.generated)
            self.finish()

    def result(self):
        return tuple(self.ctx.generated)


def exact_target(lm):
    target = {}
    for seq, logp in complete_sequences(lm, lm.encode(""), T).items():
        ok = A in seq and not any(x == B and y == B for x, y in zip(seq, seq[1:]))
        if ok:
            target[seq] = math.exp(logp)
    z = sum(target.values())
    return {k: v / z for k, v in target.items()}, z


@pytest.fixture(scope="module")
def reference(tiny_lm):
    return exact_target(tiny_lm)


SAMPLERS = {
    "smc-multinomial": dict(method="smc", resampling="multinomial", ess_threshold=1.0),
    "smc-systematic": dict(method="smc", resampling="systematic", ess_threshold=0.5),
    "smc-stratified": dict(method="smc", resampling="stratified", ess_threshold=1.0),
    "smc-residual": dict(method="smc", resampling="residual", ess_threshold=1.0),
    "is": dict(method="is"),
    "smc-steer": dict(method="smc-steer", beam=2),
}


def test_reference_is_nontrivial(reference):
    posterior, z = reference
    assert 0.05 < z < 0.95 and len(posterior) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smc-systematic", "smc-multinomial", "is", "smc-steer"])
def test_posterior_matches_enumeration(tiny_lm, reference, name):
    exact, _ = reference
    options = dict(SAMPLERS[name])
    method = options.pop("method")
    estimate: dict = {}
    runs = 3
    for seed in range(runs):
        post = steer.run(NoDoubleB(tiny_lm), method, particles=2000, seed=seed, **options)
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / runs
    assert set(estimate) <= set(exact), "a sample violates the constraint"
    tv = 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in exact.items())
    assert tv < 0.05, f"{name}: total variation {tv:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_marginal_likelihood_is_unbiased(tiny_lm, reference, name):
    _, z = reference
    options = dict(SAMPLERS[name])
    method = options.pop("method")

    def estimate(seed):
        try:
            return math.exp(steer.run(NoDoubleB(tiny_lm), method, particles=8, seed=seed, **options).log_ml)
        except steer.ParticlesDiedError:  # every particle rejected: the estimate of Z is 0
            return 0.0

    estimates = np.array([estimate(s) for s in range(300)])
    se = estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert abs(estimates.mean() - z) < 3 * se + 1e-12, f"{name}: mean {estimates.mean():.4f} vs Z {z:.4f} (se {se:.4f})"
    assert se < 0.1 * z  # the check has power


@pytest.mark.slow
def test_log_ml_has_low_variance_with_many_particles(tiny_lm, reference):
    _, z = reference
    runs = [steer.smc(NoDoubleB(tiny_lm), particles=2000, seed=seed) for seed in range(4)]
    assert abs(np.mean([post.log_ml for post in runs]) - math.log(z)) < 0.05  # one run's sd is about 0.04
    assert all(abs(post.weights.sum() - 1) < 1e-9 for post in runs)
