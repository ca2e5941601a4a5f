"""Every mask agrees with a slow reference that decodes each token and checks the predicate on the
text it would make: on Gemma's tokenizer, 5,000 random tokens (plus the tokens that matter most) in
many states."""

import re

import numpy as np
import pytest

import steer
from steer.constraints.canonical import Canonical
from steer.constraints.masks import resolve
from steer.context import LMContext

pytestmark = pytest.mark.slow
LETTERS = re.compile(r"[^\W\d_]+")


def complete_words(text):
    """Words followed by a non-letter (the last run is still open if it touches the end)."""
    return [m.group() for m in LETTERS.finditer(text) if m.end() < len(text)]


def open_run(text):
    m = re.search(r"[^\W\d_]+\Z", text)
    return m.group() if m else ""


def new_words(text, token):
    before = complete_words(text)
    return [w.lower() for w in complete_words(text + token)[len(before):]]


BANNED = {"cat", "the", "dog"}
ALLOWED = {"the", "cat", "sat", "on", "mat", "a", "category"}
STOPS = ["\n\n", "END."]


def reference(name, text, s):
    """Whether the non-EOS token with text `s` may follow `text`."""
    if name == "word_length":
        runs = LETTERS.findall(text + s)
        first_new = len(LETTERS.findall(text)) - (1 if open_run(text) else 0)
        return all(len(w) <= 5 for w in runs[first_new:]) and all(len(w) >= 2 for w in new_words(text, s))
    if name == "charset":
        return bool(s) and set(s) <= set("0123456789-")
    if name == "exclude_chars":
        return not set(s) & set("eE")
    if name == "banned_words":
        return not any(w in BANNED for w in new_words(text, s))
    if name == "allowed_words":
        full = text + s
        tail = open_run(full).lower()
        return all(w in ALLOWED for w in new_words(text, s)) and any(a.startswith(tail) for a in ALLOWED)
    if name == "max_words":
        return len(LETTERS.findall(text + s)) <= 4
    if name == "stop_at":
        full = text + s
        if any(x in text for x in STOPS):
            return False
        return all(full.find(x) < 0 or full.find(x) + len(x) == len(full) for x in STOPS)
    raise AssertionError(name)


def reference_eos(name, text):
    if name == "word_length":
        return not open_run(text) or len(open_run(text)) >= 2
    if name == "charset":
        return False
    if name == "allowed_words":
        return not open_run(text) or open_run(text).lower() in ALLOWED
    if name == "banned_words":
        return open_run(text).lower() not in BANNED
    return True


MASKS = {
    "word_length": steer.masks.word_length(max=5, min=2),
    "charset": steer.masks.charset("0123456789-"),
    "exclude_chars": steer.masks.exclude_chars("eE"),
    "banned_words": steer.masks.banned_words(BANNED),
    "allowed_words": steer.masks.allowed_words(ALLOWED),
    "max_words": steer.masks.max_words(4),
    "stop_at": steer.masks.stop_at(STOPS),
}
STATES = ["", "The", "The ca", "the cat sat", "Hello, wor", "It is 2024-0", "one two three", "x END", "a\n",
          "Ca", "The dog"]


@pytest.mark.parametrize("name", list(MASKS))
def test_mask_matches_reference(gemma, name):
    vocab = gemma.vocab
    rng = np.random.default_rng(0)
    text_ids = np.flatnonzero(~vocab.special)
    sample = set(rng.choice(text_ids, 5000, replace=False).tolist())
    # The tokens that matter most for these masks, so each branch is exercised.
    for s in (" cat", "cat", "t", "t ", "egory", " dog.", "d", "\n\n", ".", "END", " END.", ".\n\n", "1", "-",
              " the", "he", " a", "sat", " mat", "mat", "ld", "ld,", "at", "2", "5-"):
        sample.update(gemma.encode(s, bos=False)[-1:])
    for text in STATES:
        ctx = LMContext(gemma, "Prompt:")
        ctx.extend(gemma.encode(text, bos=False)) if text else None
        assert ctx.text == text
        mask = resolve(MASKS[name], ctx)
        for i in sorted(sample):
            expected = reference(name, text, vocab.strings[i])
            assert bool(mask[i]) == expected, (name, text, vocab.strings[i])
        eos = next(iter(vocab.eos_ids))
        assert bool(mask[eos]) == reference_eos(name, text), (name, text, "<eos>")


@pytest.mark.parametrize("kind", ["llguidance", "automaton"])
@pytest.mark.parametrize("pattern,states", [
    (r" ?\(\d{3}\) \d{3}-\d{4}", ["", " ", " (", "(55", "(555) ", "(555) 123-456", "(555) 123-4567", "x"]),
    (r"[a-z]+( [a-z]+)*\.", ["", "the", "the cat ", "the cat.", "The"]),
])
def test_regex_mask_matches_partial_matching(gemma, pattern, states, kind):
    """The regex mask agrees with the `regex` module's partial matching of text + token.  The token
    automaton's classes such as \\d are ASCII (as with re.ASCII); llguidance's are Unicode, it judges
    byte-fallback pieces of characters by their bytes, and where the pattern forces text it allows only
    the tokens that write the most of it (never a canonical tokenization)."""
    import regex

    constraint = steer.patterns.regex(pattern) if kind == "llguidance" else steer.patterns.automaton(pattern)
    flags = 0 if kind == "llguidance" else regex.ASCII
    vocab = gemma.vocab
    rng = np.random.default_rng(1)
    sample = set(rng.choice(np.flatnonzero(~vocab.special), 5000, replace=False).tolist())
    for s in ("(", " (", "5", "55", ")", " ", "-", "the", " cat", ".", " the", "x"):
        sample.update(gemma.encode(s, bos=False)[-1:])
    eos = next(iter(vocab.eos_ids))
    canon = Canonical.of(vocab)
    for text in states:
        ctx = LMContext(gemma, "Prompt:", heal=False, canonical=False)  # the constraint alone
        if text:
            ctx.extend(gemma.encode(text, bos=False))
        assert ctx.text == text
        mask = resolve(constraint, ctx)
        # With canonical tokenization the look-ahead only removes tokens, never adds one.
        looked = resolve(constraint, LMContext(gemma, "Prompt:", heal=False)) if not text else None
        if looked is not None:  # (the automaton's mask holds the canonical pairs; llguidance's meets them later)
            bound = mask if kind == "llguidance" else mask & canon.after(ctx.tokens[-1])
            assert not (looked & ~bound).any()
        allowed = [vocab.strings[i] for i in np.flatnonzero(mask.numpy())]
        for i in sorted(sample):
            s = vocab.strings[i]
            if kind == "llguidance" and "\ufffd" in s:
                continue
            expected = "\ufffd" not in s and regex.fullmatch(pattern, text + s, partial=True, flags=flags) is not None
            if kind == "llguidance" and expected and not mask[i]:  # left out for a longer forced token
                assert any(a.startswith(s) and a != s for a in allowed), (pattern, text, s)
                continue
            assert bool(mask[i]) == expected, (pattern, text, s)
        assert bool(mask[eos]) == (regex.fullmatch(pattern, text, flags=flags) is not None), (pattern, text)