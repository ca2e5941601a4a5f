"""Token healing: the prompt's last token is backed off and the first generated token must start with its
text; the target is the LM conditioned on the prompt's text, and weights are relative to it."""


import numpy as np
import pytest
import torch

import steer
from steer.constraints.target import base_mask
from steer.context import LMContext
from exact import next_logprobs


class Free(steer.Program):
    def __init__(self, lm, prompt, n, heal=True, constraint=None, **options):
        super().__init__()
        self.ctx = LMContext(lm, prompt, heal=heal, **options)
        self.n, self.constraint = n, constraint

    async def step(self):
        if self.constraint is not None:
            await self.observe(self.ctx.allowed(self.constraint), True)
        await self.sample(self.ctx.next_token())
        if len(self.ctx.generated) >= self.n:
            self.finish()


def test_healing_backs_off_only_prompts_ending_in_space_or_mid_word(tiny_lm):
    assert LMContext(tiny_lm, "ab").healed == "b" and LMContext(tiny_lm, "ab").tokens == tiny_lm.encode("a")
    assert LMContext(tiny_lm, "ab", heal=False).healed == ""
    assert LMContext(tiny_lm, "").healed == ""


def test_the_healed_prompt_costs_nothing_and_the_first_token_reproduces_it(tiny_lm):
    """Single-character tokens: the first token must be "b" again.  The weight is relative to the
    prompt's own text, so a run with nothing excluded has every weight 0 (log_ml = 0)."""
    b = tiny_lm.encode("b", bos=False)[0]
    post = steer.importance_sampling(Free(tiny_lm, "ab", 3, allow_special=True), particles=64, seed=0)
    for p in post.particles:
        assert p.ctx.generated[0] == b and p.ctx.text == tiny_lm.decode(p.ctx.generated[1:])
        assert p.weight == pytest.approx(0.0, abs=1e-6)
    assert post.log_ml == pytest.approx(0.0, abs=1e-6)


def test_healing_weight_is_relative_to_the_tokens_that_reproduce_the_prompt():
    """BPE tokens " ", " a", " ab": after "b " the first token starts with " " and must be canonical
    after "b"; the weight is its mass among the tokens that start with " "."""
    lm = steer.tiny_model("ab ", merges=[(" ", "a"), ("a", "b"), ("b", "b"), (" a", "b")], seed=3)
    ctx = LMContext(lm, "b ")
    assert ctx.healed == " " and ctx.tokens == lm.encode("b")
    logp = next_logprobs(lm, ctx.tokens)
    heal = [i for i, s in enumerate(lm.vocab.strings) if s.startswith(" ")]
    canonical = [i for i in heal if lm.tokenizer.encode("b" + lm.vocab.strings[i], add_special_tokens=False)[1:] == [i]]
    expected = (torch.logsumexp(logp[canonical], 0) - torch.logsumexp(logp[heal], 0)).item()
    post = steer.importance_sampling(Free(lm, "b ", 1), particles=32, seed=0)
    for p in post.particles:
        assert p.ctx.generated[0] in canonical
        assert p.weight == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_healing_on_gemma_reaches_the_natural_token(gemma):
    """After "Call me at " the first token starts with " ", is canonical after " at", starts a match and
    can go on with one: " (" and not a bare " " (which could only be followed by "(", not canonical).
    The weight is that set's probability among the tokens that start with " "."""
    phone = steer.patterns.regex(r"\(\d{3}\) \d{3}-\d{4}")
    ids = gemma.encode("Call me at ")
    assert gemma.vocab.strings[ids[-1]] == " "
    with torch.no_grad():
        logits = gemma.model(torch.tensor([ids[:-1]], device=gemma.device)).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1).cpu()
    strings, special = gemma.vocab.strings, gemma.vocab.special
    ctx = LMContext(gemma, "Call me at ")
    allowed = (steer.masks.resolve(phone, ctx) & base_mask(ctx)).nonzero().flatten().tolist()
    assert ids[-1] not in allowed and gemma.encode(" (", bos=False)[0] in allowed
    heal = [i for i, s in enumerate(strings) if s.startswith(" ") and not special[i]]
    post = steer.importance_sampling(Free(gemma, "Call me at ", 1, constraint=phone), particles=4, seed=0)
    expected = (torch.logsumexp(logp[allowed], 0) - torch.logsumexp(logp[heal], 0)).item()
    for p in post.particles:
        first = p.ctx.generated[0]
        assert strings[first].startswith(" (") and p.ctx.text == strings[first][1:]
        assert gemma.encode("Call me at" + strings[first], bos=False)[-1] == first  # canonical
        assert p.weight == pytest.approx(expected, abs=2e-3)
    assert -8 < post.log_ml < -4  # log P(" (" ... | "Call me at "), not the e^-15 of a lone "("


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["The movie was", "The movie was ", "The mov", 'He said: "'])
def test_unconstrained_weights_are_equal_whatever_the_prompt_ends_with(gemma, prompt):
    post = steer.importance_sampling(Free(gemma, prompt, 6), particles=6, seed=0)
    weights = np.array([p.weight for p in post.particles])
    # Weights differ only by the mass of the non-canonical tokens each particle met: nearly equal
    # (after 'He said: "' one context puts 0.2 of its mass on tokens that would merge).
    assert weights.max() - weights.min() < 0.5 and post.ess / len(weights) > 0.98
    for p in post.particles:
        ids = [i for i in p.ctx.tokens[1:] if i not in gemma.vocab.eos_ids]
        assert gemma.encode(gemma.decode(ids), bos=False) == ids


@pytest.mark.slow
def test_masks_do_not_judge_the_healed_prompt(gemma):
    """A lipogram after "Once upon a time": " time" is backed off and written again, and the mask only
    judges what comes after it (it used to kill every particle)."""
    lipogram = steer.masks.exclude_chars("eE")
    post = steer.smc(Free(gemma, "Once upon a time", 6, constraint=lipogram), particles=4, seed=0)
    for p in post.particles:
        assert gemma.vocab.strings[p.ctx.generated[0]].startswith(" time")
        assert not set(p.ctx.text) & set("eE")


def test_errors_name_the_healed_text(tiny_lm):
    with pytest.raises(steer.ParticlesDiedError, match="token healing: the next token must start with 'b'"):
        steer.smc(Free(tiny_lm, "ab", 2, constraint=[tiny_lm.encode("a", bos=False)[0]]), particles=2, seed=0)


def test_a_token_that_only_rewrites_the_prompt_does_not_count():
    """After the prompt "ab" (a token of its own, backed off by healing) the first token re-writes
    "ab" and adds nothing: `sample next(c)` then draws the token that writes, budgets do not count the
    re-write, and `tokens(c)` leaves it out."""
    from steer_lang import Script

    lm = steer.tiny_model("ab ", seed=3, merges=[("a", "b")])
    ctx = LMContext(lm, "ab", max_tokens=1)
    assert ctx.heal == "ab"
    ctx.extend(lm.encode("ab", bos=False))
    assert ctx.rewrote_prompt and ctx.text == "" and ctx.written == 0 and ctx.tokens_left == 1

    source = ('context c = "ab", max_tokens = 2\n'
              "t = sample next(c)\n"
              "result [text(c), tokens(c)]\n")
    posterior = Script.from_source(source, "t.steer").run(lm, particles=16, seed=0)
    assert np.isfinite(posterior.log_weights).all()
    for particle in posterior.particles:
        written, counted = particle.value
        ctx = particle.env["c"]
        assert ctx.rewrote_prompt, "the tiny BPE's only token starting with 'ab' is 'ab' itself"
        assert counted == 1 and len(ctx.generated) == 2
        assert written == ctx.text and (written != "" or ctx.generated[-1] in lm.vocab.eos_ids)


def test_observing_a_token_that_comes_after_the_rewrite_observes_the_rewrite_first():
    """Two contexts in lockstep (prompt intersection): `sample next(a)` re-writes the healed "ab" and
    draws the token that writes; `observe t from next(b)` then re-writes b's "ab" too, so both hold
    the same text and no particle dies."""
    from steer_lang import Script

    lm = steer.tiny_model("ab ", seed=3, merges=[("a", "b")])
    source = ('context a = "ab"\ncontext b = "ab"\n'
              "repeat 3:\n"
              "    t = sample next(a)\n"
              "    observe t from next(b)\n"
              "    if t == eos:\n"
              "        finish\n"
              "result [text(a), text(b)]\n")
    posterior = Script.from_source(source, "t.steer").run(lm, particles=8, seed=0, method="is")
    assert np.isfinite(posterior.log_weights).all()
    assert all(p.value[0] == p.value[1] for p in posterior.particles)
