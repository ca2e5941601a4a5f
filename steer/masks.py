"""Token masks: which next tokens keep a constraint satisfiable, computed vectorised over the vocabulary.

A mask spec is any of: a boolean tensor over the vocabulary, a collection of token ids, a callable
`context -> tensor`, or a `TokenConstraint`.  `resolve` turns a spec into a tensor for one context.
Per-token string properties are computed once per vocabulary (`TokenTable.of`), so each mask costs a
few vector operations over the 262k-token vocabulary, not a Python loop.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .errors import SteerError
from .lm import LMContext, Vocabulary


_LETTERS = re.compile(r"[^\W\d_]+")


class TokenTable:
    """Per-token string properties of one vocabulary, shared by all masks built on it."""

    _tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        n = vocab.size
        self.eos = np.zeros(n, dtype=bool)
        self.eos[list(vocab.eos_ids)] = True
        self.text = ~vocab.special  # tokens that stand for text
        # Word structure: leading letters (continuing the current word), longest complete inner word,
        # trailing letters (the word left open), and whether the token contains a non-letter.
        self.lead = np.zeros(n, dtype=np.int32)
        self.inner = np.zeros(n, dtype=np.int32)
        self.trail = np.zeros(n, dtype=np.int32)
        self.breaks = np.zeros(n, dtype=bool)
        for i, s in enumerate(vocab.strings):
            if not s or not self.text[i]:
                continue
            runs = [(m.start(), m.end()) for m in _LETTERS.finditer(s)]
            if runs == [(0, len(s))]:
                self.lead[i] = len(s)
                continue
            self.breaks[i] = True
            inner = [b - a for a, b in runs if a > 0 and b < len(s)]
            self.inner[i] = max(inner, default=0)
            if runs and runs[0][0] == 0:
                self.lead[i] = runs[0][1]
            if runs and runs[-1][1] == len(s):
                self.trail[i] = runs[-1][1] - runs[-1][0]

    @classmethod
    def of(cls, vocab: Vocabulary) -> TokenTable:
        table = cls._tables.get(vocab)
        if table is None:
            table = cls._tables[vocab] = cls(vocab)
        return table


class TokenConstraint:
    """A constraint on the next token that depends on the context's text so far.

    Constraints combine with `&` (both), `|` (either) and `~` (not).
    """

    def __deepcopy__(self, memo):  # an immutable spec (its caches are shareable): particles share it
        return self

    def mask(self, context: LMContext) -> torch.Tensor:
        raise NotImplementedError

    def __and__(self, other: TokenConstraint) -> TokenConstraint:
        return Combined("and", self, other)

    def __or__(self, other: TokenConstraint) -> TokenConstraint:
        return Combined("or", self, other)

    def __invert__(self) -> TokenConstraint:
        return Combined("not", self)


class Combined(TokenConstraint):
    """Intersection, union or complement of constraints."""

    def __init__(self, op: str, *parts: TokenConstraint):
        self.op, self.parts = op, parts

    def mask(self, context: LMContext) -> torch.Tensor:
        masks = [part.mask(context) for part in self.parts]
        if self.op == "not":
            return ~masks[0]
        return masks[0] & masks[1] if self.op == "and" else masks[0] | masks[1]

    def __repr__(self) -> str:
        if self.op == "not":
            return f"~{self.parts[0]!r}"
        return f"({self.parts[0]!r} {'&' if self.op == 'and' else '|'} {self.parts[1]!r})"


class _FixedSet(TokenConstraint):
    """A constraint that does not depend on the text so far: one mask per vocabulary, built once."""

    def __init__(self):
        self._masks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def mask(self, context: LMContext) -> torch.Tensor:
        vocab = context.lm.vocab
        if vocab not in self._masks:
            self._masks[vocab] = torch.from_numpy(self._build(TokenTable.of(vocab)))
        return self._masks[vocab]

    def _build(self, table: TokenTable) -> np.ndarray:
        raise NotImplementedError


class Charset(_FixedSet):
    """Tokens made only of the given characters (e.g. digits)."""

    def __init__(self, chars: str, allow_eos: bool = False):
        super().__init__()
        if not chars:
            raise SteerError("charset needs at least one character")
        self.chars, self.allow_eos = frozenset(chars), allow_eos

    def _build(self, t: TokenTable) -> np.ndarray:
        ok = np.fromiter((bool(s) and set(s) <= self.chars for s in t.vocab.strings), bool, t.vocab.size)
        ok &= t.text
        return ok | (t.eos if self.allow_eos else False)

    def __repr__(self) -> str:
        return f"charset({''.join(sorted(self.chars))!r})"


class OneOf(_FixedSet):
    """Tokens whose text is exactly one of the given strings."""

    def __init__(self, strings: Iterable[str], allow_eos: bool = False):
        super().__init__()
        self.strings, self.allow_eos = frozenset(strings), allow_eos

    def _build(self, t: TokenTable) -> np.ndarray:
        ok = np.fromiter((s in self.strings for s in t.vocab.strings), bool, t.vocab.size) & t.text
        return ok | (t.eos if self.allow_eos else False)

    def __repr__(self) -> str:
        return f"one_of({sorted(self.strings)!r})"


class ContinuesWord(_FixedSet):
    """Tokens made only of letters: appended to a word, they make it longer."""

    def _build(self, t: TokenTable) -> np.ndarray:
        return t.text & ~t.breaks & (t.lead > 0)


class WordLength(TokenConstraint):
    """Every word (run of letters) has between `min` and `max` letters; words continue across tokens.

    `min` is checked when a word ends, so a token that closes a too-short word is excluded.
    """

    def __init__(self, max: int | None = None, min: int = 1, allow_eos: bool = True):
        if max is not None and max < min:
            raise SteerError(f"word_length: max ({max}) is below min ({min})")
        self.max, self.min, self.allow_eos = max, min, allow_eos
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def mask(self, context: LMContext) -> torch.Tensor:
        open_word = open_word_length(context.text)
        key = (id(context.lm.vocab), open_word)
        if key not in self._cache:
            self._cache[key] = self._build(TokenTable.of(context.lm.vocab), open_word)
        return self._cache[key]

    def __repr__(self) -> str:
        return f"word_length(max={self.max}, min={self.min})"

    def _build(self, t: TokenTable, open_word: int) -> torch.Tensor:
        hi = self.max if self.max is not None else 1 << 30
        first = open_word + t.lead  # the word the token continues (or starts)
        ok = first <= hi
        closes_first = t.breaks & (first > 0)
        ok &= ~closes_first | (first >= self.min)
        ok &= ~t.breaks | ((t.inner == 0) | ((t.inner >= self.min) & (t.inner <= hi)))
        ok &= t.trail <= hi
        ok &= t.text
        if self.allow_eos:
            ok |= t.eos & (open_word == 0 or open_word >= self.min)
        return torch.from_numpy(ok)


def open_word_length(text: str) -> int:
    """Letters at the end of `text` (the length of the word still open)."""
    n = 0
    for ch in reversed(text):
        if not ch.isalpha():
            break
        n += 1
    return n


def word_length(max: int | None = None, min: int = 1, allow_eos: bool = True) -> WordLength:
    """Every word has at most `max` (and at least `min`) letters."""
    return WordLength(max=max, min=min, allow_eos=allow_eos)


def charset(chars: str, allow_eos: bool = False) -> Charset:
    """Tokens made only of the characters in `chars` (e.g. `charset("0123456789")` for digits)."""
    return Charset(chars, allow_eos=allow_eos)


def one_of(strings: Iterable[str], allow_eos: bool = False) -> OneOf:
    """Tokens whose text is exactly one of `strings`."""
    return OneOf(strings, allow_eos=allow_eos)


def continues_word() -> ContinuesWord:
    """Tokens that continue an open word (letters only, no leading space)."""
    return ContinuesWord()


def resolve(spec: Any, context: LMContext) -> torch.Tensor | None:
    """The boolean mask over the vocabulary that `spec` stands for in `context` (None: no restriction)."""
    if spec is None:
        return None
    if isinstance(spec, TokenConstraint):
        return spec.mask(context)
    if isinstance(spec, torch.Tensor):
        if spec.dtype != torch.bool or spec.shape != (context.lm.vocab.size,):
            raise SteerError(f"a mask tensor must be bool of shape ({context.lm.vocab.size},)")
        return spec
    if callable(spec):
        return resolve(spec(context), context)
    if isinstance(spec, Iterable):
        mask = torch.zeros(context.lm.vocab.size, dtype=torch.bool)
        mask[list(spec)] = True
        return mask
    raise SteerError(f"cannot use {type(spec).__name__} as a token mask")

