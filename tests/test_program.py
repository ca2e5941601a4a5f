"""The Python DSL: weight updates, twists, sub-programs, the functional form, distributions, errors."""

import math

import numpy as np
import pytest

import steer
from exact import next_logprobs
from steer.scheduler import run_batched
from steer.context import LMContext


def run_step(program):
    run_batched([program._advance()])
    return program


class Weights(steer.Program):
    def __init__(self, lm):
        super().__init__()
        self.ctx = LMContext(lm, "a", heal=False)
        self.log = {}

    async def step(self):
        token = await self.sample(self.ctx.next_token(), proposal=self.ctx.next_token([2]))
        self.log["token"] = token.id
        self.log["observe"] = await self.observe(steer.Bernoulli(0.25), True)
        self.score(-1.0)
        self.finish()


def test_sample_with_proposal_and_observe_update_the_weight(tiny_lm):
    p = run_step(Weights(tiny_lm))
    lp = next_logprobs(tiny_lm, tiny_lm.encode("a"))
    # proposal puts all mass on token 2: weight = log p(2) - log 1, then log 0.25, then -1
    assert p.log["token"] == 2
    assert p.weight == pytest.approx(lp[2].item() + math.log(0.25) - 1.0, abs=1e-5)
    assert p.ctx.tokens[-1] == 2 and p.finished


def test_allowed_observation_adds_mask_mass_and_restricts_next_token(tiny_lm):
    class Masked(steer.Program):
        def __init__(self):
            super().__init__()
            self.ctx = LMContext(tiny_lm, "b", heal=False)

        async def step(self):
            await self.observe(self.ctx.allowed([2, 3]), True)
            self.token = await self.sample(self.ctx.next_token())
            self.finish()

    lp = next_logprobs(tiny_lm, tiny_lm.encode("b")).exp()
    seen = set()
    for seed in range(20):
        steer.randomness.seed(seed)
        p = run_step(Masked())
        seen.add(p.token.id)
        assert p.weight == pytest.approx(math.log(lp[2] + lp[3]), abs=1e-5)
    assert seen == {2, 3}


def test_twist_is_taken_back_at_the_next_step_and_at_the_end():
    class Twisted(steer.Program):
        def __init__(self):
            super().__init__()
            self.t = 0
            self.seen = []

        async def step(self):
            self.seen.append(self.weight)
            self.t += 1
            self.twist(5.0 * self.t)
            self.score(1.0)
            if self.t == 3:
                self.finish()

    p = Twisted()
    for _ in range(3):
        run_step(p)
    assert p.seen == [0.0, 1.0, 2.0]  # previous twist removed before each step
    assert p.weight == 3.0  # final twist removed when finished


def test_condition_kills_and_all_dead_population_is_a_clear_error():
    class Impossible(steer.Program):
        async def step(self):
            self.condition(False, "no way")
            self.finish()

    with pytest.raises(steer.ParticlesDiedError, match="step 1.*no way"):
        steer.smc(Impossible(), particles=4, seed=0)


def test_a_zero_probability_observation_names_the_text_it_died_after(tiny_lm):
    """The reason a particle died is spelled out only when it dies, and then from the state it died in."""
    class Masked(steer.Program):
        def __init__(self):
            super().__init__()
            self.ctx = LMContext(tiny_lm, "ab", heal=False)

        async def step(self):
            await self.sample(self.ctx.next_token())
            await self.observe(self.ctx.next_token([2]), 3)
            self.finish()

    particle = run_step(Masked())
    assert particle.weight == -math.inf and particle.finished
    assert particle.death_reason.startswith("no next token after ")
    assert particle.death_reason == particle.ctx.next_token([2]).zero_reason  # spelled from the state it died in


class Coin(steer.SubProgram):
    def __init__(self, p):
        self.p = p

    async def run(self):
        return await self.sample(steer.Bernoulli(self.p))


def test_sub_programs_act_on_the_calling_particle():
    class TwoCoins(steer.Program):
        async def step(self):
            a = await self.call(Coin(0.5))
            b = await self.call(Coin(0.5))
            self.condition(a or b)
            self.value = (a, b)
            self.finish()

        def result(self):
            return self.value

    post = steer.smc(TwoCoins(), particles=4000, seed=1)
    dist = post.distribution()
    assert (False, False) not in dist
    for k in [(True, True), (True, False), (False, True)]:
        assert abs(dist[k] - 1 / 3) < 0.03
    assert post.log_ml == pytest.approx(math.log(0.75), abs=0.03)


def test_function_form_is_a_program(tiny_lm):
    @steer.program
    async def letters(p, ctx, n=2):
        await p.sample(ctx.next_token([2, 3]))
        if len(ctx.generated) >= n:
            p.finish()

    post = steer.smc(letters(ctx=LMContext(tiny_lm, "a", heal=False), n=3), particles=8, seed=0)
    assert all(set(p.state["ctx"].generated) <= {2, 3} and len(p.state["ctx"].generated) == 3 for p in post.particles)
    assert len({id(p.state["ctx"]) for p in post.particles}) == 8  # each particle owns its context


@pytest.mark.parametrize("dist,values", [
    (steer.Categorical(["x", "y", "z"], probs=[0.2, 0.3, 0.5]), ["x", "y", "z"]),
    (steer.Bernoulli(0.3), [True, False]),
    (steer.Geometric(0.4), list(range(60))),
])
def test_distributions_sample_their_own_log_prob(dist, values):
    async def log_prob(v):
        return await dist.log_prob(v)

    async def sample():
        return await dist.sample()

    probs = {}
    for v in values:
        coro = log_prob(v)
        try:
            coro.send(None)
        except StopIteration as stop:
            probs[v] = math.exp(stop.value)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    steer.randomness.seed(0)
    draws = []
    for _ in range(4000):
        coro = sample()
        try:
            coro.send(None)
        except StopIteration as stop:
            value, lp = stop.value
            assert lp == pytest.approx(math.log(probs[value]))
            draws.append(value)
    for v in values[:3]:
        assert abs(draws.count(v) / len(draws) - probs[v]) < 0.03


def test_bad_arguments_are_clear_errors(tiny_lm):
    with pytest.raises(steer.SteerError, match="at least 1"):
        steer.smc(Weights(tiny_lm), particles=0)
    with pytest.raises(steer.SteerError, match="Bernoulli"):
        steer.Bernoulli(1.5)
    with pytest.raises(steer.SteerError, match="unknown method"):
        steer.run(Weights(tiny_lm), "mcmc")
    with pytest.raises(steer.SteerError, match="context holds"):
        LMContext(tiny_lm, "a" * 300)


def test_trace_records_every_step(tiny_lm):
    post = steer.smc(steer.Generate(tiny_lm, "a", max_tokens=5), particles=6, seed=0,
                     ess_threshold=1.0, record_particles=True)
    assert 1 <= len(post.trace) <= 5
    for record in post.trace:
        assert len(record.log_weights) == 6 and len(record.particles) == 6
        assert 0 < record.ess <= 6 + 1e-9
    assert post.trace[-1].log_ml == pytest.approx(post.log_ml)
    assert np.isclose(post.weights.sum(), 1.0)


def test_same_seed_same_run(tiny_lm):
    def texts(seed):
        post = steer.smc(steer.Generate(tiny_lm, "a", max_tokens=6), particles=6, seed=seed)
        return [p.result() for p in post.particles], post.log_ml

    assert texts(5) == texts(5)
    assert texts(5) != texts(6)
