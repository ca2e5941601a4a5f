"""Regular expressions, Lark grammars and JSON Schema on llguidance.

llguidance (the Rust engine behind Guidance, and an option in vLLM, SGLang and llama.cpp) compiles a
regex, a Lark grammar or a JSON schema into a matcher that owns its parse state: it computes the
allowed-token bitmask over the whole vocabulary in microseconds, consumes a token and rolls back.
Each particle keeps its own matcher state in its context (`LMContext.constraint_states`); a copy made
by resampling shares its parent's state until one of them moves, and is then deep-copied
(copy-on-write), so resampled-away particles never cost a copy.

On top of the engine's mask, steer keeps what makes the posterior exact and the proposals useful:
the base restriction (healing, canonical pairs, no control tokens) is intersected with it, a short
look-ahead drops tokens after which no canonical continuation exists, the token before the budget's
last may only be one after which the text can end, and an optional final check (`jsonschema`) makes
an approximating mask exact: end-of-text is allowed only on text the check accepts.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import string
import weakref
from collections.abc import Callable
from typing import Any

import llguidance
import llguidance.numpy as llnp
import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

from ..errors import SteerError
from ..lm.base import Vocabulary
from .base import NOTHING_FITS, all_of
from .canonical import Canonical
from .maskops import bits_at, few_ids, pack, unpack
from .masks import TokenConstraint
from .target import base_words, can_end_next, canonical_filter, ending_tokens, recent
from .tokens import TokenTable

LOOK_AHEAD = 16  # tokens checked one by one for a canonical continuation when at most this many are allowed
WIDE = 4096  # up to this many allowed tokens, those that begin another allowed one are checked too
DEPTH = 3  # and followed this many tokens deep while at most NARROW tokens continue canonically
NARROW = 2
BUDGET_CHECK = 4096  # the second-to-last token of a budget is checked one by one up to this many candidates
# A short completion is searched one character at a time: closers first, then separators, a zero,
# other punctuation, letters, digits and space (see `Structured.need`).
_CLOSERS = '"}]),:0'
PROBE_ORDER = _CLOSERS + "".join(c for c in string.punctuation + string.ascii_letters + string.digits + " "
                                 if c not in _CLOSERS)
PROBES = 12  # one-character tokens tried after a look-ahead candidate before its whole mask is computed
ENDING_SCAN = 3  # steps of the search that look for a character completing the text
MARGIN, END_GAME = 2, 8  # tokens kept in hand until the budget's last 8
FAR = 16  # drawn tokens are checked once the shortest completion is within this many tokens of the budget
# Where the greedy completion is too long to fit, other characters are tried at its first DETOURS free
# choices (up to DETOUR_WIDTH each), each walk then greedy again: `{"` then `k` for a required "key"
# where the greedy walk writes the optional keys that come before it
DETOURS, DETOUR_WIDTH = 3, 12
# JSON is written as `json.dumps` writes it: fixed separators, no free white space (a model given
# free white space can spend its whole budget on it).
JSON_FORMAT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False,
               "json_allow_general_unicode_escapes": True}

def ll_tokenizer(vocab: Vocabulary) -> LLTokenizer:
    """llguidance's view of `vocab`'s tokenizer (built once per vocabulary, about a second for 262k
    tokens): a fast Hugging Face tokenizer directly, any other tokenizer through its token strings."""
    return vocab.derived(LLTokenizer, lambda: _build_tokenizer(vocab))


def _build_tokenizer(vocab: Vocabulary) -> LLTokenizer:
    import llguidance.hf

    eos = sorted(vocab.eos_ids)
    tokenizer = vocab.tokenizer
    if tokenizer is not None:
        try:
            return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab.size, eos_token=eos)
        except ValueError:  # a decoder llguidance does not know (e.g. the tiny test tokenizers)
            pass

    # The engine holds this object from Rust, where Python's collector cannot see: it must not hold the
    # vocabulary (which holds the engine's tokenizer), or neither would ever be freed.
    by_string = {s: i for i, s in enumerate(vocab.strings) if s and not vocab.special[i]}
    longest = max(map(len, by_string), default=1)
    strings, bos, special = [s.encode("utf-8") for s in vocab.strings], vocab.bos_id, vocab.special

    class _Strings:  # llguidance's generic tokenizer protocol: token bytes and an encode function
        eos_token_id = eos[0]
        bos_token_id = bos
        tokens = strings
        special_token_ids = [int(i) for i in np.flatnonzero(special)]

        def __init__(self):  # the engine asks for the same short strings again and again
            self.encode = functools.lru_cache(maxsize=4096)(self._encode)

        def _encode(self, data: bytes) -> tuple[int, ...]:
            text = data.decode("utf-8", errors="replace")
            if tokenizer is not None:
                return tuple(tokenizer.encode(text, add_special_tokens=False))
            return tuple(_greedy(by_string, longest, text))

        def __call__(self, data: bytes) -> list[int]:
            return list(self.encode(data))

    return LLTokenizer(TokenizerWrapper(_Strings()), n_vocab=vocab.size, eos_token=eos)


def _greedy(by_string: dict[str, int], longest: int, text: str) -> list[int]:
    """Longest-match tokenization, for a vocabulary without a tokenizer."""
    out, at = [], 0
    while at < len(text):
        for n in range(min(longest, len(text) - at), 0, -1):
            if text[at:at + n] in by_string:
                out.append(by_string[text[at:at + n]])
                at += n
                break
        else:
            raise SteerError(f"the vocabulary cannot write {text[at]!r}")
    return out


class MatcherState:
    """One particle's position in a grammar: an llguidance matcher and how far it has read.

    `owner` is the serial of the context that may move it; another context that finds it (a copy made
    by resampling) forks it first.
    """

    __slots__ = ("matcher", "consumed", "owner", "_mask", "_few", "ahead", "tokenizer", "result", "__weakref__")

    def __init__(self, matcher: LLMatcher, tokenizer: LLTokenizer, owner: int):
        self.matcher, self.tokenizer, self.owner = matcher, tokenizer, owner
        self.consumed = 0  # generated tokens read so far
        self._mask: tuple[int, np.ndarray] | None = None
        self._few: tuple | None = None  # (position, limit), within, ids
        # masks the look-ahead computed after some next tokens: the next step's mask if one is drawn
        self.ahead: tuple[int, dict[int, np.ndarray]] | None = None
        # the last full mask, with what it depends on; held weakly, so that a particle keeps no
        # 262k-entry mask between steps (copies that share the state share it while it is in use)
        self.result: tuple[tuple, weakref.ref] | None = None

    def fork(self, owner: int) -> MatcherState:
        new = MatcherState(self.matcher.deep_copy(), self.tokenizer, owner)
        new.consumed, new._mask, new._few = self.consumed, self._mask, self._few
        new.ahead, new.result = self.ahead, self.result
        return new

    def advance_token(self, token: int) -> bool:
        ahead, self.ahead = self.ahead, None
        self.consumed += 1
        if ahead is not None and ahead[0] == self.consumed - 1 and token in ahead[1]:
            self._mask = (self.consumed, ahead[1][token])
        return self.matcher.consume_token(token)

    def keep_ahead(self) -> dict[int, np.ndarray]:
        """Where the look-ahead leaves the masks it computes after a next token (see `ahead`)."""
        if self.ahead is None or self.ahead[0] != self.consumed:
            self.ahead = (self.consumed, {})
        return self.ahead[1]

    def advance_text(self, text: str) -> bool:
        """Read text that is not a whole token (the part of a healed first token after the prompt)."""
        self.consumed += 1
        self.ahead = None
        ids = self.tokenizer.tokenize_str(text) if text else []
        return all(self.matcher.consume_token(i) for i in ids)

    def packed(self) -> np.ndarray:
        """The engine's mask here, 32 tokens per word (computed once per position)."""
        if self._mask is None or self._mask[0] != self.consumed:
            self._mask = (self.consumed, packed(self.matcher, self.tokenizer.vocab_size))
        return self._mask[1]

    def few(self, limit: int, within: np.ndarray | None = None,
            words: np.ndarray | None = None) -> np.ndarray | None:
        """The ids the engine allows here, `within` the packed base restriction when given, when there
        are at most `limit` of them (None: more), computed once per position: the mask, its look-ahead
        and the check of drawn tokens all ask.  (Only the ids are kept: a particle's state stays small.)
        `words`: `self.within(within)`, when the caller has it already."""
        if self._few is None or self._few[0] != (self.consumed, limit) or self._few[1] is not within:
            words = self.within(within) if words is None else words
            self._few = ((self.consumed, limit), within, few_ids(words, limit))
        return self._few[2]

    def within(self, base: np.ndarray | None) -> np.ndarray:
        """The engine's packed mask here, intersected with packed `base` when given."""
        return self.packed() if base is None else np.bitwise_and(self.packed(), base)

    def allowed(self) -> np.ndarray:
        """Bool per token: the engine allows it next (end-of-text: the text may end here)."""
        return unpack(self.packed(), self.tokenizer.vocab_size)

    def accepts(self, text: str) -> bool:
        """Whether `text` may follow, leaving a complete text (the matcher is left where it was)."""
        ids = self.tokenizer.tokenize_str(text) if text else []
        n = self.matcher.try_consume_tokens(ids)
        ok = n == len(ids) and self.matcher.is_accepting()
        if n:
            self.matcher.rollback(n)
        return ok

    def can_follow(self, text: str) -> bool:
        """Whether `text` may follow (a prefix of a complete text)."""
        ids = self.tokenizer.tokenize_str(text) if text else []
        return self.matcher.validate_tokens(ids) == len(ids)


def probe_tokens(vocab: Vocabulary) -> list[tuple[str, int]]:
    """The single-character tokens of PROBE_ORDER that `vocab` has, in that order."""
    def build() -> list[tuple[str, int]]:
        single: dict[str, int] = {}
        for i, s in enumerate(vocab.strings):
            if len(s) == 1 and not vocab.special[i]:
                single.setdefault(s, i)
        return [(c, single[c]) for c in PROBE_ORDER if c in single]

    return vocab.derived(probe_tokens, build)


def _one_character_tokens(vocab: Vocabulary) -> list[int]:
    """Every token spelling one of the first PROBES characters of PROBE_ORDER (a byte-fallback token
    and the merged one alike: the canonical pair table tells them apart)."""
    def build() -> list[int]:
        by_string = TokenTable.of(vocab).by_string
        return [int(i) for c in PROBE_ORDER[:PROBES] for i in by_string.get(c, []) if not vocab.special[i]]

    return vocab.derived(_one_character_tokens, build)


def _probes_after(vocab: Vocabulary, canon: Canonical, last: int) -> list[int]:
    """The one-character probe tokens that may follow `last` canonically.  Read from a table of the
    probes each token may precede (built once from `canon.before`): asking `canon.follows` would build
    what `last` leaves out, about a millisecond for each token seen for the first time."""
    if not canon.alone[last]:  # (the table judges tokens that stand alone; a prompt's may not)
        found = [y for y in _one_character_tokens(vocab) if canon.follows(last, y)]
        return [y for k, y in enumerate(found) if vocab.strings[y] not in {vocab.strings[z] for z in found[:k]}]
    probes, table = _probe_table(vocab, canon)
    return probes[np.unpackbits(table[last], count=len(probes)).view(bool)].tolist()


def _probe_table(vocab: Vocabulary, canon: Canonical) -> tuple[np.ndarray, np.ndarray]:
    """The probe tokens, and per token the probes that may follow it canonically, packed 8 to a byte:
    one token per character (a byte-fallback token and the merged one spell the same bytes, which is
    all the engine judges), the first that may follow."""
    def build() -> tuple[np.ndarray, np.ndarray]:
        probes = _one_character_tokens(vocab)
        before = np.stack([canon.before(y) for y in probes], axis=1) if probes else np.zeros((vocab.size, 0), bool)
        for j, y in enumerate(probes):
            twins = [k for k in range(j) if vocab.strings[probes[k]] == vocab.strings[y]]
            if twins:
                before[:, j] &= ~before[:, twins].any(axis=1)
        return np.array(probes, dtype=np.int64), np.packbits(before, axis=1)

    return vocab.derived(_probe_table, build)


def completion(matcher: LLMatcher, vocab: Vocabulary, tokenizer: LLTokenizer, limit: int,
               tail: str = "", hints: tuple[str, ...] = ()) -> tuple[str, bool]:
    """A short text after which `matcher`'s text is complete, and whether one was found (if not: the
    text reached `limit` characters, or no probe character fits); the matcher is left where it was.

    A greedy search: forced tokens are taken whole; in the first ENDING_SCAN steps a character that
    completes the text if there is one (`b` after `aa` for `a+b`); otherwise the first allowed
    character in PROBE_ORDER, not the same character three times running (counting the `tail` of the
    text before) where another fits.  It is not always the shortest, but for JSON (close the string,
    `0` for a number, the required keys in order) and most patterns it is close, and it costs a few
    hundred microseconds.  Where it finds nothing, the walk is tried again writing the constraint's
    `hints` where they fit (`.tpk` under `^file:.+\\.tpkx?$`, where it writes `}]` for ever), then a
    letter or digit and one more character that complete the text are looked for (`ly` for `\\w+ly`,
    where the walk writes digits).
    """
    probes, notes = probe_tokens(vocab), {}
    text, found = _greedy_walk(matcher, probes, tokenizer, limit, tail, notes=notes)
    if not found and notes.get("round"):
        # The walk went round (an optional recursive key first in every object: `{"headers": [{"headers":
        # ...`): take another character at one of the free choices of the last round.
        other = _detour(matcher, probes, tokenizer, limit, tail, notes["round"], len, first=True)
        if other is not None:
            return other, True
    if not found and hints:
        other, done = _greedy_walk(matcher, probes, tokenizer, limit, tail, hints=hints)
        if done:
            return other, True
    if not found:
        ending = _ending_pair(matcher, probes)
        if ending is not None:
            return ending, True
    return text, found


def shorter_completion(matcher: LLMatcher, vocab: Vocabulary, tokenizer: LLTokenizer, limit: int,
                       tail: str, tokens: int) -> str | None:
    """A completion of fewer than `tokens` tokens found by leaving the greedy walk once: at one of its
    first DETOURS free choices another allowed character (up to DETOUR_WIDTH of them), then greedy
    again; the shortest such, or None.  It costs up to DETOURS x DETOUR_WIDTH walks, so it is tried
    only where the greedy completion would refuse a token or end a particle."""
    def size(text: str) -> int:
        return len(tokenizer.tokenize_str(text))

    best = _detour(matcher, probe_tokens(vocab), tokenizer, limit, tail, range(DETOURS), size)
    return best if best is not None and size(best) < tokens else None


def _detour(matcher: LLMatcher, probes: list[tuple[str, int]], tokenizer: LLTokenizer, limit: int, tail: str,
            choices, size: Callable[[str], int], first: bool = False) -> str | None:
    """The smallest (by `size`) completion among greedy walks that take another character at one of
    the free `choices` (up to DETOUR_WIDTH others each); with `first`, the smallest at the first
    choice that gives any."""
    best, best_size = None, None
    for choice in choices:
        for skip in range(1, DETOUR_WIDTH + 1):
            text, found = _greedy_walk(matcher, probes, tokenizer, limit, tail, detour=(choice, skip))
            if found is None:  # the walk makes fewer free choices than this: none further on either
                return best
            if text is None:  # no more characters to choose from there
                break
            if found:
                n = size(text)
                if best_size is None or n < best_size:
                    best, best_size = text, n
        if first and best is not None:
            break
    return best


CIRCLE_CHECK = 160  # a walk this many characters long is checked, every 16 steps, for going round


def _circling(text: str) -> int | None:
    """Where the last of three equal pieces at the end of `text` starts (the walk went round), if any.
    A piece that closes more brackets than it opens is a walk coming back out of nested values, not
    going round."""
    for size in range(4, min(96, len(text) // 3) + 1):
        piece = text[-size:]
        if text.endswith(piece * 3) and sum(map(piece.count, "{[(")) >= sum(map(piece.count, "}])")):
            return len(text) - size
    return None


def _greedy_walk(matcher: LLMatcher, probes: list[tuple[str, int]], tokenizer: LLTokenizer, limit: int,
                 tail: str, detour: tuple[int, int] | None = None,
                 notes: dict | None = None, hints: tuple[str, ...] = ()) -> tuple[str | None, bool | None]:
    """The greedy walk of `completion`.  With `detour` (k, j) its k-th free choice takes the character
    j places further down the probe order: (None, False) where there is no such character, (None,
    None) where the walk makes no k-th free choice.  With `hints`, a free choice takes the first hint
    allowed there (starting each time at the next one), if the last one did not.  A walk that goes round stops there;
    `notes["round"]` then lists the free choices of its last round."""
    picked: list[str] = []
    consumed, length, choices = 0, 0, 0
    choice_at: list[int] = []  # the text's length at each free choice
    hinted = 0  # hints written

    def result(found: bool) -> tuple[str | None, bool | None]:
        if detour is not None and choices <= detour[0]:
            return None, None
        return "".join(picked), found

    try:
        while not matcher.is_accepting():
            if length >= limit or matcher.is_error():
                return result(False)
            forced = matcher.compute_ff_tokens()
            n = matcher.try_consume_tokens(forced) if forced else 0
            if n:
                piece = tokenizer.decode_str(forced[:n])
            else:
                recent = (tail + "".join(picked[-2:]))[-2:]
                if detour is not None and choices == detour[0]:
                    piece = _probe(matcher, probes, recent, skip=detour[1])
                    if piece is None:
                        return None, False
                    n = 1
                else:
                    piece, n = (None, 0) if not hints or (picked and picked[-1] in hints) \
                        else _take_hint(matcher, hints[hinted % len(hints):] + hints[:hinted % len(hints)],
                                        tokenizer)
                    hinted += piece is not None  # the next hint choice starts at the next hint
                    if piece is None:
                        piece, n = (_probe_ending(matcher, probes) if len(picked) < ENDING_SCAN else None) \
                            or _probe(matcher, probes, recent), 1
                    if piece is None:
                        return result(False)
                choice_at.append(length)
                choices += 1
            consumed += n
            length += len(piece)
            picked.append(piece)
            if length >= CIRCLE_CHECK and len(picked) % 16 == 0:
                start = _circling("".join(picked))
                if start is not None:
                    if notes is not None:
                        notes["round"] = [k for k, at in enumerate(choice_at) if at >= start]
                    return result(False)
        return result(True)
    finally:
        if consumed:
            matcher.rollback(consumed)


def _take_hint(matcher: LLMatcher, hints: tuple[str, ...], tokenizer: LLTokenizer) -> tuple[str | None, int]:
    """Consume the first of `hints` the matcher allows next: (it, its tokens), or (None, 0)."""
    for hint in hints:
        ids = tokenizer.tokenize_str(hint)
        n = matcher.try_consume_tokens(ids)
        if n == len(ids):
            return hint, n
        if n:
            matcher.rollback(n)
    return None, 0


def _ending_pair(matcher: LLMatcher, probes: list[tuple[str, int]]) -> str | None:
    """A letter or digit and a character after which the text is complete, if there are such (the
    matcher is left where it was)."""
    for c, token in probes:
        if c.isalnum() and matcher.try_consume_tokens([token]) == 1:
            try:
                found = _probe_ending(matcher, probes)
                if found is not None:
                    matcher.rollback(1)
                    return c + found
            finally:
                matcher.rollback(1)
    return None


def _probe_ending(matcher: LLMatcher, probes: list[tuple[str, int]]) -> str | None:
    """Consume a probe character after which the text is complete, if there is one."""
    for c, token in probes:
        if matcher.try_consume_tokens([token]) == 1:
            if matcher.is_accepting():
                return c
            matcher.rollback(1)
    return None


def _probe(matcher: LLMatcher, probes: list[tuple[str, int]], recent: str, skip: int = 0) -> str | None:
    """Consume the first probe character the matcher allows, one that the last two picks were only if
    nothing else fits (so that `a+b` is not `aaaa...`); None if none fits.  `skip`: the character that
    many places further down that order instead."""
    if skip:
        allowed = []
        for c, token in probes:
            if matcher.try_consume_tokens([token]) == 1:
                matcher.rollback(1)
                allowed.append((c, token))
        allowed.sort(key=lambda pick: recent == pick[0] * 2)  # stable: a third repeat comes last
        if skip >= len(allowed):
            return None
        c, token = allowed[skip]
        matcher.try_consume_tokens([token])
        return c
    for avoid_repeats in (True, False):
        for c, token in probes:
            if avoid_repeats and recent == c + c:
                continue
            if matcher.try_consume_tokens([token]) == 1:
                return c
    return None


def packed(matcher: LLMatcher, size: int, into: np.ndarray | None = None) -> np.ndarray:
    """The matcher's allowed-token bitmask, 32 tokens per int32 word (written `into` a scratch
    buffer of shape (1, words) when given)."""
    words = np.empty((1, -(-size // 32)), dtype=np.int32) if into is None else into
    # the engine writes every word; called directly, without the checks of `fill_next_token_bitmask`
    # (a few microseconds, and this runs several times a step).  The address comes through ctypes:
    # `__array_interface__` builds a dictionary and costs ten times as much.
    matcher.unsafe_compute_mask_ptr(ctypes.addressof(ctypes.c_char.from_buffer(words)), words.nbytes)
    return words[0]


_SCRATCH: dict[int, np.ndarray] = {}


def scratch(size: int) -> np.ndarray:
    """A reusable bitmask buffer for look-ahead masks that are read once and dropped."""
    found = _SCRATCH.get(size)
    if found is None:
        found = _SCRATCH[size] = llnp.allocate_token_bitmask(1, size)
    return found


def bitmask(matcher: LLMatcher, size: int) -> np.ndarray:
    """The matcher's allowed-token bitmask unpacked to one bool per token."""
    return unpack(packed(matcher, size), size)


def _text_words(vocab: Vocabulary) -> np.ndarray:
    """The text tokens (not special, not end-of-text), packed as the engine packs its masks."""
    def build() -> np.ndarray:
        ok = ~vocab.special
        ok[list(vocab.eos_ids)] = False
        return pack(ok)

    return vocab.derived(_text_words, build)


def _eos_ids(vocab: Vocabulary) -> np.ndarray:
    return vocab.derived(_eos_ids, lambda: np.array(sorted(vocab.eos_ids), dtype=np.int64))


def _few_limit(vocab: Vocabulary) -> int:
    """Up to this many allowed tokens (end-of-text and a few more beside WIDE), a step is looked ahead of."""
    return WIDE + len(vocab.eos_ids) + 8


def _search_limit(left: int) -> int:
    """The characters a completion search may write with `left` tokens left: 6 a token."""
    return 6 * left + 16


class Structured(TokenConstraint):
    """A regex, Lark grammar or JSON schema compiled by llguidance, as a token constraint.

    `final_check(text) -> bool`, when given, must also accept the complete text before it may end
    (end-of-text is masked by it): that makes a mask that over-approximates exact.
    """

    stateful = True  # keeps per-context state: judged with the context, not through views

    def __init__(self, grammar: str, describe: str, *, allow_eos: bool = True,
                 final_check: Callable[[str], bool] | None = None,
                 locate: Callable[[str], str] | None = None):
        self.grammar, self.describe, self.allow_eos, self.final_check = grammar, describe, allow_eos, final_check
        locate = locate or (lambda message: f"{describe}: {message}")
        error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
        if error:
            raise SteerError(locate(_detail(messages[0])))
        self.warnings = [locate(_first_line(m)) for m in messages]
        self._start: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._healed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._byte_start: LLMatcher | None = None  # for model-free checks (`allows`)
        self.key = object()  # this constraint's slot in a context's states
        # literal pieces of its regular expressions (`.tpk` of `^file:.+\.tpkx?$`): where the greedy
        # completion search writes on for ever inside such a pattern, it tries them (see `completion`)
        self.hints: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return self.describe

    def __deepcopy__(self, memo):  # an immutable spec shared by every particle
        return self

    # -- per-context state --------------------------------------------------------------------------
    def matcher(self, vocab: Vocabulary) -> LLMatcher:
        """A fresh matcher at the start of the text (compiled once per vocabulary)."""
        start = self._start.get(vocab)
        if start is None:
            tokenizer = ll_tokenizer(vocab)
            start = LLMatcher(tokenizer, self.grammar, log_level=0)
            if start.is_error():
                raise SteerError(f"{self.describe}: {_first_line(start.get_error())}")
            self._start[vocab] = start
        return start.deep_copy()

    def state(self, context) -> MatcherState:
        """`context`'s matcher state, moved up to its generated tokens (forked first if shared)."""
        states = context.constraint_states
        state = states.get(self.key)
        vocab = context.lm.vocab
        if state is None:
            state = MatcherState(self.matcher(vocab), ll_tokenizer(vocab), context.serial)
            states[self.key] = state
        elif state.owner != context.serial:
            state = states[self.key] = state.fork(context.serial)
        tokens, start = context.tokens, context.prompt_length  # (not `generated`: a copy on every call)
        while start + state.consumed < len(tokens):
            token = tokens[start + state.consumed]
            if state.consumed == 0 and context.healed:  # only the text after the backed-off prompt counts
                state.advance_text(vocab.strings[token][len(context.healed):])
            elif token in vocab.eos_ids or (context.end_at is not None and start + state.consumed == len(tokens) - 1):
                state.consumed += 1  # the end: nothing more to read
            else:
                state.advance_token(token)
        return state

    # -- the mask -----------------------------------------------------------------------------------
    def mask(self, context) -> torch.Tensor:
        return self.allowed_in(context)

    def allowed_in(self, context) -> torch.Tensor:
        """The tokens that keep the text a prefix of an allowed text; end-of-text (and a token that
        writes an end string) only where the text before it is complete."""
        state = self.state(context)
        left = context.tokens_left
        # copies made by resampling share the state, and with it this mask (computed once per step)
        key = (state.consumed, context.tokens[-1], left == 2, context.heal, context.end, context.end_at,
               context.canonical, context.allow_special)
        if state.result is not None and state.result[0] == key:
            found = state.result[1]()
            if found is not None:
                return found
        mask = self._allowed_in(context, state, left)
        state.result = (key, weakref.ref(mask))
        return mask

    def _allowed_in(self, context, state: MatcherState, left: int | None) -> torch.Tensor:
        vocab = context.lm.vocab
        size = vocab.size
        eos = _eos_ids(vocab)
        if state.matcher.is_error():
            return torch.zeros(size, dtype=torch.bool)
        if context.ended:  # an end string was written: the text before it must be complete
            ok = np.zeros(size, dtype=bool)
            ok[eos] = self.allow_eos and self._complete(vocab, context.text)
            return torch.from_numpy(ok)
        base, few = None, None
        if context.heal:
            ok = self._healed_mask(context, state).copy()
        else:
            # intersected with the base restriction while packed; a few allowed ids are set in a
            # zeroed array, many are unpacked in one pass
            base = base_words(context)
            within = None if base is None else base[1]
            words = state.within(within)
            few = state.few(_few_limit(vocab), within, words)
            if few is None:
                ok = unpack(words, size)
            else:
                ok = np.zeros(size, dtype=bool)
                ok[few] = True
        ok[eos] = self.allow_eos and state.matcher.is_accepting() and self._final_of(context)
        if context.end:
            for ended, ids in ending_tokens(context).items():  # the text before an end string must be complete
                extra = ended[len(context.text):] if len(ended) >= len(context.text) else None
                good = extra is not None and state.accepts(extra) and self._final(ended)
                ok[ids] = good if base is None else good & bits_at(base[1], ids)
        canon = canonical_filter(context)
        # (with very many tokens allowed nothing is looked ahead of: drawn tokens are checked instead;
        # a forced token is kept: dropping it would only end the particle a step earlier)
        if (canon is not None or left == 2) and (context.heal or (few is not None and (len(few) > 1 or left == 2))):
            ok = self._look_ahead(context, state, ok, canon, left == 2, few)
        mask = torch.from_numpy(ok)
        if base is not None:
            mask.within = base[0]  # (see `target.restricted`)
        return mask

    def _final_of(self, context) -> bool:
        """The final check on the context's text (decoded only when there is a check)."""
        return self.final_check is None or self.final_check(context.text)

    def _complete(self, vocab: Vocabulary, text: str) -> bool:
        """Whether `text` is a complete text, read by a fresh matcher."""
        m = self.matcher(vocab)
        return m.consume_tokens(ll_tokenizer(vocab).tokenize_str(text)) and m.is_accepting() and self._final(text)

    def _final(self, text: str) -> bool:
        return self.final_check is None or self.final_check(text)

    def _healed_mask(self, context, state: MatcherState) -> np.ndarray:
        """While healing is pending: tokens that start with the backed-off prompt text, judged by the
        text they add after it (computed once per prompt ending: every particle starts there)."""
        vocab, pending = context.lm.vocab, context.heal
        cache = self._healed.setdefault(vocab, {})
        if pending not in cache:
            ok = np.zeros(vocab.size, dtype=bool)
            for i in TokenTable.of(vocab).starting_with(pending):
                ok[i] = state.can_follow(vocab.strings[i][len(pending):])
            cache[pending] = ok
        return cache[pending]

    def _look_ahead(self, context, state: MatcherState, ok: np.ndarray, canon: Canonical | None,
                    last_but_one: bool, few: np.ndarray | None) -> np.ndarray:
        """Drop tokens that lead nowhere: when few tokens are allowed, those after which no allowed token
        keeps the tokenization canonical; before the budget's last token, those after which the text
        cannot end.  Dropping them changes no weight the target gives a complete text."""
        vocab = context.lm.vocab
        # when the engine allows very many tokens, nothing is checked (nor is the vocabulary scanned)
        if canon is None and not last_but_one:
            return ok
        ids = np.flatnonzero(ok) if context.heal else few
        if ids is None:  # very many allowed: drawn tokens are checked instead (see `token_check`)
            return ok
        if len(ids) <= 1 and not last_but_one:  # a forced token (see below: one candidate is kept)
            return ok
        candidates = ids[ok[ids] & ~vocab.special[ids]]
        for ending in ending_tokens(context).values():
            candidates = np.setdiff1d(candidates, ending)  # judged already, as the end of the text
        budget = last_but_one and len(candidates) <= BUDGET_CHECK
        if not budget:
            if canon is None or len(candidates) <= 1:  # one candidate: dropping it only kills a step earlier
                return ok
            if len(candidates) > LOOK_AHEAD:
                # A dead end needs a continuation that must merge with the token: " " before "CA" where
                # " CA" is a token.  Among many, check the tokens that begin another allowed one.
                candidates = TokenTable.of(vocab).prefixes_among(candidates)[:LOOK_AHEAD]
                if not len(candidates):
                    return ok
        m, pending = state.matcher, context.heal
        keep = None if pending else state.keep_ahead()
        for x in candidates.tolist():
            if not (pending or budget):
                ok[x] = bool(self._continues(m, vocab, canon, x, keep))
                continue
            # what the matcher reads for x: while healing, the text x adds after the backed-off prompt
            ids = state.tokenizer.tokenize_str(vocab.strings[x][len(pending):]) if pending else [x]
            n = m.try_consume_tokens(ids)
            if n < len(ids):
                alive = False
            elif budget:  # the last token must end the text
                alive = self._may_end_next(m, context, context.text + vocab.strings[x][len(pending):])
            else:
                alive = self._lives(m, vocab, canon, x, DEPTH, keep)
            if n:
                m.rollback(n)
            ok[x] = alive
        return ok

    def _may_end_next(self, m: LLMatcher, context, text: str) -> bool:
        """Whether the text `m` has read (`text`) can end with its next token (see `can_end_next`)."""
        tokenizer = ll_tokenizer(context.lm.vocab)

        def complete(longer: str) -> bool:  # `m` reads what `longer` adds to `text`, and is left where it was
            ids = tokenizer.tokenize_str(longer[len(text):]) if len(longer) > len(text) else []
            n = m.try_consume_tokens(ids)
            accepting = n == len(ids) and m.is_accepting()
            if n:
                m.rollback(n)
            return accepting and self._final(longer)

        return can_end_next(context, text, complete)

    def _continues(self, m: LLMatcher, vocab: Vocabulary, canon: Canonical, x: int,
                   keep: dict[int, np.ndarray] | None = None) -> bool | None:
        """Whether `m` may read token `x` and then go on canonically (see `_lives`); None: it may not
        read `x`.  The probes are validated from where `m` stands, without reading `x`: reading a token
        that closes an object costs the engine tens of microseconds, validating one about one."""
        if any(m.validate_tokens([x, y]) == 2 for y in _probes_after(vocab, canon, x)):
            return True
        if not m.try_consume_tokens([x]):
            return None
        try:
            return self._lives(m, vocab, canon, x, DEPTH, keep, probed=True)
        finally:
            m.rollback(1)

    def _lives(self, m: LLMatcher, vocab: Vocabulary, canon: Canonical, last: int, depth: int,
               keep: dict[int, np.ndarray] | None = None, probed: bool = False) -> bool:
        """Whether, after token `last`, some allowed token keeps the tokenization canonical (or the text
        may end), following forced choices `depth` tokens deep.  Past a real choice one canonical
        continuation is enough.  `keep` receives the mask after `last` (the next step's, should `last` be
        drawn); `probed`: the probes after `last` were tried already."""
        if self.allow_eos and m.is_accepting():
            return True
        # Most tokens are followed canonically by a closer or a comma: a few one-token probes settle them
        # without the engine's whole mask (a probe that fits counts as a real choice: it is not followed
        # deeper, which only ever keeps a token the deeper look would have dropped: no weight changes).
        if not probed and any(m.validate_tokens([y]) for y in _probes_after(vocab, canon, last)):
            return True
        words = packed(m, vocab.size) if keep is not None else packed(m, vocab.size, scratch(vocab.size))
        if keep is not None:
            keep[last] = words
        # the allowed text tokens that may follow `last` canonically, as one AND of packed masks
        canonical = np.bitwise_and(words, canon.after_words(last))
        canonical &= _text_words(vocab)
        # (followed only through a narrow choice: at most LOOK_AHEAD tokens allowed, NARROW canonical)
        ys = few_ids(canonical, NARROW) if depth and np.count_nonzero(words) <= LOOK_AHEAD else None
        if ys is None or not len(ys):
            return bool(canonical.any())  # none, or past a real choice: one canonical continuation is enough
        for y in ys.tolist():
            if m.consume_token(y):
                alive = self._lives(m, vocab, canon, y, depth - 1)
                m.rollback(1)
                if alive:
                    return True
        return False

    # -- the budget ---------------------------------------------------------------------------------
    def need(self, matcher: LLMatcher, vocab: Vocabulary, tokenizer: LLTokenizer, left: int,
             canon: Canonical | None = None, last: int | None = None, tail: str = "",
             within: int | None = None) -> int | None:
        """Tokens still needed to end the text from `matcher`'s position, the ending token included:
        the length of a greedy completion, an upper bound (None when none is found within 6
        characters a token: the search went round in circles or got stuck, so nothing is known).
        With `canon`: one more where the completion's first token cannot canonically follow `last`
        (after ` "` an empty string cannot close with `"`: ` ""` is one token).  With `within`: where
        the greedy completion needs more than that, a shorter one is looked for before saying so."""
        limit = _search_limit(left)
        text, found = completion(matcher, vocab, tokenizer, limit, tail, self.hints)
        ids = tokenizer.tokenize_str(text) if found else None
        if within is not None and (ids is None or len(ids) + 1 > within):
            shorter = shorter_completion(matcher, vocab, tokenizer, limit, tail, limit if ids is None else len(ids))
            if shorter is not None:
                ids = tokenizer.tokenize_str(shorter)
        if ids is None:
            return None
        clash = bool(ids) and canon is not None and last is not None and not canon.before(ids[0])[last]
        return len(ids) + 1 + clash

    def _remembered_need(self, vocab: Vocabulary, key: tuple, compute: Callable[[], int | None]) -> int | None:
        """`compute()`, a completion search, remembered by what determines it (the grammar, the tokens
        read, the budget): particles that share a prefix (all of them at a forced start, many after
        resampling) and runs of the same program ask the same questions."""
        memo = recent(vocab, "completion needs", 8192)
        key = (self.grammar, self.hints, *key)
        found = memo.recall(key, memo)
        return memo.keep(key, compute()) if found is memo else found

    def token_check(self, context) -> Callable[[int], bool] | None:
        """Checks of a drawn token that the mask cannot afford to make for every token (each costs tens
        to hundreds of microseconds), applied by adaptive rejection so the weight stays exact: that
        the token leaves room to end within the budget, and, where very many tokens are allowed, that
        some canonical token can follow it.  None: nothing to check; NOTHING_FITS: the text cannot end
        in the budget whatever comes next."""
        fits = self._budget_check(context)
        return fits if fits is NOTHING_FITS else all_of([fits, self._continues_check(context)])

    def _continues_check(self, context) -> Callable[[int], bool] | None:
        """Where very many tokens are allowed the mask was not looked ahead of: a drawn token must have a
        canonical continuation (`"` then `,`: `",` is one token).  The mask after it, computed here, is
        the next step's if it is kept."""
        canon = canonical_filter(context)
        if canon is None or context.heal or context.ended:
            return None
        state, vocab = self.state(context), context.lm.vocab
        base = base_words(context)
        if state.few(_few_limit(vocab), None if base is None else base[1]) is not None:
            return None  # few allowed: the mask was looked ahead of
        # (the text is decoded only where an end string could be written: it is all `end_position` reads)
        m, keep, text = state.matcher, state.keep_ahead(), context.text if context.end else ""

        def continues(token: int) -> bool:
            if token in vocab.eos_ids or vocab.special[token] or context.end_position(text, vocab.strings[token]) \
                    is not None:
                return True  # judged by the mask
            alive = self._continues(m, vocab, canon, token, keep)
            return alive is None or alive  # (None: not allowed at all, judged by the mask)

        return continues

    def _budget_check(self, context) -> Callable[[int], bool] | None:
        """With a token budget: a check that a next token leaves room to end the text, i.e. that a
        completion after it fits in the tokens then left (None: nothing to check)."""
        left = context.tokens_left
        if left is None or left < 2 or not self.allow_eos or context.ended:
            return None
        state = self.state(context)
        vocab, m, tokenizer = context.lm.vocab, state.matcher, state.tokenizer
        canon = canonical_filter(context)
        # (a greedy completion can be a token or two off where it meets the text before it: keep that
        # much room until the budget's last few tokens)
        room = left - 1 - (MARGIN if left - 1 > END_GAME else 0)
        # what the matcher has read: every particle with the same tokens is in the same state
        position = (tuple(context.tokens[context.prompt_length:]), context.healed, context.heal, canon is None)
        if not context.heal:
            need = self._remembered_need(vocab, (position, left), lambda: self.need(
                m, vocab, tokenizer, left, canon, context.tokens[-1] if state.consumed else None,
                context.text[-2:], within=left))
            if need is not None and need > left:
                if state.consumed == 0:  # a budget no text fits is reported before sampling
                    raise SteerError(f"{self.describe}: no text it allows was found that fits in max_tokens "
                                     f"({left} tokens, the ending one included); raise max_tokens")
                return NOTHING_FITS
            if need is not None and need > room + 1:
                room = need - 1  # already inside the margin: a token that brings the end closer fits
            if need is not None and need + FAR < room:
                # Far from the end, nothing is checked: a token that adds more than FAR tokens to the
                # shortest completion is rare, and the particle then dies a few steps later, where the
                # check sees that nothing fits (a wasted particle, not a biased weight).
                return None
        text, pending = context.text, context.heal

        def fits(token: int) -> bool:
            if token in vocab.eos_ids or vocab.special[token]:
                return True  # judged by the mask
            s = vocab.strings[token]
            s = s[len(pending):] if pending and s.startswith(pending) else s
            if context.end_position(text, s) is not None:
                return True  # writes an end string: judged by the mask
            ids = tokenizer.tokenize_str(s) if pending else [token]
            n = m.try_consume_tokens(ids)
            try:
                if n < len(ids):
                    return True  # not allowed at all: the mask leaves it out
                if left == 2:  # the next token is the last: known exactly, not searched for
                    return self._may_end_next(m, context, text + s)
                need = self._remembered_need(vocab, (position, token, left - 1, room), lambda: self.need(
                    m, vocab, tokenizer, left - 1, canon, token, (text + s)[-2:], within=room))
                return need is None or need <= room
            finally:
                if n:
                    m.rollback(n)

        def candidates() -> list[int]:
            """The tokens that begin a short completion: where the budget leaves only those, they can lie
            too far down the LM's list for adaptive rejection to reach (see `checks.awrs`)."""
            found, complete = completion(m, vocab, tokenizer, _search_limit(left), text[-2:], self.hints)
            by_string = TokenTable.of(vocab).by_string
            return [i for k in range(1, min(len(found), 16) + 1) for i in by_string.get(found[:k], [])] \
                if complete else []

        if not pending:
            fits.candidates = candidates
        return fits

    def done(self, context) -> bool:
        """The text is complete and the grammar allows nothing more: a program can finish here."""
        state = self.state(context)
        return state.matcher.is_accepting() and not state.allowed()[~context.lm.vocab.special].any() \
            and self._final(context.text)

    def allows(self, text: str, complete: bool = False) -> bool:
        """Whether `text` is a prefix of an allowed text (with `complete`: an allowed text), checked
        byte by byte without a model."""
        if self._byte_start is None:  # compiled once; each check reads a copy
            self._byte_start = LLMatcher(_byte_tokenizer(), self.grammar, log_level=0)
        m = self._byte_start.deep_copy()
        data = list(text.encode("utf-8"))
        if m.validate_tokens(data) != len(data):
            return False
        if not complete:
            return True
        return m.consume_tokens(data) and m.is_accepting() and self._final(text)

    def matches(self, text: str) -> bool:
        """Whether `text` is a complete text."""
        return self.allows(text, complete=True)


def _detail(message: str) -> str:
    """The informative line of an engine error ("error: unclosed group" rather than its position)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    first = lines[0] if lines else "invalid"
    at = re.match(r"at (\d+)\((\d+)\): (.*)", first)
    return f"{at.group(3)} (grammar line {at.group(1)}, column {at.group(2)})" if at else first


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "invalid"


_BYTES: list[LLTokenizer] = []


def _byte_tokenizer() -> LLTokenizer:
    """A 256-token byte vocabulary (plus an end token): checks text without a model."""
    if not _BYTES:
        class _Bytes:
            eos_token_id = 256
            bos_token_id = None
            tokens = [bytes([b]) for b in range(256)] + [b"\xff<eos>"]
            special_token_ids = [256]

            def __call__(self, data: bytes) -> list[int]:
                return list(data)

        _BYTES.append(LLTokenizer(TokenizerWrapper(_Bytes()), n_vocab=257, eos_token=256))
    return _BYTES[0]


# -- constructors -------------------------------------------------------------------------------------
def regex(pattern: str, allow_eos: bool = True) -> Structured:
    """The generated text matches `pattern` in full by the time it ends (Rust `regex` syntax: classes,
    `\\p{..}`, repetition; a leading `^` and trailing `$` are implied)."""
    body = without_anchors(pattern)

    def explain(message: str) -> str:
        hint = " (partial_regex checks look-around, back-references and atomic groups)" \
            if any(w in message for w in ("look", "backreference", "not supported", "unrecognized flag")) else ""
        return f"invalid regular expression {pattern!r}: {message}{hint}"

    constraint = Structured(LLMatcher.grammar_from_regex(body), f"regex({pattern!r})", allow_eos=allow_eos,
                            locate=explain)
    constraint.hints = literal_runs([pattern])
    return constraint


def literal_runs(patterns: list[str], most: int = 8) -> tuple[str, ...]:
    """The runs of two or more literal characters that a match of each pattern must contain (`file:`
    and `.tpk` of `^file:.+\.tpkx?$`; an optional character ends a run), at most `most` of them."""
    runs: dict[str, None] = {}
    for pattern in patterns:
        run, i = "", 0
        while i < len(pattern):
            c = pattern[i]
            literal = None
            if c == "\\" and i + 1 < len(pattern):
                nxt, i = pattern[i + 1], i + 2
                if not nxt.isalnum():
                    literal = nxt
                elif nxt in "pP" and pattern[i:i + 1] == "{":  # \p{Letter}
                    i = pattern.find("}", i) + 1 or len(pattern)
            elif c == "[":  # a class: skip it, escapes and a leading ] included
                i += 2 if pattern[i + 1:i + 2] in ("]", "^") else 1
                while i < len(pattern) and pattern[i] != "]":
                    i += 2 if pattern[i] == "\\" else 1
                i += 1
            elif c == "(" and pattern[i + 1:i + 2] == "?":  # (?:  (?i)  (?P<name>  (?=: past the group's flags
                i += 2
                while i < len(pattern) and pattern[i] not in ":)>=!":
                    i += 1
                i += 1
            elif c in "?*{":  # the character before is optional (or counted): it leaves the run
                if c == "{":
                    counted = pattern[i:pattern.find("}", i) + 1 or len(pattern)]
                    i += len(counted)
                    run = run[:-1] if counted.startswith(("{0", "{,")) else run
                else:
                    run, i = run[:-1], i + 1
            else:
                i += 1
                literal = c if c not in ".^$|()+" else None
            if literal is None:
                if len(run) >= 2:
                    runs.setdefault(run)
                run = ""
            else:
                run += literal
        if len(run) >= 2:
            runs.setdefault(run)
    return tuple(runs)[:most]


def search(pattern: str, allow_eos: bool = True) -> Structured:
    """The generated text contains a match of `pattern` (what `re.search` finds)."""
    return regex(f"(?s:.*)(?:{pattern})(?s:.*)", allow_eos)


def without_anchors(pattern: str) -> str:
    """The pattern without a leading ^ / \\A or a trailing $ / \\z / \\Z: the whole text must match
    anyway, so they mean nothing here."""
    for head in ("^", "\\A"):
        if pattern.startswith(head):
            pattern = pattern[len(head):]
    for tail in ("$", "\\z", "\\Z"):
        if pattern.endswith(tail) and not pattern.endswith("\\" + tail):
            pattern = pattern[: -len(tail)]
    return pattern


def grammar(text: str, start: str = "start", allow_eos: bool = True) -> Structured:
    """The generated text is a sentence of a Lark grammar, in llguidance's Lark dialect (terminals are
    Rust regular expressions; `%ignore`, `%import common` and regex / JSON-schema terminals work)."""
    if start != "start":
        text = f"start: {start}\n{text}"
    return Structured(LLMatcher.grammar_from_lark(text), f"grammar({text[:40]!r}...)", allow_eos=allow_eos,
                      locate=lambda m: f"invalid Lark grammar: {m}")


def json_schema(schema: dict | str | bool, *, lenient: bool = False, key_order: str = "schema",
                allow_eos: bool = True) -> Structured:
    """The generated text is a JSON document valid under `schema` (JSON Schema, drafts 4 to 2020-12),
    written as `json.dumps` writes it.

    The mask comes from llguidance's schema compiler.  A keyword it does not implement is an error
    naming the keyword and where it is; with `lenient=True` the schema is compiled without it and the
    complete text must also pass `jsonschema` validation before it may end, so the target is still
    exactly "valid under the schema".

    Integers without bounds stay within +-(2**53 - 1), the range every JSON reader holds exactly
    (RFC 8259, section 6), so that they cannot run on forever.

    `key_order`: "schema" (llguidance's design: the keys of `properties` come in the schema's order,
    so the mask also enforces `required`) or "any" (keys in any order; `required` and duplicate keys
    are then left to the final check, so particles that close an object early die at the end).
    In a free-form object (`{}`, or keys beyond `properties`) the engine cannot track the keys written,
    so one may come twice: JSON allows it, and readers keep the last (as `json.loads` does)."""
    if key_order not in ("schema", "any"):
        raise SteerError(f'key_order is "schema" or "any", got {key_order!r}')
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise SteerError(f"the JSON schema is not valid JSON: {e}") from None
        except RecursionError:
            raise SteerError(f"the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep") from None
    if not isinstance(schema, (dict, bool)):
        raise SteerError(f"a JSON schema is an object (or true / false), got {type(schema).__name__}")
    if schema is False:
        raise SteerError("the JSON schema `false` allows no document")
    _check_depth(schema)
    check = schema_validator(schema, unique_keys=key_order == "any")
    options = dict(JSON_FORMAT, lenient=lenient)
    masked = _interoperable_integers(_any_key_order(schema) if key_order == "any" else schema)
    masked = {} if masked is True else masked  # `true`: any document
    values = _finite_values(schema, schema)
    if values is not None:  # a few candidates: the valid ones are the mask, exactly, whatever else is said
        valid = [v for v in values if check(json.dumps(v))]
        if not valid:
            raise SteerError("the JSON schema allows no document: none of the values it lists is valid")
        masked, lenient = {"enum": valid}, False
    try:
        compiled = LLMatcher.grammar_from_json_schema(json.dumps(masked), overrides=options)
    except ValueError as e:
        raise SteerError(f"cannot use this JSON schema: {_first_line(str(e))}") from None
    describe = f"json_schema({_short(schema)})"
    constraint = Structured(compiled, describe, allow_eos=allow_eos,
                            locate=lambda m: f"JSON schema: {_locate(schema, m)}")
    if (lenient and constraint.warnings) or key_order == "any":
        constraint.final_check = check
    constraint.schema = schema
    constraint.hints = literal_runs(_patterns(schema))
    return constraint


def _patterns(node: Any) -> list[str]:
    """Every `pattern` in a schema (the regular expressions string values must match)."""
    found, stack = [], [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                found.append(node["pattern"])
            stack.extend(v for k, v in node.items() if k not in _DATA_KEYS)
        elif isinstance(node, list):
            stack.extend(node)
    return found


FINITE_VALUES = 1000  # at most this many candidate values are checked one by one


def _finite_values(node: Any, root: Any, depth: int = 0) -> list | None:
    """A finite list of values that holds every document valid under `node`, where the schema says so
    plainly (`enum`, `const`, `anyOf`/`oneOf` of such, `allOf` with one such, a local `$ref` to one),
    else None.  Checked one by one with `jsonschema`, the valid ones make an exact mask whatever other
    keywords (`if`/`then`, `not`, `multipleOf` on items) narrow them further."""
    if not isinstance(node, dict) or depth > 32:
        return None
    if "const" in node:
        return [node["const"]]
    if isinstance(node.get("enum"), list):
        return node["enum"][:FINITE_VALUES] if len(node["enum"]) <= FINITE_VALUES else None
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target = root
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        found = _finite_values(target, root, depth + 1)
        if found is not None:
            return found
    for branch in node.get("allOf") or []:
        found = _finite_values(branch, root, depth + 1)
        if found is not None:
            return found
    for key in ("anyOf", "oneOf"):
        branches = node.get(key)
        if isinstance(branches, list) and branches:
            union: dict[str, Any] = {}  # by their JSON text: 1 and true are different values
            for branch in branches:
                found = _finite_values(branch, root, depth + 1)
                if found is None or len(union) + len(found) > FINITE_VALUES:
                    break
                union.update((json.dumps(v, sort_keys=True), v) for v in found)
            else:
                return list(union.values())
    return None


MAX_SCHEMA_DEPTH = 200  # nesting levels of a schema (objects and lists), checked before any recursion


def _check_depth(schema: Any) -> None:
    """Refuse a schema nested deeper than MAX_SCHEMA_DEPTH, without recursing into it."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise SteerError(f"the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


_DATA_KEYS = frozenset({"enum", "const", "default", "examples", "required"})  # values that are not schemas
# maps from names (which may be spelt like keywords: a property called "required") to schemas
_NAMED = frozenset({"properties", "patternProperties", "definitions", "$defs", "dependentSchemas"})


def _each(mapping: Any, transform: Callable[[Any], Any]) -> Any:
    return {k: transform(v) for k, v in mapping.items()} if isinstance(mapping, dict) else mapping


_COUNTS = frozenset({"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
                     "minContains", "maxContains"})
SAFE_INTEGER = 2**53 - 1  # RFC 8259, section 6: the integers every JSON reader holds exactly


def _interoperable_integers(node: Any) -> Any:
    """`node` with integers that have no bound on a side bounded there by +-(2**53 - 1), so that an
    integer cannot run on forever (at most 16 digits)."""
    if isinstance(node, list):
        return [_interoperable_integers(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _each(v, _interoperable_integers) if k in _NAMED else v if k in _DATA_KEYS
           else _interoperable_integers(v) for k, v in node.items()}
    for key in _COUNTS & out.keys():  # 2.0 is the integer 2 in JSON Schema, not in llguidance
        if isinstance(out[key], float) and out[key].is_integer():
            out[key] = int(out[key])
    kinds = out.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "integer" in kinds and "number" not in kinds:
        if "minimum" not in out and not isinstance(out.get("exclusiveMinimum"), (int, float)):
            out["minimum"] = -SAFE_INTEGER
        if "maximum" not in out and not isinstance(out.get("exclusiveMaximum"), (int, float)):
            out["maximum"] = SAFE_INTEGER
    return out


def _any_key_order(node: Any) -> Any:
    """`node` with every `properties` moved into `patternProperties` (anchored exact keys), which
    llguidance lets come in any order; `required` is left to the final check."""
    if isinstance(node, list):
        return [_any_key_order(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _each(v, _any_key_order) if k in _NAMED else v if k in _DATA_KEYS else _any_key_order(v)
           for k, v in node.items() if k != "required"}
    properties = out.pop("properties", None)
    if isinstance(properties, dict):

        patterns = dict(out.get("patternProperties") or {})
        for key, sub in properties.items():
            patterns["^" + re.escape(key) + "$"] = sub
        out["patternProperties"] = patterns
    return out


def schema_validator(schema: Any, unique_keys: bool = False) -> Callable[[str], bool]:
    """`text -> bool`: the text is one JSON document valid under `schema` (the `jsonschema` package),
    read as `json.loads` reads it; with `unique_keys`, no key may come twice in one object."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    # Against the meta-schema without format checks: a `pattern` in Rust / ECMA syntax (`\p{Letter}`)
    # is not Python's, and is no error.
    error = jsonschema.exceptions.best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    if error is not None:
        where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.path)
        raise SteerError(f"invalid JSON schema at {where}: {error.message}")
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)

    def valid(text: str) -> bool:
        try:
            value = json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
        except (ValueError, RecursionError):
            return False
        try:
            return validator.is_valid(value)
        except (jsonschema.exceptions.RefResolutionError, RecursionError):  # unresolvable: not valid
            return False

    return valid


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _short(schema: Any) -> str:
    text = json.dumps(schema)
    return text if len(text) <= 60 else text[:57] + "..."


def _locate(schema: Any, message: str) -> str:
    """The engine's message with the JSON path of the keyword it names ("Unimplemented keys: [...]")."""

    found = re.search(r'Unimplemented keys: \["([^"]+)"', message) or re.search(r"Unknown format: (\S+)", message)
    if not found:
        return message
    name = found.group(1)
    key = name if "Unimplemented" in message else "format"
    path = _find_key(schema, key, name if key == "format" else None, "$")
    return f"{message} at {path} (lenient=True compiles without it and validates the result)" if path else message


def _find_key(node: Any, key: str, value: Any, path: str) -> str | None:
    if isinstance(node, dict):
        if key in node and (value is None or node[key] == value):
            return path
        for k, v in node.items():
            found = _find_key(v, key, value, f"{path}.{k}")
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _find_key(v, key, value, f"{path}[{i}]")
            if found:
                return found
    return None


__all__ = ["Structured", "MatcherState", "grammar", "json_schema", "regex", "search", "ll_tokenizer",
           "schema_validator", "llguidance"]
