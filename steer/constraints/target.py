"""The base restriction: what the target itself conditions every next token on, before any
constraint (a healed prompt's first token, canonical tokenization, no control tokens, a token
budget's ending), and how a mask is judged in a real context (only generated text counts: while
healing is pending each token is judged by what it adds; a token that writes an end string is judged
by the text before it, as a complete text).

Everything here is computed once per state and kept per vocabulary (`Vocabulary.derived`), so it is
freed with the vocabulary.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..lm.base import Vocabulary
from .base import Context
from .canonical import Canonical
from .maskops import both, pack, unpack
from .tokens import TokenTable


def containing_tokens(t: TokenTable, s: str) -> np.ndarray:
    key = ("contains", s)
    cache = t.__dict__.setdefault("containing_tokens", {})
    if key not in cache:
        cache[key] = np.array([i for i, x in enumerate(t.vocab.strings) if t.text[i] and s in x], dtype=np.int64)
    return cache[key]


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


def rewrite_tokens(context: Context) -> list[int]:
    """While healing is pending, the tokens that only re-write the backed-off prompt text (they add
    nothing and are not counted against a budget); [] otherwise."""
    return TokenTable.of(context.lm.vocab).by_string.get(context.heal, []) if context.heal else []


def canonical_filter(context: Context) -> Canonical | None:
    """The canonical-tokenization filter of `context`'s tokenizer, or None when it is switched off."""
    if not context.canonical:
        return None
    vocab = context.lm.vocab

    def build() -> Canonical | None:
        found = Canonical.of(vocab)
        return None if found.trivial else found

    return vocab.derived(canonical_filter, build)


_MISSING = object()


class Recent(OrderedDict):
    """A dictionary that keeps only its `limit` most recently used entries."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def recall(self, key: Any, default: Any = None) -> Any:
        found = self.get(key, _MISSING)
        if found is _MISSING:
            return default
        self.move_to_end(key)
        return found

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
        last[rewrite_tokens(context)] = True  # a re-write of the healed prompt text is not counted
        mask = torch.from_numpy(last)
        rest = _base_mask(context)
        return mask if rest is None else both(mask, rest)
    return _base_mask(context)


def _base_mask(context: Context) -> torch.Tensor | None:
    found = _base(context)
    return None if found is None else found[0]


def base_words(context: Context) -> tuple[torch.Tensor, np.ndarray] | None:
    """The base mask of a context that has not ended and has more than one token of its budget left,
    with the same mask packed as llguidance packs its masks (None: no restriction, or another case).
    A constraint that intersects its packed mask with it, and marks its result `within` the base
    mask, spares the caller the intersection (see `restricted`)."""
    if context.ended:
        return None
    left = getattr(context, "tokens_left", None)
    if left is not None and left <= 1:
        return None
    return _base(context)


def restricted(mask: torch.Tensor | None, base: torch.Tensor | None) -> torch.Tensor | None:
    """`mask` within `base`: their intersection, unless `mask` was computed within `base` already."""
    if base is None or mask is None:
        return base if mask is None else mask
    return mask if getattr(mask, "within", None) is base else both(mask, base)


def _base(context: Context) -> tuple[torch.Tensor, np.ndarray] | None:
    """The base restriction before a budget's last token, as a mask and packed (cached per state)."""
    pending, canonical = context.heal, context.canonical
    vocab = context.lm.vocab
    cache = recent(vocab, "base masks", 256)
    key = (pending, context.tokens[-1] if canonical else None, context.allow_special)
    found = cache.recall(key, _MISSING)  # (asked several times a step: the hit is kept short)
    if found is not _MISSING:
        return found
    t = TokenTable.of(vocab)
    canon = canonical_filter(context)
    no_special = not context.allow_special and vocab.special.any()
    if pending or canon is None:
        parts = [healing_mask(context), canon.after(context.tokens[-1]) if canon is not None else None,
                 _text_or_eos(t) if no_special else None]
        mask = None
        for part in parts:
            if part is not None:
                mask = part if mask is None else both(mask, part)
        found = None if mask is None else (mask, pack(mask.numpy()))
    else:  # the common case, computed packed: a few microseconds where the canonical table is cached
        words = canon.after_words(context.tokens[-1])
        if no_special:
            words = words & _text_or_eos_words(t)
        found = (torch.from_numpy(unpack(words, vocab.size)), words)
    cache.keep(key, found)
    if found is not None:  # the entry holds the mask: its id stays its own
        _EXCLUDED.keep(id(found[0]), [found[0], None])
    return found


_EXCLUDED = Recent(512)  # per base mask: the ids it leaves out (found on first use), or False: many


def _text_or_eos(t: TokenTable) -> torch.Tensor:
    """Tokens that stand for text, and end-of-text (computed once per vocabulary)."""
    found = t.__dict__.get("_text_or_eos")
    if found is None:
        found = t.__dict__["_text_or_eos"] = torch.from_numpy(t.text | t.eos)
    return found


def _text_or_eos_words(t: TokenTable) -> np.ndarray:
    found = t.__dict__.get("_text_or_eos_words")
    if found is None:
        found = t.__dict__["_text_or_eos_words"] = pack(_text_or_eos(t).numpy())
    return found


def excluded_ids(mask: torch.Tensor) -> torch.Tensor | None:
    """The ids a base mask leaves out, when it is one of the cached base masks and they are few."""
    hit = _EXCLUDED.recall(id(mask))
    if hit is None or hit[0] is not mask:
        return None
    if hit[1] is None:
        ids = np.flatnonzero(~mask.numpy())
        hit[1] = torch.from_numpy(ids) if len(ids) < mask.numel() // 4 else False
    return hit[1] if hit[1] is not False else None


class View:
    """A context as a constraint sees it: the text so far, and a vocabulary whose strings are the text
    each candidate token adds (other tokens are marked special: not text here).  Constraints build
    their masks from it exactly as from a context, so they never judge a healed prompt's text or an
    end string."""

    def __init__(self, context: Context, text: str, vocab: Vocabulary | None = None):
        self.source = context
        self.lm = _ViewModel(vocab or context.lm.vocab)
        self.tokens, self.generated, self.text, self.heal = context.tokens, context.generated, text, ""
        self.written = context.written
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


def ending_tokens(context: Context, text: str | None = None) -> dict[str, np.ndarray]:
    """The tokens that would write an end string of `context` next (after `text`, by default the
    context's), grouped by the text they would end with (the text before the end string)."""
    if not context.end or context.ended:
        return {}
    vocab, pending = context.lm.vocab, context.heal
    text = context.text if text is None else text
    keep = max(len(e) for e in context.end) - 1
    t = TokenTable.of(vocab)
    cache = recent(vocab, "ending tokens", 256)
    key = (context.end, pending, text[len(text) - keep:] if keep else "")
    found = cache.recall(key)
    if found is None:  # per token: where its end string starts, relative to the end of the text
        candidates: set[int] = set()
        for e in context.end:
            candidates.update(containing_tokens(t, pending + e if pending else e).tolist())
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


def can_end_next(context: Context, text: str, complete: Callable[[str], bool]) -> bool:
    """Whether `text` (the context's text and what a drawn token adds) can end with the next token:
    it is complete (end-of-text, or an end string alone, follows), or a token writes an end string
    after a complete text ("ly\\n" after "quick").  `complete(t)` judges a text that extends `text`."""
    if complete(text):
        return True
    return any(complete(ended) for ended in ending_tokens(context, text) if len(ended) > len(text))


def constraint_mask(constraint: Any, context: Context) -> torch.Tensor:
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


def ending_look_ahead(constraint: Any, context: Context) -> Callable[[int], bool] | None:
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
