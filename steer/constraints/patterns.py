"""Regular expressions and JSON Schema as token masks.

`regex`, `search` and `json_schema` are llguidance's (see `steer.constraints.engine`).  `automaton`
is steer's own token-level automaton, kept for exact token budgets on small regular languages:

`interegular` compiles a regular expression to a character automaton (DFA).  The token-level
automaton is then computed here, vectorised: every token of the vocabulary is walked through the DFA
at once (one table lookup per character position over a token x position matrix of character
classes), so the allowed set of a DFA state costs a few milliseconds even for Gemma's 262k tokens,
and each state's mask is cached.

Patterns beyond regular languages (look-around, back-references) cannot be automata; for them
`steer.checks.partial_regex` checks candidate tokens with the `regex` module's partial matching.
"""

from __future__ import annotations

import contextlib
import time
import weakref

import numpy as np
import regex as regex_module
import torch

from ..errors import SteerError
from ..lm.base import Vocabulary
from . import engine
from .base import Context
from .masks import TokenConstraint
from .target import canonical_filter
from .tokens import TokenTable

_LOOK_AHEAD = 48  # look-ahead checks pairs one by one when either side has at most this many tokens
_DEPTH = 4  # and follows narrow continuations this many tokens deep
_HORIZON = 64  # a token budget further than this from its end is not checked (a match fits anyway)
_WIDTH = 32  # token characters walked in the vectorised pass; longer tokens are walked one by one
def _codepoints(vocab: Vocabulary):
    """Per vocabulary: a (tokens x _WIDTH) matrix of code points (-1 pads) with rows sorted by
    decreasing length, the tokens that can be walked (text tokens without broken UTF-8), the ids of
    the longer ones, the row order, per column how many rows reach it, and the text tokens that add no
    text (in a view of the vocabulary, a token that is exactly a healed prompt's text)."""

    def build():
        table = TokenTable.of(vocab)
        n = vocab.size
        matrix = np.full((n, _WIDTH), -1, dtype=np.int32)
        lengths = np.zeros(n, dtype=np.int32)
        usable = table.text.copy()
        empty = np.zeros(n, dtype=bool)
        long_ids = []
        for i, s in enumerate(vocab.strings):
            empty[i] = usable[i] and not s
            if not usable[i] or not s or "\ufffd" in s:
                usable[i] = False
                continue
            if len(s) > _WIDTH:
                long_ids.append(i)
                continue
            matrix[i, : len(s)] = [ord(ch) for ch in s]
            lengths[i] = len(s)
        # Rows sorted by decreasing length, so column j is walked only for the tokens that long.
        order = np.argsort(-lengths, kind="stable")
        counts = np.array([(lengths > j).sum() for j in range(_WIDTH)])
        return matrix[order], usable, np.array(long_ids, dtype=np.int64), order, counts, empty

    return vocab.derived(_codepoints, build)


AUTOMATON_SECONDS = 5.0  # a pattern whose automaton takes more CPU time to build is refused


class _TooLarge(Exception):
    pass


@contextlib.contextmanager
def _bounded_construction(seconds: float):
    """interegular builds automata by crawling states (`interegular.fsm.crawl`); a pattern such as
    `.*a.{30}` has 2**30 of them.  Within this block every crawl stops with `_TooLarge` once `seconds`
    have passed, so building an automaton is bounded in time, and with it in memory."""
    import interegular.fsm as fsm

    original, deadline = fsm.crawl, time.process_time() + seconds

    def crawl(alphabet, initial, final, follow):
        def bounded(state, transition):
            if time.process_time() > deadline:
                raise _TooLarge
            return follow(state, transition)

        return original(alphabet, initial, final, bounded)

    fsm.crawl = crawl
    try:
        yield
    finally:
        fsm.crawl = original


class _Automaton:
    """A regular expression's DFA, with a dead state and the states from which a match is reachable."""

    def __init__(self, pattern: str):
        import interegular
        from interegular.fsm import anything_else

        try:
            with _bounded_construction(AUTOMATON_SECONDS):  # CPU seconds: the same on a loaded machine
                fsm = interegular.parse_pattern(engine.without_anchors(pattern)).to_fsm()
        except _TooLarge:
            raise SteerError(
                f"regex({pattern!r}) is too large for a token automaton (not built within "
                f"{AUTOMATON_SECONDS:g} s); partial_regex(...) checks it by rejection sampling instead"
            ) from None
        except Exception as e:  # noqa: BLE001 - interegular raises several types for what it cannot handle
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SteerError(
                f"regex({pattern!r}) cannot be compiled to a token automaton ({reason}); "
                "partial_regex(...) accepts every pattern of the `regex` module (look-around, "
                "back-references, \\p{...} classes) and checks it by rejection sampling"
            ) from None
        states = sorted(fsm.states)
        number = {s: k for k, s in enumerate(states)}
        self.dead = len(states)
        classes = max(fsm.alphabet.by_transition) + 1
        self.pad = classes  # the class of padding: stays in place
        table = np.full((self.dead + 1, classes + 1), self.dead, dtype=np.int32)
        for s, moves in fsm.map.items():
            for c, t in moves.items():
                table[number[s], c] = number[t]
        table[:, self.pad] = np.arange(self.dead + 1)
        self.table = table
        self.initial = number[fsm.initial]
        self.finals = np.zeros(self.dead + 1, dtype=bool)
        self.finals[[number[f] for f in fsm.finals]] = True
        # Live states: a final state is reachable (reverse breadth-first search).
        live = self.finals.copy()
        while True:
            grown = live | live[table[:, :classes]].any(axis=1)
            grown[self.dead] = False
            if (grown == live).all():
                break
            live = grown
        self.live = live
        self._alphabet, self._other = fsm.alphabet, anything_else

    def char_class(self, ch: str) -> int:
        try:
            return self._alphabet[ch]
        except KeyError:
            return self._alphabet[self._other]

    def walk(self, state: int, text: str) -> int:
        for ch in text:
            state = self.table[state, self.char_class(ch)]
            if state == self.dead:
                break
        return int(state)


class Regex(TokenConstraint):
    """The generated text must match `pattern` in full by the time the text ends (EOS).

    Each token allowed keeps the text a prefix of some match; EOS is allowed only on a full match.
    """

    def __init__(self, pattern: str, allow_eos: bool = True):
        try:
            regex_module.compile(pattern)
        except regex_module.error as e:
            raise SteerError(f"invalid regular expression {pattern!r}: {e}") from None
        self.pattern, self.allow_eos = pattern, allow_eos
        self.automaton = _Automaton(pattern)
        self._classes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._states: dict[str, int] = {}
        # Per vocabulary (weakly: views of a vocabulary are short-lived), named caches keyed by state.
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"regex({self.pattern!r})"

    def state(self, text: str) -> int:
        """The DFA state after `text` (the automaton's dead state if no match can follow)."""
        if text not in self._states:
            self._states[text] = self.automaton.walk(self.automaton.initial, text)
        return self._states[text]

    def _token_classes(self, vocab: Vocabulary) -> np.ndarray:
        if vocab not in self._classes:
            matrix = _codepoints(vocab)[0]
            points, inverse = np.unique(matrix, return_inverse=True)
            lut = np.array([self.automaton.pad if p < 0 else self.automaton.char_class(chr(p)) for p in points],
                           dtype=np.int32)
            self._classes[vocab] = lut[inverse.reshape(matrix.shape)]
        return self._classes[vocab]

    def _cache(self, vocab: Vocabulary, name: str, limit: int) -> dict:
        """The cache `name` of this pattern for `vocab`, emptied of its oldest entry beyond `limit`."""
        store = self._caches.setdefault(vocab, {}).setdefault(name, {})
        if len(store) > limit:
            store.pop(next(iter(store)))
        return store

    def _walk_all(self, vocab: Vocabulary, state: int) -> np.ndarray:
        """The DFA state after each token's text, from `state` (cached per state and vocabulary)."""
        cache = self._cache(vocab, "ends", 256)
        ends = cache.get(state)
        if ends is None:
            a = self.automaton
            classes = self._token_classes(vocab)
            _, usable, long_ids, order, counts, empty = _codepoints(vocab)
            current = np.full(vocab.size, state, dtype=np.int32)
            for j in range(_WIDTH):
                k = counts[j]
                if not k:
                    break
                current[:k] = a.table[current[:k], classes[:k, j]]
            ends = np.empty_like(current)
            ends[order] = current
            ends[~usable] = a.dead
            ends[empty] = state  # adds no text
            for i in long_ids:
                ends[i] = a.walk(state, vocab.strings[i])
            cache[state] = ends
        return ends

    def _follow(self, vocab: Vocabulary, state: int) -> np.ndarray:
        """Text tokens (not end-of-text, not special) that keep a match reachable from `state`."""
        ok = self.automaton.live[self._walk_all(vocab, state)] & ~vocab.special
        ok[list(vocab.eos_ids)] = False
        return ok

    def allowed_after(self, vocab: Vocabulary, state: int) -> np.ndarray:
        """Tokens that keep a match reachable from `state` (EOS: whether `state` is a full match)."""
        a = self.automaton
        ok = a.live[self._walk_all(vocab, state)]
        ok[list(vocab.eos_ids)] = self.allow_eos and bool(a.finals[state])
        return ok

    def mask(self, context: Context) -> torch.Tensor:
        """Tokens that keep a match reachable and, when the context keeps tokenization canonical, can
        also be continued canonically: a token after which the pattern could only go on with a token
        that does not tokenize canonically (" " before "(" where " (" is one token) is left out now,
        instead of killing the particle one step later."""

        vocab = context.lm.vocab
        state = self.state(context.text)
        source = getattr(context, "source", context)
        canon = canonical_filter(source)
        last = context.tokens[-1] if canon is not None else None
        left = getattr(source, "tokens_left", None)
        budget = None if left is None or left - 2 >= _HORIZON else left - 2
        masks = self._cache(vocab, "masks", 4096)
        key = (state, last, budget)
        if key not in masks:
            if state == self.automaton.dead:
                ok = np.zeros(vocab.size, dtype=bool)
            else:
                ok = self.allowed_after(vocab, state)
                if canon is not None:
                    ok = self._look_ahead(vocab, state, ok & canon.after(last).numpy(), canon)
                if budget is not None:
                    ok = self._within_budget(vocab, state, ok, budget, source.lm.vocab)
            masks[key] = torch.from_numpy(ok)
        return masks[key]

    def _look_ahead(self, vocab: Vocabulary, state: int, ok: np.ndarray, canon) -> np.ndarray:
        """Drop the tokens after which no token both continues a match and tokenizes canonically."""
        a = self.automaton
        real = canon.vocab  # the next token is a whole token of the model's vocabulary
        ok = ok.copy()
        for nxt, xs in self._by_next_state(vocab, state, ok):
            if self.allow_eos and a.finals[nxt]:
                continue  # the text may end there
            follow = self._follow(real, nxt)
            n_follow = int(follow.sum())
            if n_follow == 0:
                ok[xs] = False
            elif len(xs) <= _LOOK_AHEAD:
                for x in xs:
                    ok[x] = self._live(canon, nxt, int(x), _DEPTH)
            elif n_follow <= _LOOK_AHEAD:
                dead = np.ones(len(xs), dtype=bool)
                for y in np.flatnonzero(follow):
                    dead &= ~canon.before(int(y))[xs]
                    if not dead.any():
                        break
                ok[xs[dead]] = False
            # else: many tokens before and after; a dead end there is rare and is caught a step later
        return ok

    def _within_budget(self, vocab: Vocabulary, state: int, ok: np.ndarray, budget: int,
                       real: Vocabulary) -> np.ndarray:
        """Drop the tokens after which a full match needs more than `budget` further tokens before the
        one that ends the text: proposals then finish within the context's `max_tokens`."""
        ok = ok.copy()
        for nxt, xs in self._by_next_state(vocab, state, ok):
            if self._tokens_to_end(real, nxt) > budget:
                ok[xs] = False
        return ok

    def _by_next_state(self, vocab: Vocabulary, state: int, ok: np.ndarray):
        """The allowed tokens other than end-of-text, grouped by the DFA state each leads to."""
        eos = np.zeros(vocab.size, dtype=bool)
        eos[list(vocab.eos_ids)] = True
        candidates = np.flatnonzero(ok & ~eos)
        ends = self._walk_all(vocab, state)[candidates]
        for nxt in np.unique(ends):
            yield int(nxt), candidates[ends == nxt]

    def _tokens_to_end(self, real: Vocabulary, state: int) -> int:
        """The fewest tokens that take `state` to a full match (a breadth-first search over the
        token-level automaton, up to _HORIZON; canonical tokenization ignored, so never too many)."""
        cache = self._cache(real, "to_end", 100_000)
        if state not in cache:
            a = self.automaton
            frontier, seen, found = {state}, {state}, _HORIZON + 1
            for depth in range(_HORIZON + 1):
                if any(a.finals[s] for s in frontier):
                    found = depth
                    break
                following = set()
                for s in frontier:
                    following.update(np.unique(self._walk_all(real, s)[self._follow(real, s)]).tolist())
                frontier = following - seen
                seen |= frontier
                if not frontier:
                    break
            cache[state] = found
        return cache[state]

    def _live(self, canon, state: int, last: int, depth: int) -> bool:
        """Whether, from DFA `state` after token `last`, some token continues the match canonically and
        can itself go on, up to `depth` tokens ahead (past a wide choice of tokens, one step only)."""
        lives = self._cache(canon.vocab, "lives", 100_000)
        key = (state, last, depth)
        found = lives.get(key)
        if found is None:
            a, real = self.automaton, canon.vocab
            if self.allow_eos and a.finals[state]:
                found = True
            else:
                follow = self._follow(real, state)
                ys = np.flatnonzero(follow & canon.after(last).numpy())
                if not len(ys) or depth == 0 or follow.sum() > _LOOK_AHEAD:
                    found = bool(len(ys))  # past a wide choice, one canonical token is enough
                else:
                    ends = self._walk_all(real, state)
                    found = any(self._live(canon, int(ends[y]), int(y), depth - 1) for y in ys)
            lives[key] = found
        return found

    def done(self, context: Context) -> bool:
        """The generated text is a full match that no further text can extend: a program can finish
        here (the model is not asked to end the text, so its end-of-text probability is not scored)."""
        a, state = self.automaton, self.state(context.text)
        return bool(a.finals[state]) and not a.live[a.table[state, : a.pad]].any()

    def matches(self, text: str) -> bool:
        # as the automaton: ASCII classes
        return regex_module.fullmatch(self.pattern, text, flags=regex_module.ASCII) is not None


def automaton(pattern: str, allow_eos: bool = True) -> Regex:
    """The generated text matches `pattern` in full, through steer's own token automaton (Python
    `regex` syntax without look-around; exact budgets).  `regex(...)` uses llguidance instead."""
    return Regex(pattern, allow_eos=allow_eos)


# The structured-output engine: regular expressions and JSON Schema on llguidance.
regex = engine.regex
search = engine.search
json_schema = engine.json_schema
