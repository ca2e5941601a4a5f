"""Token tilts against exact enumeration: the posterior is p(x)·exp(potential) and exp(log_ml) is
unbiased for its normaliser; the word bonus against its plain-text potential."""

import math

import numpy as np
import pytest
import torch

import steer
from exact import complete_sequences
from steer.constraints.canonical import Canonical
from steer.potentials import ScoringModel
from steer.context import LMContext

T = 3


class Tilted(steer.Program):
    def __init__(self, lm, prompt, tilt, mask=None):
        super().__init__()
        self.ctx = LMContext(lm, prompt, heal=False)
        self.tilt, self.mask = tilt, mask

    async def step(self):
        if self.mask is not None:
            await self.observe(self.ctx.allowed(self.mask), True)
        token = await self.sample(self.ctx.next_token(tilt=self.tilt))
        if token.is_eos or len(self.ctx.generated) >= T:
            if not token.is_eos and hasattr(self.tilt, "settle"):
                self.score(self.tilt.settle(self.ctx))  # a cut-off text: only complete words count
            self.finish()

    def result(self):
        return tuple(self.ctx.generated)


def exact(lm, prompt, potential, allowed=lambda text: True):
    ctx = LMContext(lm, prompt, heal=False)
    eos = next(iter(lm.vocab.eos_ids))
    canon = Canonical(lm.vocab, cache=False)
    target = {}
    for seq, logp in complete_sequences(lm, ctx.tokens, T).items():
        body = [t for t in seq if t != eos]
        if not canon.is_canonical([ctx.tokens[-1], *body]):
            continue
        text = lm.decode(body)
        if allowed(text):
            target[seq] = math.exp(logp + potential(text, seq[-1] == eos))
    z = sum(target.values())
    return {k: v / z for k, v in target.items()}, z


def check(lm, prompt, make, potential, mask=None, allowed=lambda text: True):
    posterior, z = exact(lm, prompt, potential, allowed)
    estimate: dict = {}
    for seed in range(3):
        post = steer.smc(Tilted(lm, prompt, make(), mask), particles=1500, seed=seed)
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / 3
    assert set(estimate) <= set(posterior)
    assert 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in posterior.items()) < 0.05
    values = [math.exp(steer.smc(Tilted(lm, prompt, make(), mask), particles=20, seed=100 + s).log_ml)
              for s in range(40)]
    mean, se = np.mean(values), np.std(values, ddof=1) / math.sqrt(len(values))
    assert abs(mean - z) < 3 * se + 1e-9
    return posterior


@pytest.fixture(scope="module")
def bpe_lm():
    return steer.tiny_model("ab ", merges=[(" ", "a"), ("a", "b"), ("b", "b"), (" a", "b")], seed=3,
                            temperature=1.5, max_length=64)


@pytest.mark.slow
def test_token_bonus_is_exact(tiny_lm):
    a = tiny_lm.encode("a", bos=False)[0]
    bonus = torch.zeros(tiny_lm.vocab.size)
    bonus[a] = 1.3
    posterior = check(tiny_lm, "b", lambda: steer.tilts.token_bonus(bonus),
                      lambda text, ended: 1.3 * text.count("a"))
    assert posterior


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_word_bonus_over_multi_token_words_is_exact(bpe_lm, masked):
    """"ab" is a listed word; it is written "a" "b", "ab", " a" "b" or " ab": the bonus for the prefix
    "a" is taken back when the word becomes "abb" or "aa"."""
    words = steer.tilts.prefer_words(["ab"], bonus=1.5)
    mask = steer.masks.max_words(1) if masked else None
    allowed = (lambda text: len(text.split()) <= 1) if masked else (lambda text: True)
    check(bpe_lm, "b ", lambda: steer.tilts.prefer_words(["ab"], bonus=1.5),
          lambda text, ended: words.potential(text, bpe_lm.vocab, ended=True), mask=mask, allowed=allowed)


def test_word_bonus_values_are_the_change_in_the_potential(bpe_lm):
    """Every token's tilt, in several states, equals potential(text + token) - potential(text)."""
    words = steer.tilts.prefer_words(["ab", "ba"], bonus=0.7)
    vocab = bpe_lm.vocab
    for text in ["", "a", "ab", "b", "ab a", "ba b"]:
        ctx = LMContext(bpe_lm, "b", heal=False, allow_special=True)
        ctx.extend(bpe_lm.encode(text, bos=False))
        phi = words.values(ctx)
        for i, s in enumerate(vocab.strings):
            if i in vocab.eos_ids:
                expected = words.potential(text, vocab, ended=True) - words.potential(text, vocab)
            elif vocab.special[i]:
                expected = 0.0
            else:
                expected = words.potential(text + s, vocab) - words.potential(text, vocab)
            assert phi[i].item() == pytest.approx(expected), (text, s)


@pytest.mark.slow
def test_word_bonus_on_gemma_matches_the_potential(gemma):
    words = steer.tilts.prefer_words(["good", "great", "wonderful"], bonus=2.0)
    rng = np.random.default_rng(0)
    sample = rng.choice(np.flatnonzero(~gemma.vocab.special), 3000, replace=False).tolist()
    sample += [gemma.encode(s, bos=False)[0] for s in (" good", " great", "good", " wonder", "ful", ".")]
    for text in ["", " It was", " It was good", " It was wonder", " a gre"]:
        ctx = LMContext(gemma, "Review:", heal=False)
        ctx.extend(gemma.encode(text, bos=False))
        phi = words.values(ctx)
        for i in sample:
            s = gemma.vocab.strings[i]
            expected = words.potential(text + s, gemma.vocab) - words.potential(text, gemma.vocab)
            assert phi[i].item() == pytest.approx(expected), (text, s)


def test_word_bonus_holds_prefixes_on_the_tokenizers_way_only(gemma):
    """" enjoyable" is written " enjoy" "able", so "enjoy" holds the prefix bonus; "amazing" is one
    token, so the article "a" holds none (it cannot become "amazing" in canonical tokens)."""
    words = steer.tilts.prefer_words(["amazing", "enjoyable", "brilliant"], bonus=2.0)
    prefixes = words.prefixes(gemma.vocab)
    assert {"amazing", "enjoyable", "brilliant", "enjoy", "br"} <= prefixes
    assert not {"a", "am", "en", "b", "bri"} & prefixes
    ctx = LMContext(gemma, "The movie was", heal=False)
    phi = words.values(ctx)
    a, amazing, enjoy = (gemma.encode(s, bos=False)[0] for s in (" a", " amazing", " enjoy"))
    assert phi[a].item() == 0.0 and phi[amazing].item() == 2.0 and phi[enjoy].item() == 2.0


# -- one-step look-ahead with a sequence-level reward --------------------------------------------
class CountA(ScoringModel):
    """A stand-in reward model (the real one is exercised in test_lang_examples): r = number of "a"."""

    def __init__(self):
        super().__init__(temperature=0.5, batch_size=64, cache_size=1000)
        self.batches = 0

    def _score_batch(self, pairs):
        self.batches += 1
        return [float(response.count("a")) for _, response in pairs]


class Guided(steer.Program):
    def __init__(self, lm, model, look):
        super().__init__()
        self.ctx = LMContext(lm, "b", heal=False)
        self.model, self.look = model, look

    async def step(self):
        proposal = self.model.look_ahead(self.ctx, "", k=2) if self.look else None
        token = await self.sample(self.ctx.next_token(), proposal=proposal)
        done = token.is_eos or len(self.ctx.generated) >= T
        await self.model.guide(self, "", self.ctx.text, final=done)
        if done:
            self.finish()

    def result(self):
        return tuple(self.ctx.generated)


@pytest.mark.slow
def test_look_ahead_proposal_keeps_the_reward_target_exact(bpe_lm):
    model = CountA()
    posterior, z = exact(bpe_lm, "b", lambda text, ended: text.count("a") / 0.5)
    estimate: dict = {}
    for seed in range(3):
        post = steer.smc(Guided(bpe_lm, model, True), particles=1500, seed=seed)
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / 3
    assert 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in posterior.items()) < 0.05
    values = [math.exp(steer.smc(Guided(bpe_lm, model, True), particles=20, seed=100 + s).log_ml)
              for s in range(40)]
    mean, se = np.mean(values), np.std(values, ddof=1) / math.sqrt(len(values))
    assert abs(mean - z) < 3 * se + 1e-9


def test_look_ahead_scores_every_particles_candidates_in_one_batch(bpe_lm):
    model = CountA()
    steer.smc(Guided(bpe_lm, model, True), particles=16, seed=0)
    assert model.batches <= 2 * T  # per step: the candidates' round, then the guide's round


@pytest.mark.slow
def test_kl_to_base_matches_exact_enumeration(tiny_lm):
    """KL(target || model) from SMC's weights and log_ml equals sum pi log(pi / p) over every sequence."""
    a = tiny_lm.encode("a", bos=False)[0]
    bonus = torch.zeros(tiny_lm.vocab.size)
    bonus[a] = 1.3
    potential = lambda text, ended: 1.3 * text.count("a")  # noqa: E731
    posterior, _ = exact(tiny_lm, "b", potential)
    ctx = LMContext(tiny_lm, "b", heal=False)
    logp = complete_sequences(tiny_lm, ctx.tokens, T)
    expected = sum(pi * (math.log(pi) - logp[seq]) for seq, pi in posterior.items() if pi > 0)
    assert expected > 0.05  # the bonus moves the target
    estimates = []
    for seed in range(3):
        post = steer.smc(Tilted(tiny_lm, "b", steer.tilts.token_bonus(bonus)), particles=2000, seed=seed)
        phi = [potential(p.ctx.text, True) for p in post.particles]
        estimates.append(post.kl_to_base(phi))
    assert np.mean(estimates) == pytest.approx(expected, abs=0.03)
    with pytest.raises(steer.SteerError, match="one log-potential per particle"):
        post.kl_to_base(phi[:-1])
