"""Constraints checked on candidate tokens, sampled with adaptive weighted rejection sampling (AWRS).

Some constraints cannot be turned into a mask over 262k tokens cheaply: a Lark grammar (each check is
a parse) or a regular expression with look-around or back-references (each check is a partial
match).  AWRS (Lipkin et al. 2025, arXiv 2504.05410) draws tokens from the LM without replacement,
checks them one at a time and stops at the first that passes, so a step usually checks a handful of
tokens.  A second rejection round yields an unbiased estimate of the allowed mass P(A), which becomes
the particle's weight: with `ctx.allowed(check)` observed True, the token is an exact sample of the LM
restricted to A and the weight is properly weighted for the LM conditioned on the constraint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import regex
import torch

from ..errors import SteerError
from ..randomness import categorical, streams
from . import engine
from .base import Constraint, Context, TokenTest, all_of
from .target import Recent, can_end_next

NEG_INF = float("-inf")


class TokenCheck(Constraint):
    """A constraint on the generated text, checked for one candidate token at a time.

    Its mask is that of a regular over-approximation (`approximation`, when one compiles; else every
    token), and its token check decodes the candidate and asks `allows`: samplers draw within the mask
    and check only what they draw (adaptive weighted rejection sampling)."""

    exact = False
    approximation: Constraint | None = None

    def __init__(self, cache_size: int = 100_000):
        self._cache = Recent(cache_size)

    def allows(self, text: str, complete: bool = False) -> bool:
        """Whether `text` is a prefix of an allowed text (or, with `complete`, an allowed text)."""
        key = (text, complete)
        if key in self._cache:
            return self._cache.recall(key)
        return self._cache.keep(key, self._complete(text) if complete else self._prefix(text))

    def _prefix(self, text: str) -> bool:
        raise NotImplementedError

    def _complete(self, text: str) -> bool:
        raise NotImplementedError

    def allowed_in(self, context: Context) -> torch.Tensor | None:
        if self.approximation is None:
            return None
        return self.approximation.allowed_in(context)

    def token_check(self, context: Context) -> TokenTest:
        vocab = context.lm.vocab
        text, pending = context.text, context.heal

        def added(i: int) -> str:
            """The text token `i` adds (healing: only the part after the backed-off prompt text)."""
            s = vocab.strings[i]
            return (s[len(pending):] if s.startswith(pending) else "") if pending else s

        def accepts(i: int) -> bool:
            if i in vocab.eos_ids:
                return self.allows(text, complete=True)
            s = added(i)
            at = context.end_position(text, s)
            if at is not None:  # writes an end string: the text before it must be a complete text
                return self.allows((text + s)[:at], complete=True)
            return not vocab.special[i] and self.allows(text + s)

        # With a budget, only tokens after which the approximation can still end in time (a necessary
        # condition: it allows every text the check does); before the last token, known exactly: the
        # text must be able to end right after the drawn one (the approximation may think `"abc`
        # complete where the check wants its closing quote).
        fits = None if self.approximation is None else self.approximation.token_check(context)
        last_but_one = None
        if getattr(context, "tokens_left", None) == 2 and not context.ended:
            def last_but_one(i: int) -> bool:
                if i in vocab.eos_ids or vocab.special[i]:
                    return True  # judged by `accepts`
                s = added(i)
                if context.end_position(text, s) is not None:
                    return True  # writes an end string: judged by `accepts`
                return can_end_next(context, text + s, lambda t: self.allows(t, complete=True))
        return all_of([fits, accepts, last_but_one])


class PartialRegex(TokenCheck):
    """The text matches `pattern` (the `regex` module's syntax: look-around, back-references, ...)."""

    def __init__(self, pattern: str, timeout: float = 1.0):
        super().__init__()
        try:
            self.compiled = regex.compile(pattern)
        except regex.error as e:
            raise SteerError(f"invalid regular expression {pattern!r}: {e}") from None
        self.pattern, self.timeout = pattern, timeout
        self.approximation = regular_approximation(pattern)
        self.copies = _COPIES.search(pattern) is not None  # back-references: see `_copies_fit`

    def __repr__(self) -> str:
        return f"partial_regex({self.pattern!r})"

    def _prefix(self, text: str) -> bool:
        return self.compiled.fullmatch(text, partial=True, timeout=self.timeout) is not None

    def _complete(self, text: str) -> bool:
        return self.compiled.fullmatch(text, timeout=self.timeout) is not None

    def token_check(self, context: Context) -> TokenTest:
        return all_of([super().token_check(context), self._copies_fit(context)])

    def _copies_fit(self, context: Context) -> TokenTest | None:
        """With a budget and back-references: a drawn token must leave room for the copies the text
        still owes.  The approximation reads a back-reference as any text, even none, so its budget
        check lets a particle write a 40-digit word that its copy can then not follow in time.  Here
        the approximation's completion after the token is extended with the groups it captured until
        the pattern itself accepts it; a token is refused when that completion does not fit (none
        found: nothing is known, and the token passes)."""
        left = getattr(context, "tokens_left", None)
        if not self.copies or self.approximation is None or left is None or left <= 2 \
                or context.ended or context.heal:
            return None
        state, vocab, text = self.approximation.state(context), context.lm.vocab, context.text
        m, tokenizer = state.matcher, state.tokenizer

        def fits(token: int) -> bool:
            s = vocab.strings[token]
            if token in vocab.eos_ids or vocab.special[token] or context.end_position(text, s) is not None:
                return True  # judged by the other checks
            if not m.try_consume_tokens([token]):
                return True  # the approximation leaves it out
            try:
                ending, found = engine.completion(m, vocab, tokenizer, engine._search_limit(left - 1), (text + s)[-2:])
            finally:
                m.rollback(1)
            ending = self._with_copies(text + s, ending) if found else None
            return ending is None or len(tokenizer.tokenize_str(ending)) + 1 <= left - 1

        return fits

    def _with_copies(self, text: str, ending: str, rounds: int = 3) -> str | None:
        """`ending`, then captured groups written after it, until `text + ending` is complete (None:
        not within `rounds` copies)."""
        for _ in range(rounds + 1):
            if self.allows(text + ending, complete=True):
                return ending
            match = self.compiled.fullmatch(text + ending, partial=True, timeout=self.timeout)
            if match is None:
                return None
            longer = [ending + g for g in match.groups() if g and self.allows(text + ending + g)]
            if not longer:
                return None
            ending = next((e for e in longer if self.allows(text + e, complete=True)), longer[0])
        return None


_COPIES = regex.compile(r"\\[1-9]|\\g<|\\k<|\(\?P=")  # a back-reference: `\1`, `\g<name>`, `\k<name>`, `(?P=name)`
_ANY = "(?s:.*)"
_LOOK = ("(?=", "(?!", "(?<=", "(?<!")
_FLAGS = regex.compile(r"\(\?([a-zA-Z^-]*)([:)])")


def regular_part(pattern: str) -> str:
    """A regular expression (llguidance's syntax) whose language contains `pattern`'s: look-around and
    word boundaries are dropped, back-references and recursion match any text, atomic groups and
    possessive quantifiers become plain ones, conditionals become alternatives.  Its mask proposes the
    candidates that AWRS then checks exactly."""
    out, i, n = [], 0, len(pattern)

    def group_end(at: int) -> int:  # the index after the ")" closing the group opened at `at`
        depth, j = 0, at
        while j < n:
            c = pattern[j]
            if c == "\\":
                j += 2
                continue
            if c == "[":
                j = class_end(j)
                continue
            depth += c == "("
            depth -= c == ")"
            j += 1
            if depth == 0:
                return j
        return n

    def class_end(at: int) -> int:  # the index after the "]" closing the class opened at `at`
        j = at + 1
        if j < n and pattern[j] == "^":
            j += 1
        if j < n and pattern[j] == "]":
            j += 1
        while j < n and pattern[j] != "]":
            if pattern[j] == "\\":
                j += 2
            elif pattern[j] == "[":
                j = class_end(j)
            else:
                j += 1
        return min(j + 1, n)

    def top_level_bar(start: int, stop: int) -> bool:  # an alternation in pattern[start:stop], outside groups and classes
        depth, j = 0, start
        while j < stop:
            c = pattern[j]
            if c == "\\":
                j += 2
                continue
            if c == "[":
                j = class_end(j)
                continue
            depth += (c == "(") - (c == ")")
            if c == "|" and depth == 0:
                return True
            j += 1
        return False

    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt.isdigit() and nxt != "0":  # a back-reference
                j = i + 1
                while j < n and pattern[j].isdigit():
                    j += 1
                out.append(_ANY)
                i = j
            elif nxt in "gk" and i + 2 < n and pattern[i + 2] in "<{":
                j = pattern.find(">" if pattern[i + 2] == "<" else "}", i)
                out.append(_ANY)
                i = n if j < 0 else j + 1
            elif nxt in "bBAZzGm":  # boundaries and anchors
                i += 2
            elif nxt == "X":
                out.append("(?s:.)")
                i += 2
            elif nxt in "pPxNu" and i + 2 < n and pattern[i + 2] == "{":
                j = pattern.find("}", i)
                out.append(pattern[i:n if j < 0 else j + 1])
                i = n if j < 0 else j + 1
            else:
                out.append(pattern[i:i + 2])
                i += 2
        elif c == "[":
            j = class_end(i)
            out.append(pattern[i:j])
            i = j
        elif c == "(":
            rest = pattern[i:]
            if rest.startswith(_LOOK) or rest.startswith("(?#"):
                i = group_end(i)
            elif rest.startswith("(?>"):
                out.append("(?:")
                i += 3
            elif rest.startswith("(?("):  # a conditional: either branch (no "no" branch: the empty text)
                end = group_end(i)
                body_start, body_stop = pattern.find(")", i + 3) + 1 or n, max(end - 1, 0)
                no_branch = "" if top_level_bar(body_start, body_stop) else "|"
                out.append(f"(?:{regular_part(pattern[body_start:body_stop])}{no_branch})")
                i = end
            elif rest.startswith("(?P=") or regex.match(r"\(\?(R|[0-9]+|&\w+|P>\w+)\)", rest):
                i = group_end(i)
                out.append(_ANY)
            elif rest.startswith("(?P<") or rest.startswith("(?<"):
                out.append("(")  # named groups: names do not matter here
                i = pattern.find(">", i) + 1 or n
            else:
                flags = _FLAGS.match(rest)
                if flags:
                    kept = "".join(f for f in flags.group(1) if f in "imsx-")
                    if flags.group(2) == ":":
                        out.append(f"(?{kept}:" if kept.strip("-") else "(?:")
                    elif kept.strip("-"):
                        out.append(f"(?{kept})")
                    i += flags.end()
                else:
                    out.append("(")
                    i += 1
        elif c in "^$":
            i += 1
        elif c in "*+?}" and i + 1 < n and pattern[i + 1] == "+":  # possessive: a plain quantifier
            out.append(c)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def regular_approximation(pattern: str):
    """An llguidance regex constraint containing `pattern`'s language, or None where none compiles."""
    part = regular_part(pattern)
    for candidate in (part, regex.sub(r"\\[pP]\{[^}]*\}|\\[pP][A-Z]", r"(?s:.)", part)):
        try:
            return engine.regex(candidate)
        except SteerError:
            continue
    return None


class Grammar(TokenCheck):
    """The text is a sentence of a Lark grammar (LALR); prefixes are checked with Lark's interactive
    parser: every complete token is fed to the parser, and the text after the last one must be the
    beginning of a terminal the parser accepts next."""

    def __init__(self, grammar: str, start: str = "start"):
        super().__init__()
        from lark import Lark
        from lark.exceptions import LarkError

        try:
            self.parser = Lark(grammar, start=start, parser="lalr", lexer="basic")
        except (LarkError, SyntaxError, TypeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SteerError(f"invalid Lark grammar: {first}") from None
        self.grammar = grammar
        self._terminals = {t.name: regex.compile(t.pattern.to_regexp()) for t in self.parser.terminals}

    def __repr__(self) -> str:
        return f"grammar({self.grammar[:40]!r}...)"

    def _complete(self, text: str) -> bool:
        from lark.exceptions import LarkError

        try:
            self.parser.parse(text)
        except LarkError:
            return False
        return True

    def _lex(self, text: str):
        """Complete tokens and the position where lexing stopped (len(text) if it did not)."""
        from lark.exceptions import UnexpectedCharacters

        tokens = []
        try:
            for token in self.parser.lex(text):
                tokens.append(token)
        except UnexpectedCharacters as e:
            return tokens, e.pos_in_stream
        return tokens, len(text)

    def _feeds(self, tokens) -> object | None:
        from lark.exceptions import LarkError

        parser = self.parser.parse_interactive("")
        try:
            for token in tokens:
                parser.feed_token(token)
        except LarkError:
            return None
        return parser

    def _continues(self, parser, rest: str) -> bool:
        if not rest:
            return True
        for name in parser.accepts():
            pattern = self._terminals.get(name)
            if pattern is not None and pattern.fullmatch(rest, partial=True):
                return True
        return False

    def _prefix(self, text: str) -> bool:
        tokens, stop = self._lex(text)
        candidates = []
        if stop == len(text):
            if tokens and tokens[-1].end_pos == len(text):  # the last token may still grow
                candidates.append((tokens[:-1], text[tokens[-1].start_pos:]))
            candidates.append((tokens, ""))
        else:
            if tokens and tokens[-1].end_pos == stop:  # e.g. "1." : NUMBER then a cut-off fraction
                candidates.append((tokens[:-1], text[tokens[-1].start_pos:]))
            candidates.append((tokens, text[stop:]))
        for complete, rest in candidates:
            parser = self._feeds(complete)
            if parser is not None and self._continues(parser, rest):
                return True
        return False


JSON_GRAMMAR = r"""
?start: value
?value: object | array | STRING | NUMBER | "true" | "false" | "null"
array: "[" [value ("," value)*] "]"
object: "{" [pair ("," pair)*] "}"
pair: STRING ":" value
STRING: /"([^"\\\x00-\x1f]|\\["\\\/bfnrt]|\\u[0-9a-fA-F]{4})*"/
NUMBER: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/
%ignore /[ \t\n\r]+/
"""


def partial_regex(pattern: str, timeout: float = 1.0) -> PartialRegex:
    """The text matches `pattern`, checked token by token (any `regex`-module pattern); `timeout` bounds
    each partial match in seconds."""
    if not timeout > 0:
        raise SteerError(f"partial_regex needs a positive timeout, got {timeout}")
    return PartialRegex(pattern, timeout=timeout)


def lark_grammar(text: str, start: str = "start") -> Grammar:
    """The text is a sentence of the Lark grammar `text` in Lark's own dialect (LALR), checked token by
    token with AWRS; `grammar(...)` compiles llguidance's Lark dialect to masks instead."""
    return Grammar(text, start=start)


def grammar(text: str, start: str = "start"):
    """The text is a sentence of the Lark grammar `text` (llguidance's dialect: masks, no checks)."""
    return engine.grammar(text, start=start)


def json_grammar():
    """The text is one JSON value (any JSON; use `steer.patterns.json_schema` to fix its shape)."""
    return grammar(JSON_GRAMMAR)


# -- adaptive weighted rejection sampling -----------------------------------------------------------
def _descending(keys: torch.Tensor) -> Iterator[int]:
    """Indices in order of decreasing key, lazily (a few top-k calls instead of a full sort)."""
    n, seen, k = keys.numel(), 0, 16
    while seen < n:
        k = min(n, max(k, 4 * seen))
        values, order = torch.topk(keys, k)
        for v, i in zip(values[seen:].tolist(), order[seen:].tolist()):
            if v == NEG_INF:
                return
            yield i
        seen = k


def _without_replacement(probs: torch.Tensor, first: int | None = None, cheap: int = 8) -> Iterator[int]:
    """Tokens in the order of sampling without replacement from `probs` (which the caller zeroes as it
    rejects them).  The first few are single draws (usually one suffices); after that a
    Gumbel race over what is left gives the rest of the order at once."""
    drawn: set[int] = set()
    if first is not None and probs[first] > 0:
        drawn.add(first)
        yield first
    while len(drawn) < cheap:
        remaining = probs
        if drawn:  # (rejected tokens are zeroed by the caller; an accepted first one is not)
            remaining = probs.clone()
            remaining[list(drawn)] = 0.0
        if not remaining.sum() > 0:
            return
        i = int(categorical(remaining))
        drawn.add(i)
        yield i
    u = torch.rand(probs.shape, generator=streams.torch, dtype=torch.float64).clamp_min(1e-300)
    keys = probs.log() - torch.log(-torch.log(u))
    keys[list(drawn)] = NEG_INF
    yield from _descending(keys)


def _fall_back(probs: torch.Tensor, accepts: Callable[[int], bool], checks: int) -> tuple[int | None, float, int]:
    """After AWRS gives up: the tokens the check itself names as likely to pass (`accepts.candidates()`:
    for a budget, those that begin a short completion), drawn in proportion to the LM among those that
    pass.  Their mass is the weight, a lower bound of what AWRS estimates: the particle goes on
    slightly under-weighted instead of dying where its few passing tokens lie far down the list."""
    propose = getattr(accepts, "candidates", None)
    passing = [i for i in (propose() if propose is not None else []) if probs[i] > 0 and accepts(i)]
    if not passing:
        return None, NEG_INF, checks
    mass = probs[passing]
    token = passing[int(categorical(mass / mass.sum()))]
    return token, math.log(float(mass.sum())), checks + len(passing)


def awrs(logprobs: torch.Tensor, given: torch.Tensor | None, accepts: Callable[[int], bool],
         first: int | None = None, max_checks: int | None = None) -> tuple[int | None, float, int]:
    """Adaptive weighted rejection sampling of the LM's next token restricted to `accepts`.

    `logprobs`: the LM's next-token log-probabilities; `given`: an existing restriction (the target is
    then conditional on it); `first`: a token already drawn from the LM (the batched round's draw),
    used as the first candidate; `max_checks`: give up after that many (see `_fall_back`).
    Returns (token or None if no token is accepted, log of an unbiased estimate of P(accepted | given),
    number of checks).
    """
    logps = logprobs.double()
    if given is None:
        probs = logps.exp()  # the LM's log-probabilities are normalised already
    else:
        logps = logps.masked_fill(~given, NEG_INF)
        first = first if first is not None and bool(given[first]) else None
        log_z = torch.logsumexp(logps, 0).item()
        if log_z == NEG_INF:
            return None, NEG_INF, 0
        probs = (logps - log_z).exp()
    token, rejected, first_round, checks = None, 0, [], 0
    for round_ in range(2):
        for i in _without_replacement(probs, first if round_ == 0 else None):
            checks += 1
            if max_checks is not None and checks > max_checks and token is None:
                return _fall_back(probs, accepts, checks)
            if accepts(i):
                if token is None:
                    token = i
                break
            rejected += 1
            if token is None:
                first_round.append(probs[i].item())
            probs[i] = 0.0
    if token is None:
        return None, NEG_INF, checks
    log_w = -math.log(rejected + 1)
    if first_round:
        mass = math.fsum(first_round)
        log_w += math.log1p(-mass) if mass < 1.0 else NEG_INF
    return token, log_w, checks
