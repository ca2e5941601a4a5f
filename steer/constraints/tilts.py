"""Token tilts: soft preferences that act on the proposal, not only on the weights.

A tilt gives every next token a log-weight φ(x).  Sampling `ctx.next_token(tilt=φ)` draws the token
from p(x)·exp(φ(x)) (within whatever the token is restricted to) and adds log Σ p·exp(φ) to the
weight: exact SMC for the target p(text)·exp(Σ φ), and the locally optimal proposal when the
potential decomposes over tokens.  A score that only rewards what was already sampled cannot steer
with few particles (no particle may ever draw a preferred word); a tilt makes the preferred tokens
likelier at the moment they can be drawn.

`prefer_words(words, bonus)` rewards complete words from a list, exactly, even when a word takes
several tokens: the potential is `bonus` per complete listed word plus `bonus` while the open word is
a prefix on the tokenizer's way to a listed word, and each token's tilt is the change in that
potential.  So the bonus for a prefix is paid when the prefix is written (which steers towards it) and
taken back if the word turns out to be another ("enjoy" then "ment"); at the end of the text only
complete words count.  Any prefix bonus leaves the target unchanged (it is taken back or confirmed
before the end), so the prefixes are chosen for the proposal's sake: only those the tokenizer writes
on the way to a listed word (" enjoy" of " enjoy|able"), not every string a listed word starts with.
Paying for "a" because "amazing" starts with it would push particles into the article, then take the
bonus back from each of them a token later, and that swing is what made runs with few particles
collapse onto one unsteered text.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import SteerError
from ..lm.base import Vocabulary
from .base import Constraint
from .masks import lead_maps, open_word_length
from .target import ending_tokens, healed_view
from .tokens import TokenTable

_LETTERS = re.compile(r"[^\W\d_]+")


class Tilt(Constraint):
    """Log-weights over the next token.  Tilts add (`+`), scale (`2.0 * tilt`) and, with `&`, join a
    mask or a check (`mask & tilt`: the next token is restricted to the mask and drawn tilted)."""

    def values(self, context) -> torch.Tensor:
        """φ over the vocabulary (float64) for the next token of `context` (EOS: the end of the text)."""
        raise NotImplementedError

    def tilt(self, context) -> torch.Tensor:
        return self.values(context)

    @property
    def restricts(self) -> bool:
        return False

    def __add__(self, other: Tilt) -> Tilt:
        return _Sum(self, other)

    def __mul__(self, factor: float) -> Tilt:
        return _Scaled(self, float(factor))

    __rmul__ = __mul__


class _Sum(Tilt):
    def __init__(self, *parts: Tilt):
        self.parts = parts

    def values(self, context) -> torch.Tensor:
        return sum(p.values(context) for p in self.parts)

    def __repr__(self) -> str:
        return " + ".join(repr(p) for p in self.parts)


class _Scaled(Tilt):
    def __init__(self, tilt: Tilt, factor: float):
        self.tilt, self.factor = tilt, factor

    def values(self, context) -> torch.Tensor:
        return self.factor * self.tilt.values(context)

    def __repr__(self) -> str:
        return f"{self.factor} * {self.tilt!r}"


class TokenBonus(Tilt):
    """A fixed log-weight per token: from a tensor over the vocabulary, or {token text or id: bonus}."""

    def __init__(self, bonus: torch.Tensor | Mapping[Any, float]):
        self.bonus = bonus
        self._dense: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def values(self, context) -> torch.Tensor:
        vocab = context.lm.vocab
        dense = self._dense.get(vocab)
        if dense is None:
            if isinstance(self.bonus, torch.Tensor):
                if self.bonus.shape != (vocab.size,):
                    raise SteerError(f"a token bonus tensor must have shape ({vocab.size},)")
                dense = self.bonus.double()
            else:
                dense = torch.zeros(vocab.size, dtype=torch.float64)
                by_text: dict[str, list[int]] = {}  # every token, special ones too (TokenTable's is text only)
                for i, s in enumerate(vocab.strings):
                    by_text.setdefault(s, []).append(i)
                for key, value in self.bonus.items():
                    ids = [key] if isinstance(key, int) else by_text.get(key, [])
                    dense[ids] = float(value)
            if not torch.isfinite(dense).all():
                raise SteerError("token bonuses must be finite (use a mask to exclude tokens)")
            self._dense[vocab] = dense
        return dense

    def __repr__(self) -> str:
        return "token_bonus(...)"


class WordBonus(Tilt):
    """`bonus` for every complete word of `words` (case-insensitive), exact over multi-token words."""

    def __init__(self, words: Iterable[str], bonus: float = 2.0):
        self.words = frozenset(w.lower() for w in words)
        if not self.words or not all(w.isalpha() for w in self.words):
            raise SteerError("prefer_words needs at least one word, and words are letters only")
        if not np.isfinite(bonus):
            raise SteerError(f"prefer_words needs a finite bonus, got {bonus}")
        self.bonus = float(bonus)
        self._static: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._by_state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"prefer_words({sorted(self.words)!r}, {self.bonus})"

    def prefixes(self, vocab: Vocabulary) -> frozenset[str]:
        """The open words (lower-cased) that hold the prefix bonus: each listed word, and the letters
        the tokenizer has written after each token of it (lower-case or capitalised, with or without a
        leading space).  A vocabulary without a tokenizer holds the bonus for every prefix."""
        return vocab.derived(("word-bonus-prefixes", self.words), lambda: self._prefixes(vocab))

    def _prefixes(self, vocab: Vocabulary) -> frozenset[str]:
        if vocab.tokenizer is None:
            return frozenset(w[:k] for w in self.words for k in range(1, len(w) + 1))
        found = set(self.words)
        for w in self.words:
            for variant in (w, w.capitalize()):
                for lead in ("", " "):
                    written = ""
                    for i in vocab.tokenizer.encode(lead + variant, add_special_tokens=False):
                        written += vocab.strings[i]
                        run = written.strip().lower()
                        if run and w.startswith(run):
                            found.add(run)
        return frozenset(found)

    # -- the potential on plain text (also the reference the tests compare with) ----------------------
    def potential(self, text: str, vocab: Vocabulary, ended: bool = False) -> float:
        """bonus x (complete listed words + [the open word holds the prefix bonus, unless the text
        ended])."""
        runs = [(m.group().lower(), m.end()) for m in _LETTERS.finditer(text)]
        complete = [w for w, end in runs if end < len(text) or ended]
        score = sum(w in self.words for w in complete)
        if not ended and runs and runs[-1][1] == len(text):
            score += runs[-1][0] in self.prefixes(vocab)
        return self.bonus * score

    def settle(self, context) -> float:
        """What to `score` when a program stops before the end of the text: takes back the bonus held
        for an open word that is only a prefix of a listed word (at end-of-text the tilt does this)."""
        vocab = context.lm.vocab
        return self.potential(context.text, vocab, ended=True) - self.potential(context.text, vocab)

    # -- vectorised over the vocabulary -------------------------------------------------------------
    def _statics(self, table) -> tuple[np.ndarray, np.ndarray]:
        """Per token, independent of the text before it: the listed words it completes inside itself,
        and whether its trailing open run holds the prefix bonus (for tokens with a non-letter)."""
        if table.vocab not in self._static:
            prefixes = self.prefixes(table.vocab)
            inner = np.zeros(table.vocab.size)
            trail = np.zeros(table.vocab.size)
            for i in np.flatnonzero(table.text & table.breaks & (table.runs > 0)):
                s = table.vocab.strings[i]
                for m in _LETTERS.finditer(s):
                    word = m.group().lower()
                    if m.end() == len(s):
                        trail[i] = word in prefixes
                    elif m.start() > 0:
                        inner[i] += word in self.words
            self._static[table.vocab] = (inner, trail)
        return self._static[table.vocab]

    def values(self, context) -> torch.Tensor:
        view = healed_view(context) if getattr(context, "heal", "") else context
        vocab, text = view.lm.vocab, view.text
        open_word = text[len(text) - open_word_length(text):].lower()
        cache = self._by_state.setdefault(vocab, {})
        phi = cache.get(open_word)
        if phi is None:
            t = TokenTable.of(vocab)
            inner, trail = self._statics(t)
            prefixes = self.prefixes(vocab)
            b = self.bonus
            paid = b * (open_word in prefixes)  # the prefix bonus held now
            closes = b * (open_word in self.words) - paid  # what closing the open word changes
            letters_only = t.text & ~t.breaks & (t.lead > 0)
            phi = np.where(letters_only, -paid, closes + b * (inner + trail))
            by_lead, by_letters = lead_maps(t)
            leads = t.text & t.breaks & (t.lead > 0)
            phi[leads] = -paid + b * (inner[leads] + trail[leads])
            for p in prefixes:  # tokens that extend the open word into a listed prefix
                if p.startswith(open_word) and len(p) > len(open_word):
                    phi[by_letters.get(p[len(open_word):], [])] = b - paid
            for w in self.words:  # tokens whose leading letters complete a listed word
                if w.startswith(open_word) and len(w) > len(open_word):
                    ids = by_lead.get(w[len(open_word):], [])
                    phi[ids] += b
            phi[t.eos] = closes
            phi[~t.text & ~t.eos] = 0.0
            phi = torch.from_numpy(phi)
            cache[open_word] = phi
            if len(cache) > 4096:
                cache.pop(next(iter(cache)))
        ending = _ending_values(self, context)
        if ending:
            phi = phi.clone()
            for i, value in ending.items():
                phi[i] = value
        return phi


def _ending_values(tilt: WordBonus, context) -> dict[int, float]:
    """Tokens that write an end string end the text: their tilt closes it, from the text before it."""
    if not getattr(context, "end", ()) or getattr(context, "ended", False):
        return {}
    vocab = context.lm.vocab
    now = tilt.potential(context.text, vocab)
    return {int(i): tilt.potential(ended, vocab, ended=True) - now
            for ended, ids in ending_tokens(context).items() for i in ids}


def as_tilt(spec: Any) -> Constraint | None:
    """What a tilt may be given as: a constraint (its tilt is used), or a tensor of log-weights over
    the vocabulary (None stays None)."""
    if spec is None or isinstance(spec, Constraint):
        return spec
    if isinstance(spec, torch.Tensor):
        return TokenBonus(spec)
    raise SteerError(f"cannot use {type(spec).__name__} as a tilt (use steer.tilts.prefer_words or token_bonus)")


def prefer_words(words: Iterable[str], bonus: float = 2.0) -> WordBonus:
    """Steer towards complete words from `words`: exp(bonus) per listed word, proposed token by token."""
    return WordBonus(words, bonus)


def token_bonus(bonus: torch.Tensor | Mapping[Any, float]) -> TokenBonus:
    """A fixed log-weight per token (a tensor over the vocabulary, or {token text or id: bonus})."""
    return TokenBonus(bonus)
