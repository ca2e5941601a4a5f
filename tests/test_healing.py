"""Token healing: the prompt's last token is backed off and the continuation must reproduce its text;
the weight gains the probability of that (the target is the LM conditioned on the prompt's text)."""

import math

import pytest
import torch

import steer
from exact import next_logprobs


class Free(steer.Program):
    def __init__(self, lm, prompt, n, heal=True, constraint=None):
        super().__init__()
        self.ctx = lm.context(prompt, heal=heal)
        self.n, self.constraint = n, constraint

    async def step(self):
        if self.constraint is not None:
            await self.observe(self.ctx.allowed(self.constraint), True)
        await self.sample(self.ctx.next_token())
        if len(self.ctx.generated) >= self.n:
            self.finish()


def test_healing_backs_off_only_prompts_ending_in_space_or_mid_word(tiny_lm):
    assert tiny_lm.context("ab").healed == "b" and tiny_lm.context("ab").tokens == tiny_lm.encode("a")
    assert tiny_lm.context("ab", heal=False).healed == ""
    assert tiny_lm.context("").healed == ""


def test_healed_weights_are_the_probability_of_the_backed_off_text(tiny_lm):
    """Single-character tokens: the first token must be "b" again, so every IS weight is log p(b | a)
    and the visible continuations are distributed as without healing."""
    b = tiny_lm.encode("b", bos=False)[0]
    expected = next_logprobs(tiny_lm, tiny_lm.encode("a"))[b].item()
    post = steer.importance_sampling(Free(tiny_lm, "ab", 3), particles=64, seed=0)
    for p in post.particles:
        assert p.ctx.generated[0] == b and p.ctx.text == tiny_lm.decode(p.ctx.generated[1:])
        assert p.weight == pytest.approx(expected, abs=1e-5)
    assert post.log_ml == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_healing_on_gemma_reaches_the_natural_token(gemma):
    """After "Call me at " the first token is drawn from those that start with " " and go on with the
    start of a match (e.g. " ("); the IS weight is their total probability after "Call me at"."""
    phone = steer.patterns.regex(r"\(\d{3}\) \d{3}-\d{4}")
    ids = gemma.encode("Call me at ")
    assert gemma.vocab.strings[ids[-1]] == " "
    with torch.no_grad():
        logp = torch.log_softmax(gemma.model(torch.tensor([ids[:-1]])).logits[0, -1].float(), -1)
    strings = gemma.vocab.strings
    allowed = [i for i, s in enumerate(strings) if s.startswith(" ") and phone.automaton.live[
        phone.automaton.walk(phone.automaton.initial, s[1:])] and not gemma.vocab.special[i]]
    post = steer.importance_sampling(Free(gemma, "Call me at ", 1, constraint=phone), particles=4, seed=0)
    expected = torch.logsumexp(logp[allowed], 0).item()  # P(first token is " " + a start of a match)
    for p in post.particles:
        first = strings[p.ctx.generated[0]]
        assert first.startswith(" ") and p.ctx.text == first[1:] and phone.automaton.live[
            phone.automaton.walk(phone.automaton.initial, p.ctx.text)]
        assert p.weight == pytest.approx(expected, abs=2e-3)
    assert math.isfinite(post.log_ml)
