"""Token masks agree with a direct string check of every token in the vocabulary."""

import re

import pytest
import torch

import steer
from steer.constraints.masks import resolve
from steer.context import LMContext


def direct_word_length_ok(open_word: int, token: str, lo: int, hi: int) -> bool:
    s = "x" * open_word + token
    runs = [(m.start(), m.end()) for m in re.finditer(r"[^\W\d_]+", s)]
    for a, b in runs:
        closed = b < len(s)
        if b - a > hi or (closed and b - a < lo):
            return False
    return True


class FakeContext:
    def __init__(self, lm, text):
        self.lm, self.text = lm, text
        self.heal, self.end, self.ended = "", (), False


def check_vocabulary(lm, lo, hi, texts):
    constraint = steer.masks.word_length(max=hi, min=lo)
    vocab = lm.vocab
    for text in texts:
        mask = resolve(constraint, FakeContext(lm, text)).tolist()
        open_word = len(re.search(r"[^\W\d_]*$", text).group())
        for i, s in enumerate(vocab.strings):
            if i in vocab.eos_ids:
                expected = open_word == 0 or open_word >= lo
            elif vocab.special[i] or not s:
                expected = False
            else:
                expected = direct_word_length_ok(open_word, s, lo, hi)
            assert mask[i] == expected, (text, i, s)


def test_word_length_on_tiny_vocabulary():
    lm = steer.tiny_model("ab .")
    check_vocabulary(lm, 2, 3, ["", "a", "ab", "abb", "ab "])


@pytest.mark.slow
def test_word_length_on_gemma_vocabulary(gemma):
    check_vocabulary(gemma, 1, 5, ["The", "a cat", "it is", "hello", "one "])


def test_mask_specs(tiny_lm):
    ctx = LMContext(tiny_lm, "a")
    assert resolve([2], ctx).tolist() == [False, False, True, False]
    assert resolve(lambda c: [3], ctx).tolist() == [False, False, False, True]
    with pytest.raises(steer.SteerError):
        resolve(torch.ones(3, dtype=torch.bool), ctx)


@pytest.mark.slow
def test_charset_one_of_and_combinations_match_a_direct_check(gemma):
    ctx = LMContext(gemma, "The year was", heal=False)  # masks judge whole tokens (no healed prompt)
    strings, special = gemma.vocab.strings, gemma.vocab.special
    digits = steer.masks.charset("0123456789")
    yes_no = steer.masks.one_of([" yes", " no"], allow_eos=True)
    short = steer.masks.word_length(max=3)
    eos = next(iter(gemma.vocab.eos_ids))
    m = resolve(digits, ctx)
    expected = torch.tensor([bool(s) and not special[i] and set(s) <= set("0123456789") for i, s in enumerate(strings)])
    assert torch.equal(m, expected) and 10 <= int(m.sum()) < 100
    m = resolve(yes_no, ctx)
    assert sorted(strings[i] for i in m.nonzero().flatten().tolist() if i != eos) == [" no", " yes"] and m[eos]
    both = resolve(short & ~digits, ctx)
    assert torch.equal(both, resolve(short, ctx) & ~resolve(digits, ctx))
    assert torch.equal(resolve(digits | yes_no, ctx), resolve(digits, ctx) | resolve(yes_no, ctx))


def test_observing_two_restrictions_gives_the_joint_probability(tiny_lm):
    """P(next in A) * P(next in B | next in A) = P(next in A and B): the second observation is conditional."""
    import math

    from exact import next_logprobs
    from steer.scheduler import run_batched

    ctx = LMContext(tiny_lm, "ab", heal=False, allow_special=True)
    a, b = [0, 2, 3], [1, 2]  # overlap: token 2 only
    p = next_logprobs(tiny_lm, ctx.tokens).exp()
    found = []

    class Two(steer.Program):
        async def step(self):
            found.append(await self.observe(ctx.allowed(a), True))
            found.append(await self.observe(ctx.allowed(b), True))
            self.finish()

    run_batched([Two()._advance()])
    assert math.exp(found[0]) == pytest.approx(p[a].sum().item(), rel=1e-5)
    assert math.exp(sum(found)) == pytest.approx(p[2].item(), rel=1e-5)
    assert ctx.mask.tolist() == [False, False, True, False]


def test_max_tokens_counts_written_tokens_through_healing_and_end_strings():
    """`max_tokens(n)` is judged on a view of the context while healing is pending or an end string
    can be written: the view carries the count of written tokens."""
    lm = steer.tiny_model("ab ", seed=3)
    healed = LMContext(lm, "a")
    assert healed.heal == "a"
    assert steer.masks.max_tokens(2).allowed_in(healed)[lm.encode("a", bos=False)[0]]
    ending = LMContext(lm, "a ", end="b", heal=False)
    ending.extend(lm.encode("aa", bos=False))
    mask = steer.masks.max_tokens(2).allowed_in(ending)
    ends = sorted([*lm.vocab.eos_ids, *lm.encode("b", bos=False)])  # the end string ends the text too
    assert mask.nonzero().flatten().tolist() == ends
