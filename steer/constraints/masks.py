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

import copy
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ..errors import SteerError
from ..lm.base import Vocabulary
from .canonical import Canonical
from .maskops import both, either, negate
from .base import Constraint, Context, all_of, as_constraint
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
                for i in t.starting_with(s[k:]) if k else _containing(t, s):
                    text = tail[len(tail) - k:] + strings[i] if k else strings[i]
                    at = text.find(s)
                    if at >= 0 and at + len(s) < len(text):
                        ok[i] = False
        return ok | t.eos

    def __repr__(self) -> str:
        return f"stop_at({list(self.strings)!r})"


def _containing(t: TokenTable, s: str) -> np.ndarray:
    key = ("contains", s)
    cache = t.__dict__.setdefault("_containing", {})
    if key not in cache:
        cache[key] = np.array([i for i, x in enumerate(t.vocab.strings) if t.text[i] and s in x], dtype=np.int64)
    return cache[key]


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


def healing_mask(context: Context) -> torch.Tensor | None:
    """While token healing is pending: the tokens whose text starts with the backed-off prompt text
    (None when nothing is pending)."""
    pending = context.heal
    if not pending:
        return None
    t = TokenTable.of(context.lm.vocab)
    cache = t.__dict__.setdefault("_healing", {})
    if pending not in cache:
        ok = np.zeros(context.lm.vocab.size, dtype=bool)
        ok[t.starting_with(pending)] = True
        cache[pending] = torch.from_numpy(ok)
    return cache[pending]


def canonical_filter(context: Context) -> Canonical | None:
    """The canonical-tokenization filter of `context`'s tokenizer, or None when it is switched off."""
    if not context.canonical:
        return None
    found = Canonical.of(context.lm.vocab)
    return None if found.trivial else found


class Recent(OrderedDict):
    """A dictionary that keeps only its `limit` most recently used entries."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def recall(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def keep(self, key: Any, value: Any) -> Any:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.limit:
            self.popitem(last=False)
        return value


def recent(vocab: Vocabulary, name: str, limit: int) -> Recent:
    """A bounded cache of `vocab`'s, freed with it."""
    return vocab.derived(("recent", name), lambda: Recent(limit))


def base_mask(context: Context) -> torch.Tensor | None:
    """What the target itself conditions the next token on, before any constraint: the first token
    reproduces a healed prompt, the sequence stays canonically tokenized, and control or multimodal
    tokens are left out unless the context allows them (None: no restriction)."""
    if context.ended:  # an end string was written: only the end-of-text token may follow
        return torch.from_numpy(TokenTable.of(context.lm.vocab).eos.copy())
    left = getattr(context, "tokens_left", None)
    if left is not None and left <= 1:  # the budget's last token must end the text
        table = TokenTable.of(context.lm.vocab)
        last = table.eos.copy()
        for ids in ending_tokens(context).values():
            last[ids] = True
        if context.heal:  # a token that only re-writes the healed prompt text is not counted
            last[table.by_string.get(context.heal, [])] = True
        mask = torch.from_numpy(last)
        rest = _base_mask(context)
        return mask if rest is None else both(mask, rest)
    return _base_mask(context)


def _base_mask(context: Context) -> torch.Tensor | None:
    pending, canonical = context.heal, context.canonical
    cache = recent(context.lm.vocab, "base masks", 256)
    key = (pending, context.tokens[-1] if canonical else None, context.allow_special)
    if key in cache:
        return cache.recall(key)
    t = TokenTable.of(context.lm.vocab)
    parts = [healing_mask(context)]
    canon = canonical_filter(context)
    if canon is not None:
        parts.append(canon.after(context.tokens[-1]))
    if not context.allow_special and t.vocab.special.any():
        parts.append(_text_or_eos(t))
    mask = None
    for part in parts:
        if part is not None:
            mask = part if mask is None else both(mask, part)
    cache.keep(key, mask)
    if mask is not None:
        excluded = torch.from_numpy(np.flatnonzero(~mask.numpy()))
        if len(excluded) < mask.numel() // 4:
            _EXCLUDED.keep(id(mask), (mask, excluded))  # the entry holds the mask: its id stays its own
    return mask


_EXCLUDED = Recent(512)


def _text_or_eos(t: TokenTable) -> torch.Tensor:
    """Tokens that stand for text, and end-of-text (computed once per vocabulary)."""
    found = t.__dict__.get("_text_or_eos")
    if found is None:
        found = t.__dict__["_text_or_eos"] = torch.from_numpy(t.text | t.eos)
    return found


def excluded_ids(mask: torch.Tensor) -> torch.Tensor | None:
    """The ids a base mask leaves out, when it is one of the cached base masks and they are few."""
    hit = _EXCLUDED.recall(id(mask))
    return hit[1] if hit is not None and hit[0] is mask else None


class View:
    """A context as a constraint sees it: the text so far, and a vocabulary whose strings are the text
    each candidate token adds (other tokens are marked special: not text here).  Constraints build
    their masks from it exactly as from a context, so they never judge a healed prompt's text or an
    end string."""

    def __init__(self, context: Context, text: str, vocab: Vocabulary | None = None):
        self.source = context
        self.lm = _ViewModel(vocab or context.lm.vocab)
        self.tokens, self.generated, self.text, self.heal = context.tokens, context.generated, text, ""
        self.canonical, self.allow_special, self.end = context.canonical, context.allow_special, ()

    @classmethod
    def vocabulary(cls, vocab: Vocabulary, key: tuple, strings: Callable[[], dict[int, str]]) -> Vocabulary:
        """A vocabulary in which token i stands for `strings()[i]` and every other token is special
        (built once per `key`)."""
        views = recent(vocab, "views", 16)
        if key not in views:
            strings = strings()
            special = np.ones(vocab.size, dtype=bool)
            special[list(strings)] = False
            special[list(vocab.eos_ids)] = True
            texts = [""] * vocab.size
            for i, s in strings.items():
                texts[i] = s
            view = Vocabulary(texts, vocab.eos_ids, vocab.bos_id, special)
            TokenTable.of(view, cache=False)
            views.keep(key, view)
        return views.recall(key)


class _ViewModel:
    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab


def healed_view(context: Context) -> View:
    """While healing is pending: each candidate token is judged by what it adds after the backed-off
    prompt text (a token that is exactly that text adds nothing)."""
    vocab, pending = context.lm.vocab, context.heal

    def strings() -> dict[int, str]:
        return {int(i): vocab.strings[i][len(pending):] for i in TokenTable.of(vocab).starting_with(pending)}

    return View(context, "", View.vocabulary(vocab, ("heal", pending), strings))


def ending_tokens(context: Context) -> dict[str, np.ndarray]:
    """The tokens that would write an end string of `context` next, grouped by the text they would
    end with (the text before the end string)."""
    vocab, text, pending = context.lm.vocab, context.text, context.heal
    if not context.end or context.ended:
        return {}
    keep = max(len(e) for e in context.end) - 1
    t = TokenTable.of(vocab)
    cache = recent(vocab, "ending tokens", 256)
    key = (context.end, pending, text[len(text) - keep:] if keep else "")
    found = cache.recall(key)
    if found is None:  # per token: where its end string starts, relative to the end of the text
        candidates: set[int] = set()
        for e in context.end:
            candidates.update(_containing(t, pending + e if pending else e).tolist())
            for k in range(1, len(e)):
                if text.endswith(e[:k]):
                    candidates.update(t.starting_with(pending + e[k:]).tolist())
        found = []
        for i in sorted(candidates):
            new = vocab.strings[i]
            if pending:
                if not new.startswith(pending):
                    continue
                new = new[len(pending):]
            at = context.end_position(text, new)
            if at is not None:
                found.append((i, at - len(text), new))
        cache.keep(key, found)
    groups: dict[str, list[int]] = {}
    for i, offset, new in found:
        ended = text[: len(text) + offset] if offset <= 0 else text + new[:offset]
        groups.setdefault(ended, []).append(i)
    return {k: np.array(v, dtype=np.int64) for k, v in groups.items()}


def constraint_mask(constraint: TokenConstraint, context: Context) -> torch.Tensor:
    """`constraint`'s mask in `context`, judging only generated text: while healing is pending each
    token is judged by the text it adds after the backed-off prompt, and a token that writes an end
    string is judged by the text before it, as a complete text (its end-of-text entry)."""
    if context.ended:
        return constraint.mask(View(context, context.text))
    mask = constraint.mask(healed_view(context) if context.heal else context)
    ending = ending_tokens(context)
    if not ending:
        return mask
    mask = mask.clone()
    eos = list(context.lm.vocab.eos_ids)
    vocab, text = context.lm.vocab, context.text
    # Tokens that add text before their end string: judged at once, by a view in which each stands
    # for the text it adds.
    adds = tuple(sorted((int(i), ended[len(text):]) for ended, ids in ending.items() if len(ended) > len(text)
                        for i in ids))
    added = constraint.mask(View(context, text, View.vocabulary(vocab, ("adds", adds), lambda: dict(adds)))) \
        if adds else None
    for ended_text, ids in ending.items():
        ok = bool(constraint.mask(View(context, ended_text))[eos].any())
        mask[ids] = added[ids] & ok if len(ended_text) > len(text) else ok
    return mask


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


def ending_look_ahead(constraint: TokenConstraint, context: Context) -> Callable[[int], bool] | None:
    """When two tokens of the budget are left: whether, after a drawn token, the last token can end the
    text (end-of-text or an end string, within `constraint` and the base restriction).  Checked only on
    drawn tokens (adaptive rejection keeps the weights exact); None with more tokens left."""
    if context.tokens_left != 2:
        return None
    vocab = context.lm.vocab

    def can_end_after(token: int) -> bool:
        if token in vocab.eos_ids:
            return True
        after = copy.deepcopy(context)  # (a context copy shares the model and its constraints' states)
        after.extend([token])
        if after.ended or after.tokens_left > 1:  # it ended the text, or only re-wrote the prompt's end
            return True
        last = base_mask(after)  # at one token left: end-of-text and the tokens that write an end string
        return bool(both(last, constraint.allowed_in(after)).any())

    return can_end_after


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
