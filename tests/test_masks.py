"""Token masks agree with a direct string check of every token in the vocabulary."""

import re

import pytest
import torch

import steer
from steer.masks import resolve


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
    ctx = tiny_lm.context("a")
    assert resolve([2], ctx).tolist() == [False, False, True, False]
    assert resolve(lambda c: [3], ctx).tolist() == [False, False, False, True]
    with pytest.raises(steer.SteerError):
        resolve(torch.ones(3, dtype=torch.bool), ctx)
