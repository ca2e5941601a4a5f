"""Token masks: which next tokens keep a constraint satisfiable, computed vectorised over the vocabulary.

A mask spec is any of: a boolean tensor over the vocabulary, a collection of token ids, a callable
`context -> tensor`, or a `TokenConstraint` (see `base`).  `resolve` turns a spec into a tensor for
one context.  Constraints are built from the per-token properties of `tokens.TokenTable` (cached on disk), so
each mask costs a few vector operations over the 262k-token vocabulary, and masks that depend on the
text so far are cached per state (e.g. per length of the open word).

Words are runs of letters and continue across tokens: " extra" + "ordinary" is one word.  Masks look at
the text generated in the context (the prompt is not part of it).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ..errors import SteerError
from .base import Constraint, Context, all_of, as_constraint
from .maskops import both, either, negate
from .target import constraint_mask, containing_tokens, ending_look_ahead
from .tokens import TokenTable, ascii_bits

_BIG = 1 << 30
_LETTERS = re.compile(r"[^\W\d_]+")
_OPEN_WORD = re.compile(r"[^\W\d_]+\Z")


class TokenConstraint(Constraint):
    """A constraint on the next token that depends on the context's text so far: an exact mask.

    Constraints combine with `&` (both), `|` (either) and `~` (not).
    """

    def mask(self, context: Context) -> torch.Tensor:
        raise NotImplementedError

    stateful = False  # keeps per-context state (a grammar matcher): judges the context itself, not views

    def allowed_in(self, context: Context) -> torch.Tensor:
        """The mask in a real context: generated text only, healing and end strings accounted for."""
        return constraint_mask(self, context)

    def token_check(self, context: Context) -> Callable[[int], bool] | None:
        """With a token budget, a check on a drawn next token that the mask cannot afford to make for
        every token: that the text can still end within the budget after it.  For a mask in general, a
        one-token look-ahead when two tokens are left: the last one must be able to end the text."""
        return ending_look_ahead(self, context)

    def __and__(self, other: Any) -> Constraint:
        if not isinstance(other, TokenConstraint):
            return super().__and__(other)  # a check or a tilt: both apply
        return Combined("and", self, other)

    def __or__(self, other: Any) -> Constraint:
        if not isinstance(other, TokenConstraint):
            return super().__or__(other)
        return Combined("or", self, other)

    def __invert__(self) -> TokenConstraint:
        return Combined("not", self)


class Combined(TokenConstraint):
    """Intersection, union or complement of constraints."""

    def __init__(self, op: str, *parts: TokenConstraint):
        self.op, self.parts = op, parts
        self.stateful = any(part.stateful for part in parts)

    def allowed_in(self, context: Context) -> torch.Tensor:
        if not self.stateful:
            return constraint_mask(self, context)
        masks = [part.allowed_in(context) for part in self.parts]  # a stateful part judges itself
        return _combine(self.op, masks)

    def mask(self, context: Context) -> torch.Tensor:
        masks = [part.mask(context) for part in self.parts]
        return _combine(self.op, masks)

    def token_check(self, context: Context) -> Callable[[int], bool] | None:
        whole = ending_look_ahead(self, context)
        if self.op != "and":  # a budget check of one side says nothing of a union or a complement
            return whole
        return all_of([whole, *(part.token_check(context) for part in self.parts)])

    def __repr__(self) -> str:
        if self.op == "not":
            return f"~{self.parts[0]!r}"
        return f"({self.parts[0]!r} {'&' if self.op == 'and' else '|'} {self.parts[1]!r})"


def _combine(op: str, masks: list[torch.Tensor]) -> torch.Tensor:
    if op == "not":
        return negate(masks[0])
    return both(masks[0], masks[1]) if op == "and" else either(masks[0], masks[1])


class _Cached(TokenConstraint):
    """A constraint whose mask depends on the text only through a small `state`: one mask per state."""

    def __init__(self):
        self._masks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def state(self, context: Context) -> Any:
        return None

    def mask(self, context: Context) -> torch.Tensor:
        by_state = self._masks.setdefault(context.lm.vocab, {})
        key = self.state(context)
        if key not in by_state:
            by_state[key] = torch.from_numpy(np.ascontiguousarray(self._build(TokenTable.of(context.lm.vocab), key)))
        return by_state[key]

    def _build(self, t: TokenTable, state: Any) -> np.ndarray:
        raise NotImplementedError


def _with_eos(ok: np.ndarray, t: TokenTable, allow: bool) -> np.ndarray:
    return (ok & ~t.eos) | (t.eos if allow else False)


def _chars_only(t: TokenTable, chars: str) -> np.ndarray:
    """Text tokens made only of `chars` (vectorised for ASCII; non-ASCII tokens checked one by one)."""
    lo, hi = ascii_bits(chars)
    ok = t.text & ((t.ascii_lo & np.uint64(~lo & (2**64 - 1))) == 0) & ((t.ascii_hi & np.uint64(~hi & (2**64 - 1))) == 0)
    ok &= ((t.ascii_lo | t.ascii_hi) != 0) | t.empty  # (a token that adds no text keeps any charset)
    allowed = set(chars)
    for i in np.flatnonzero(t.nonascii & t.text):
        s = t.vocab.strings[i]
        ok[i] = bool(s) and set(s) <= allowed
    return ok


def _chars_none(t: TokenTable, chars: str) -> np.ndarray:
    """Tokens containing none of `chars`."""
    lo, hi = ascii_bits(chars)
    ok = ((t.ascii_lo & np.uint64(lo)) == 0) & ((t.ascii_hi & np.uint64(hi)) == 0)
    wide = {ch for ch in chars if ord(ch) >= 128}
    if wide:
        for i in np.flatnonzero(t.nonascii):
            ok[i] = ok[i] and not (wide & set(t.vocab.strings[i]))
    return ok


# -- word-level constraints -------------------------------------------------------------------------
class WordLength(_Cached):
    """Every word has between `min` and `max` letters; words continue across tokens.

    `min` is checked when a word ends, so a token that closes a too-short word is excluded.
    """

    def __init__(self, max: int | None = None, min: int = 1, allow_eos: bool = True):
        super().__init__()
        if max is not None and max < min:
            raise SteerError(f"word_length: max ({max}) is below min ({min})")
        self.max, self.min, self.allow_eos = max, min, allow_eos

    def __repr__(self) -> str:
        return f"word_length(max={self.max}, min={self.min})"

    def state(self, context: Context) -> int:
        return open_word_length(context.text)

    def _build(self, t: TokenTable, open_word: int) -> np.ndarray:
        hi = self.max if self.max is not None else _BIG
        first = open_word + t.lead  # the word the token continues (or starts)
        ok = first <= hi
        closes_first = t.breaks & (first > 0)
        ok &= ~closes_first | (first >= self.min)
        ok &= ~t.breaks | ((t.inner == 0) | ((t.inner_min >= self.min) & (t.inner <= hi)))
        ok &= t.trail <= hi
        ok &= t.text
        return _with_eos(ok, t, self.allow_eos and (open_word == 0 or open_word >= self.min))


class Words(_Cached):
    """Every word must (mode "allow") or must not (mode "ban") be one of `words`; case-insensitive.

    A word is judged when it is complete (a non-letter or the end follows), so banning "cat" leaves
    "category" alone, and "ca" may still become "cart" under an allow list.
    """

    def __init__(self, words: Iterable[str], mode: str, allow_eos: bool = True):
        super().__init__()
        self.words = frozenset(w.lower() for w in words)
        if not self.words or not all(w.isalpha() for w in self.words):
            raise SteerError("word lists need at least one word, and words are letters only")
        self.mode, self.allow_eos = mode, allow_eos
        self.prefixes = {w[:k] for w in self.words for k in range(len(w) + 1)}
        self._static: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"{'allowed' if self.mode == 'allow' else 'banned'}_words({sorted(self.words)!r})"

    def state(self, context: Context) -> str:
        text = context.text
        n = open_word_length(text)
        return text[len(text) - n:].lower() if n else ""

    def _ok_word(self, word: str) -> bool:
        return (word in self.words) == (self.mode == "allow")

    def _ok_open(self, word: str) -> bool:
        return self.mode == "ban" or word in self.prefixes

    def _token_static(self, t: TokenTable) -> np.ndarray:
        """Per token: its inner words and its trailing open word are acceptable (state-independent)."""
        if t.vocab not in self._static:
            ok = t.text.copy()
            for i in np.flatnonzero(t.text & t.breaks):
                s = t.vocab.strings[i]
                runs = [(m.start(), m.end()) for m in _LETTERS.finditer(s)]
                for b, e in runs:
                    word = s[b:e].lower()
                    if b == 0:
                        continue  # the leading run joins the open word: judged per state
                    if e == len(s):
                        if not self._ok_open(word):
                            ok[i] = False
                    elif not self._ok_word(word):
                        ok[i] = False
            self._static[t.vocab] = ok
        return self._static[t.vocab]

    def _build(self, t: TokenTable, open_word: str) -> np.ndarray:
        ok = self._token_static(t).copy()
        by_lead, by_letters = lead_maps(t)
        # Words this token completes (letters then a break) or extends (letters only), judged by the
        # word they make with the open word; only a few candidate strings can matter.
        completing = [w[len(open_word):] for w in self.words if w.startswith(open_word) and len(w) > len(open_word)]
        if self.mode == "ban":
            for rest in completing:
                ok[by_lead.get(rest, [])] = False
        else:
            keep_complete = np.zeros(t.vocab.size, dtype=bool)
            for rest in completing:
                keep_complete[by_lead.get(rest, [])] = True
            ok &= ~(t.breaks & (t.lead > 0)) | keep_complete
            keep_open = np.zeros(t.vocab.size, dtype=bool)
            for p in self.prefixes:
                if p.startswith(open_word) and len(p) > len(open_word):
                    keep_open[by_letters.get(p[len(open_word):], [])] = True
            ok &= t.breaks | (t.lead == 0) | keep_open
        if open_word and not self._ok_word(open_word):  # a token starting with a non-letter closes it
            ok &= ~(t.text & (t.lead == 0))
        return _with_eos(ok, t, self.allow_eos and (not open_word or self._ok_word(open_word)))


def lead_maps(t: TokenTable) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Lower-cased leading letters of tokens that break after them; lower-cased letter-only tokens."""
    cache = t.__dict__.get("lead_maps")
    if cache is None:
        by_lead: dict[str, list[int]] = {}
        by_letters: dict[str, list[int]] = {}
        strings = t.vocab.strings
        for i in np.flatnonzero(t.text & (t.lead > 0)):
            key = strings[i][: t.lead[i]].lower()
            (by_lead if t.breaks[i] else by_letters).setdefault(key, []).append(int(i))
        cache = t.__dict__["lead_maps"] = (by_lead, by_letters)
    return cache


class MaxWords(_Cached):
    """At most `n` words; the text may end only once it holds at least `min` (`min=n`: exactly n)."""

    def __init__(self, n: int, allow_eos: bool = True, min: int = 0):
        super().__init__()
        if n < 0 or not 0 <= min <= n:
            raise SteerError(f"max_words needs 0 <= min <= n, got n={n}, min={min}")
        self.n, self.allow_eos, self.min = n, allow_eos, min

    def __repr__(self) -> str:
        return f"max_words({self.n}{f', min={self.min}' if self.min else ''})"

    def state(self, context: Context) -> tuple[int, bool]:
        text = context.text
        return len(_LETTERS.findall(text)), open_word_length(text) > 0

    def _build(self, t: TokenTable, state: tuple[int, bool]) -> np.ndarray:
        count, open_word = state
        new = t.runs - ((t.lead > 0) & open_word).astype(np.int32)
        ok = t.text & (count + new <= self.n)
        return _with_eos(ok, t, self.allow_eos and count >= self.min)


# -- character- and string-level constraints --------------------------------------------------------
class Charset(_Cached):
    """Tokens made only of the given characters (e.g. digits)."""

    def __init__(self, chars: str, allow_eos: bool = False):
        super().__init__()
        if not chars:
            raise SteerError("charset needs at least one character")
        self.chars, self.allow_eos = "".join(sorted(set(chars))), allow_eos

    def _build(self, t: TokenTable, state: None) -> np.ndarray:
        return _with_eos(_chars_only(t, self.chars), t, self.allow_eos)

    def __repr__(self) -> str:
        return f"charset({self.chars!r})"


class ExcludeChars(_Cached):
    """Tokens without any of the given characters (a lipogram: `exclude_chars("eE")`)."""

    def __init__(self, chars: str, allow_eos: bool = True):
        super().__init__()
        if not chars:
            raise SteerError("exclude_chars needs at least one character")
        self.chars, self.allow_eos = "".join(sorted(set(chars))), allow_eos

    def _build(self, t: TokenTable, state: None) -> np.ndarray:
        return _with_eos(t.text & _chars_none(t, self.chars), t, self.allow_eos)

    def __repr__(self) -> str:
        return f"exclude_chars({self.chars!r})"


class OneOf(_Cached):
    """Tokens whose text is exactly one of the given strings."""

    def __init__(self, strings: Iterable[str], allow_eos: bool = False):
        super().__init__()
        self.strings, self.allow_eos = frozenset(strings), allow_eos

    def _build(self, t: TokenTable, state: None) -> np.ndarray:
        ok = np.zeros(t.vocab.size, dtype=bool)
        for s in self.strings:
            ok[t.by_string.get(s, [])] = True
        return _with_eos(ok, t, self.allow_eos)

    def __repr__(self) -> str:
        return f"one_of({sorted(self.strings)!r})"


class EndsWith(_Cached):
    """The text may end (EOS) only once it ends with `suffix`; other tokens are unrestricted."""

    def __init__(self, suffix: str):
        super().__init__()
        if not suffix:
            raise SteerError("must_end_with needs a non-empty suffix")
        self.suffix = suffix

    def state(self, context: Context) -> bool:
        return context.text.endswith(self.suffix)

    def _build(self, t: TokenTable, done: bool) -> np.ndarray:
        return _with_eos(t.text.copy(), t, done)

    def __repr__(self) -> str:
        return f"must_end_with({self.suffix!r})"


class StopAt(_Cached):
    """Generation ends right after any of the stop strings: text may not run past one, and once one
    has appeared only EOS is allowed."""

    def __init__(self, strings: Iterable[str]):
        super().__init__()
        self.strings = tuple(sorted({s for s in strings}))
        if not self.strings or not all(self.strings):
            raise SteerError("stop_at needs non-empty stop strings")

    def state(self, context: Context) -> str:
        text = context.text
        if any(s in text for s in self.strings):
            return "\x00stopped"
        keep = max(len(s) for s in self.strings) - 1
        return text[len(text) - keep:] if keep else ""

    def _build(self, t: TokenTable, tail: str) -> np.ndarray:
        if tail == "\x00stopped":
            return t.eos.copy()
        ok = t.text.copy()
        strings = t.vocab.strings
        for s in self.strings:
            # A token may complete a stop string only at its very end.
            for k in range(len(s)):  # k letters of s already at the end of the text
                if k and not tail.endswith(s[:k]):
                    continue
                for i in t.starting_with(s[k:]) if k else containing_tokens(t, s):
                    text = tail[len(tail) - k:] + strings[i] if k else strings[i]
                    at = text.find(s)
                    if at >= 0 and at + len(s) < len(text):
                        ok[i] = False
        return ok | t.eos

    def __repr__(self) -> str:
        return f"stop_at({list(self.strings)!r})"


class MaxTokens(TokenConstraint):
    """After `n` generated tokens only EOS is allowed."""

    def __init__(self, n: int):
        if n < 0:
            raise SteerError(f"max_tokens needs n >= 0, got {n}")
        self.n = n

    def mask(self, context: Context) -> torch.Tensor:
        t = TokenTable.of(context.lm.vocab)
        return torch.from_numpy(t.eos.copy() if context.written >= self.n else t.text | t.eos)

    def __repr__(self) -> str:
        return f"max_tokens({self.n})"


class EndOfText(_Cached):
    """The end-of-text token(s) only: `~end_of_text()` forbids ending here."""

    def _build(self, t: TokenTable, state: None) -> np.ndarray:
        return t.eos.copy()

    def __repr__(self) -> str:
        return "end_of_text()"


class ContinuesWord(_Cached):
    """Tokens made only of letters: appended to a word, they make it longer."""

    def _build(self, t: TokenTable, state: None) -> np.ndarray:
        return t.text & ~t.breaks & (t.lead > 0)


def open_word_length(text: str) -> int:
    """Letters at the end of `text` (the length of the word still open)."""
    m = _OPEN_WORD.search(text)
    return m.end() - m.start() if m else 0


# -- constructors (the names used in Python and in .steer files) ------------------------------------
def word_length(max: int | None = None, min: int = 1, allow_eos: bool = True) -> WordLength:
    """Every word has at most `max` (and at least `min`) letters."""
    return WordLength(max=max, min=min, allow_eos=allow_eos)


def charset(chars: str, allow_eos: bool = False) -> Charset:
    """Tokens made only of the characters in `chars` (e.g. `charset("0123456789")` for digits)."""
    return Charset(chars, allow_eos=allow_eos)


def exclude_chars(chars: str, allow_eos: bool = True) -> ExcludeChars:
    """Tokens containing none of `chars`: `exclude_chars("eE")` writes a lipogram."""
    return ExcludeChars(chars, allow_eos=allow_eos)


def one_of(strings: Iterable[str], allow_eos: bool = False) -> OneOf:
    """Tokens whose text is exactly one of `strings`."""
    return OneOf(strings, allow_eos=allow_eos)


def banned_words(words: Iterable[str]) -> Words:
    """No complete word is one of `words` (case-insensitive)."""
    return Words(words, "ban")


def allowed_words(words: Iterable[str]) -> Words:
    """Every complete word is one of `words` (case-insensitive)."""
    return Words(words, "allow")


def max_words(n: int, allow_eos: bool = True, min: int = 0) -> MaxWords:
    """At most `n` words in the generated text, and at least `min` before it may end (`min=n`: exactly
    n words)."""
    return MaxWords(n, allow_eos=allow_eos, min=min)


def must_end_with(suffix: str) -> EndsWith:
    """The text may only end once it ends with `suffix`."""
    return EndsWith(suffix)


def stop_at(strings: Iterable[str]) -> StopAt:
    """The text ends right after the first of `strings` to appear."""
    return StopAt(strings)


def max_tokens(n: int) -> MaxTokens:
    """Only EOS after `n` generated tokens."""
    return MaxTokens(n)


def end_of_text() -> EndOfText:
    """The end-of-text token; `~end_of_text()` forbids ending."""
    return EndOfText()


def continues_word() -> ContinuesWord:
    """Tokens that continue an open word (letters only, no leading space)."""
    return ContinuesWord()


def resolve(spec: Any, context: Context) -> torch.Tensor | None:
    """The boolean mask over the vocabulary that `spec` (anything `as_constraint` takes) stands for in
    `context` (None: no restriction)."""
    constraint = as_constraint(spec)
    if constraint is None:
        return None
    if not constraint.exact:
        raise SteerError(f"{constraint!r} is checked token by token, not a mask: observe "
                         "`ctx.allowed(check)` as True, then sample `ctx.next_token()`")
    return constraint.allowed_in(context)
