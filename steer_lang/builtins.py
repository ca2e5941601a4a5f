"""The names a `.steer` program can call: pure functions over text and numbers, token masks (the same
names as `steer.masks`), and the distributions `sample` and `observe` take.

This table is the whole of what a program can reach: there is no way to name anything else in
Python, which is what makes the language a sandbox.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import regex

from retrieval.retriever import Retriever, background_prompt
from steer import checks, masks, patterns
from steer.constraints import tilts
from steer.errors import SteerError
from steer.context import LMContext
from steer.lm.base import Token
from steer.constraints.base import Constraint
from steer.potentials import ScoringModel

from .limits import MAX_LENGTH, MAX_SIZE

MAX_CALL_DEPTH = 50  # helper functions calling helpers
COMPILED_LITERALS = ("regex", "regex_search", "partial_regex", "json_schema", "grammar")  # `steer check` compiles literal ones
REGEX_TIMEOUT = 1.0  # seconds; a pathological pattern is an error, not a hang
REQUIRED = object()
# The wall-clock deadline of the run in progress (time.monotonic()), or None: slow built-ins stop at it.
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("steer_deadline", default=None)


def size_of(value: Any, seen: dict[int, int] | None = None) -> int:
    """Characters plus items of a value, nested lists counted in full (so `[s] * n` weighs n copies of s,
    which is what printing, joining or comparing it would cost), in time linear in the distinct lists."""
    if isinstance(value, (str, Token)):
        return len(text(value))
    if not isinstance(value, list):
        return 1
    known = _SIZES.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    seen = {} if seen is None else seen
    if id(value) not in seen:
        seen[id(value)] = len(value) + sum(size_of(v, seen) for v in value)
    remember_size(value, seen[id(value)])
    return seen[id(value)]


# Programs never change a list in place, so a list's size is known for as long as it lives: the last
# few are remembered (with the list, so that its id cannot be reused), and `l = l + [x]` in a loop
# costs one addition per step, not a walk over l.
_SIZES: OrderedDict[int, tuple[list, int]] = OrderedDict()


def remember_size(value: list, size: int) -> None:
    _SIZES[id(value)] = (value, size)
    _SIZES.move_to_end(id(value))
    if len(_SIZES) > 8:  # (each holds its list alive: a few, so memory stays bounded)
        _SIZES.popitem(last=False)


def check_size(size: int) -> None:
    """Refuse a value before it is built: the limit holds for memory, and for the time of any later
    operation over the value."""
    if size > MAX_SIZE:
        raise BuiltinError(f"the result would hold {size:,} characters and items in all; the limit is {MAX_SIZE:,}")


def regex_seconds() -> float:
    """The time a regular-expression match may take: REGEX_TIMEOUT, or what is left of the run's budget."""
    deadline = DEADLINE.get()
    if deadline is None:
        return REGEX_TIMEOUT
    return max(0.0, min(REGEX_TIMEOUT, deadline - time.monotonic()))

# Types the checker knows.  "text" accepts a string or a token; "number" an int, float or bool.
TYPES = ("str", "int", "float", "bool", "list", "token", "context", "mask", "reward_model", "retriever")


class BuiltinError(Exception):
    """A built-in refused its arguments; the interpreter reports it at the call."""


def type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    for t, name in ((int, "int"), (float, "float"), (str, "str"), (list, "list"), (Token, "token"),
                    (LMContext, "context"), (Constraint, "mask"), (ScoringModel, "reward_model"), (Retriever, "retriever")):
        if isinstance(value, t):
            return name
    return "none" if value is None else type(value).__name__


def accepts(expected: str, actual: str) -> bool:
    """Whether a value of type `actual` may be passed where `expected` is wanted."""
    if "any" in (expected, actual):
        return True
    return actual in {
        "number": ("int", "float", "bool"), "float": ("int", "float", "bool"), "int": ("int", "bool"),
        "text": ("str", "token"), "str": ("str", "token"),
    }.get(expected, (expected,))


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any = REQUIRED


@dataclass(frozen=True)
class Builtin:
    name: str
    params: tuple[Param, ...]
    returns: str
    kind: str  # "function", "mask" or "distribution"
    impl: Callable | None
    doc: str

    def signature(self) -> str:
        parts = [p.name if p.default is REQUIRED else f"{p.name}={_show(p.default)}" for p in self.params]
        return f"{self.name}({', '.join(parts)})"


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def text(x: Any) -> str:
    """The text of a string or token."""
    return x.text if isinstance(x, Token) else x


def _sized(value):
    if len(value) > MAX_LENGTH:
        raise BuiltinError(f"result would hold {len(value):,} items; the limit is {MAX_LENGTH:,}")
    return value


def _regex(pattern: str, s: str, full: bool) -> bool:
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        raise BuiltinError(f"bad regular expression {pattern!r}: {e}") from None
    try:
        seconds = regex_seconds()
        match = (compiled.fullmatch if full else compiled.search)(s, timeout=seconds)
    except TimeoutError:
        if seconds < REGEX_TIMEOUT:
            raise BuiltinError(f"the run's time limit ran out while matching {pattern!r}") from None
        raise BuiltinError(f"regular expression {pattern!r} took over {seconds:.3g}s") from None
    return match is not None


def _words(s: str) -> list[str]:
    """Runs of letters: the words of the word masks, `sample word(c)` and `prefer_words` too."""
    return regex.findall(r"[^\W\d_]+", s)


def _has_words(s: Any, words: Any) -> bool:
    wanted = {w.lower() for w in _strings("has_words", words)}
    return wanted <= {w.lower() for w in _words(text(s))}


def _number(kind: type) -> Callable:
    def convert(x):
        try:
            value = kind(text(x))
        except (ValueError, OverflowError, TypeError):
            raise BuiltinError(f"cannot convert {text(x)!r} to {kind.__name__}") from None
        if kind is float and not math.isfinite(value):  # the language has no infinities or NaN
            raise BuiltinError(f"cannot convert {text(x)!r} to a finite float")
        return value

    return convert


def _round(x: float) -> int:
    if not math.isfinite(x) or abs(x) >= 2**63:
        raise BuiltinError(f"cannot round {x!r} to an integer (within ±2**63)")
    return round(x)


def _extreme(pick: Callable) -> Callable:
    def f(a, b=None):
        if b is None:
            if not isinstance(a, list) or not a:
                raise BuiltinError(f"{pick.__name__} of one argument needs a non-empty list")
            try:
                return pick(a)
            except TypeError:
                raise BuiltinError(f"{pick.__name__}: the list mixes values that cannot be compared") from None
        try:
            return pick(a, b)
        except TypeError:
            raise BuiltinError(f"{pick.__name__}: cannot compare {type_of(a)} and {type_of(b)}") from None

    return f


def _math(f: Callable, name: str) -> Callable:
    def g(x):
        try:
            return f(x)
        except (ValueError, OverflowError):
            raise BuiltinError(f"{name}({x}) is undefined") from None

    return g


def _range(a: int, b: int | None = None) -> list[int]:
    start, stop = (0, a) if b is None else (a, b)
    if stop - start > MAX_LENGTH:
        raise BuiltinError(f"range of {stop - start:,} numbers; the limit is {MAX_LENGTH:,}")
    return list(range(start, stop))


def _done(m: Any, c: LMContext) -> bool:
    if not hasattr(m, "done"):
        raise BuiltinError(f"done() needs a regex, regex_search, grammar or json_schema, got {m!r}")
    return m.done(c)


def _contains(s, sub) -> bool:
    if isinstance(s, list):
        return sub in s
    if not isinstance(s, (str, Token)) or not isinstance(sub, (str, Token)):
        raise BuiltinError(f"contains(s, x) needs a list, or text in text; got {type_of(s)} and {type_of(sub)}")
    return text(sub) in text(s)


def _sum(items: list):
    if not all(type_of(x) in ("int", "float", "bool") for x in items):
        raise BuiltinError("sum needs a list of numbers")
    return sum(items)


def _join(items: list, sep: str = "") -> str:
    seen: dict[int, int] = {}
    if sum(size_of(x, seen) for x in items) + len(text(sep)) * max(0, len(items) - 1) > MAX_LENGTH:
        raise BuiltinError(f"the joined text would be longer than {MAX_LENGTH:,} characters")
    return _sized(text(sep).join(text(x) if isinstance(x, (str, Token)) else _text_of(x) for x in items))


def _to_str(x: Any) -> str:
    if isinstance(x, list) and size_of(x) > MAX_LENGTH:  # the text is at least as long: refuse before building
        raise BuiltinError(f"the text of this list would be longer than {MAX_LENGTH:,} characters")
    return _text_of(x)


def _text_of(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (str, Token)):
        return text(x)
    if isinstance(x, list):
        return "[" + ", ".join(repr(text(v)) if isinstance(v, (str, Token)) else _text_of(v) for v in x) + "]"
    if isinstance(x, LMContext):
        return x.text
    return str(x)


def _replace(s, old, new) -> str:
    s, old, new = text(s), text(old), text(new)
    # the result's length, known before building it ("" is found len(s) + 1 times, around each character)
    if len(s) + s.count(old) * (len(new) - len(old)) > MAX_LENGTH:
        raise BuiltinError(f"replace would build a string longer than {MAX_LENGTH:,} characters")
    return s.replace(old, new)


def _split(s, sep=None) -> list[str]:
    sep = text(sep) if sep is not None else None
    if sep == "":
        raise BuiltinError("split separator is empty")
    return text(s).split(sep)


def _ended(c: LMContext) -> bool:
    """The text is over: the end-of-text token, or a token that wrote one of the context's end strings."""
    return c.ended or (bool(c.generated) and c.generated[-1] in c.lm.vocab.eos_ids)


def _word_length(max=None, min=1, allow_eos=True):
    try:
        return masks.word_length(max=max, min=min, allow_eos=allow_eos)
    except SteerError as e:  # names the bad bound
        raise BuiltinError(str(e)) from None


def _charset(chars, allow_eos=False):
    if not chars:
        raise BuiltinError("charset needs at least one character")
    return masks.charset(text(chars), allow_eos=allow_eos)


def _one_of(strings, allow_eos=False):
    if not all(isinstance(s, (str, Token)) for s in strings):
        raise BuiltinError("one_of needs a list of strings")
    return masks.one_of([text(s) for s in strings], allow_eos=allow_eos)


def _constraint(make: Callable) -> Callable:
    """A constraint constructor taking language values (tokens as text); its errors become ours."""
    def build(*args):
        args = [text(a) if isinstance(a, Token) else a for a in args]
        try:
            return make(*args)
        except SteerError as e:
            raise BuiltinError(str(e)) from None

    return build


def _strings(name: str, items) -> list[str]:
    if not all(isinstance(s, (str, Token)) for s in items):
        raise BuiltinError(f"{name} needs a list of strings")
    return [text(s) for s in items]


def _retrieve(retriever: Retriever, query, k: int) -> list[str]:
    if not 1 <= k <= 100:
        raise BuiltinError(f"k must be between 1 and 100, got {k}")
    return retriever.passages(text(query), k)


def _b(name, params, returns, impl, doc, kind="function"):
    return Builtin(name, tuple(Param(*p) for p in params), returns, kind, impl, doc)


_BUILTINS = [
    # text
    _b("len", [("x", "any")], "int", lambda x: len(text(x)) if isinstance(x, (str, Token)) else len(x),
       "length of a string, token or list"),
    _b("str", [("x", "any")], "str", _to_str, "text form of a value"),
    _b("int", [("x", "any")], "int", _number(int), "integer from a number or a string"),
    _b("float", [("x", "any")], "float", _number(float), "float from a number or a string"),
    _b("words", [("s", "text")], "list", lambda s: _words(text(s)), "the words (runs of letters) of s"),
    _b("word_count", [("s", "text")], "int", lambda s: len(_words(text(s))), "number of words in s"),
    _b("has_words", [("s", "text"), ("words", "list")], "bool", _has_words,
       "every listed word is a word of s (case-insensitive)"),
    _b("contains", [("s", "any"), ("sub", "any")], "bool", _contains, "sub occurs in s (string or list)"),
    _b("starts_with", [("s", "text"), ("prefix", "text")], "bool", lambda s, p: text(s).startswith(text(p)),
       "s starts with prefix"),
    _b("ends_with", [("s", "text"), ("suffix", "text")], "bool", lambda s, p: text(s).endswith(text(p)),
       "s ends with suffix"),
    _b("count", [("s", "text"), ("sub", "text")], "int", lambda s, sub: text(s).count(text(sub)),
       "occurrences of sub in s"),
    _b("matches", [("s", "text"), ("pattern", "str")], "bool", lambda s, p: _regex(p, text(s), True),
       "the whole of s matches the regular expression"),
    _b("search", [("s", "text"), ("pattern", "str")], "bool", lambda s, p: _regex(p, text(s), False),
       "the regular expression matches somewhere in s"),
    _b("lower", [("s", "text")], "str", lambda s: text(s).lower(), "s in lower case"),
    _b("upper", [("s", "text")], "str", lambda s: text(s).upper(), "s in upper case"),
    _b("strip", [("s", "text")], "str", lambda s: text(s).strip(), "s without surrounding white space"),
    _b("split", [("s", "text"), ("sep", "text", None)], "list", _split, "pieces of s between separators"),
    _b("join", [("items", "list"), ("sep", "text", "")], "str", _join, "the items joined by sep"),
    _b("replace", [("s", "text"), ("old", "text"), ("new", "text")], "str", _replace, "s with old replaced"),
    # numbers and lists
    _b("abs", [("x", "number")], "any", abs, "absolute value"),
    _b("min", [("a", "any"), ("b", "any", None)], "any", _extreme(min), "smaller of a and b, or least of a list"),
    _b("max", [("a", "any"), ("b", "any", None)], "any", _extreme(max), "larger of a and b, or largest of a list"),
    _b("round", [("x", "number")], "int", _round, "nearest integer"),
    _b("log", [("x", "number")], "float", _math(math.log, "log"), "natural logarithm"),
    _b("exp", [("x", "number")], "float", _math(math.exp, "exp"), "e to the power x"),
    _b("sum", [("items", "list")], "any", _sum, "sum of a list of numbers"),
    _b("range", [("a", "int"), ("b", "int", None)], "list", _range, "[0, ..., a-1], or [a, ..., b-1]"),
    # contexts
    _b("text", [("c", "context")], "str", lambda c: c.text, "the text generated in context c"),
    _b("prompt", [("c", "context")], "str", lambda c: c.lm.decode(c.tokens[:c.prompt_length]),
       "the prompt of context c"),
    _b("tokens", [("c", "context")], "int", lambda c: c.written,
       "number of tokens generated in c (a first token that only re-wrote the healed prompt excluded)"),
    _b("ended", [("c", "context")], "bool", _ended, "c's text is over: end-of-text, or an end string written"),
    # reward models (declared with `reward_model NAME = "dir"`); served in batches by the interpreter
    _b("reward", [("model", "reward_model"), ("instruction", "text"), ("response", "text")], "float", None,
       "the reward model's score of response to instruction (use in score, twist, condition or an assignment)",
       kind="model_call"),
    # retrievers (declared with `retriever NAME = "dir"`, an index of `steer index build`)
    _b("retrieve", [("retriever", "retriever"), ("query", "text"), ("k", "int", 3)], "list", _retrieve,
       "the texts of the k passages most similar to query, best first"),
    _b("background", [("passages", "list"), ("prompt", "text")], "str",
       lambda p, q: _sized(background_prompt(_strings("background", p), text(q))),
       "prompt preceded by \"Background: passage\" for each passage (RA-DIT's format)"),
    # token masks (the `where` of a sample); combine with and / or / not
    _b("word_length", [("max", "int", None), ("min", "int", 1), ("allow_eos", "bool", True)], "mask",
       _word_length, "every word has between min and max letters", "mask"),
    _b("charset", [("chars", "str"), ("allow_eos", "bool", False)], "mask", _charset,
       "tokens made only of these characters", "mask"),
    _b("one_of", [("strings", "list"), ("allow_eos", "bool", False)], "mask", _one_of,
       "tokens whose text is one of these strings", "mask"),
    _b("exclude_chars", [("chars", "str"), ("allow_eos", "bool", True)], "mask", _constraint(masks.exclude_chars),
       "tokens without any of these characters (a lipogram)", "mask"),
    _b("banned_words", [("words", "list")], "mask", lambda w: _constraint(masks.banned_words)(_strings("banned_words", w)),
       "no complete word is one of these", "mask"),
    _b("allowed_words", [("words", "list")], "mask",
       lambda w: _constraint(masks.allowed_words)(_strings("allowed_words", w)), "every word is one of these", "mask"),
    _b("max_words", [("n", "int"), ("allow_eos", "bool", True), ("min", "int", 0)], "mask",
       _constraint(masks.max_words), "at most n words; the text ends only with at least min (min=n: exactly n)",
       "mask"),
    _b("must_end_with", [("suffix", "str")], "mask", _constraint(masks.must_end_with),
       "the text may only end once it ends with suffix", "mask"),
    _b("prefer_words", [("words", "list"), ("bonus", "float", 2.0)], "mask",
       lambda w, b=2.0: _constraint(tilts.prefer_words)(_strings("prefer_words", w), b),
       "a tilt: exp(bonus) per complete listed word, proposed token by token (combine with `and`)", "mask"),
    _b("stop_at", [("strings", "list")], "mask", lambda s: _constraint(masks.stop_at)(_strings("stop_at", s)),
       "the text ends right after the first stop string", "mask"),
    _b("max_tokens", [("n", "int")], "mask", _constraint(masks.max_tokens), "only EOS after n tokens", "mask"),
    _b("end_of_text", [], "mask", _constraint(masks.end_of_text), "the end-of-text token only", "mask"),
    _b("regex", [("pattern", "str"), ("allow_eos", "bool", True)], "mask", _constraint(patterns.regex),
       "the text matches the regular expression in full (llguidance masks)", "mask"),
    _b("regex_search", [("pattern", "str"), ("allow_eos", "bool", True)], "mask", _constraint(patterns.search),
       "the text contains a match of the regular expression (llguidance masks)", "mask"),
    _b("done", [("m", "mask"), ("c", "context")], "bool", _done,
       "the pattern m is complete in c and allows nothing more (regex, grammar, json_schema): finish here"),
    _b("json_schema", [("schema", "str"), ("lenient", "bool", False)], "mask",
       _constraint(lambda schema, lenient=False: patterns.json_schema(schema, lenient=lenient)),
       "the text is JSON valid under this JSON schema (given as JSON text); lenient: keywords the mask "
       "cannot enforce are checked on the complete text", "mask"),
    _b("partial_regex", [("pattern", "str")], "mask", _constraint(checks.partial_regex),
       "the text matches the pattern, checked token by token (look-around, back-references)", "mask"),
    _b("grammar", [("text", "str"), ("start", "str", "start")], "mask", _constraint(checks.grammar),
       "the text is a sentence of this Lark grammar (llguidance's Lark dialect, masks)", "mask"),
    _b("json_grammar", [], "mask", _constraint(checks.json_grammar), "the text is one JSON value", "mask"),
    # distributions (only after `sample` or `observe ... from`)
    _b("next", [("c", "context")], "token", None, "the LM's next token in c", "distribution"),
    _b("word", [("c", "context")], "str", None, "the LM's next word in c (its text)", "distribution"),
    _b("continuation", [("c", "context")], "str", None, "text continuing c (observe only)", "distribution"),
    _b("bernoulli", [("p", "number")], "bool", None, "true with probability p", "distribution"),
    _b("categorical", [("values", "list"), ("probs", "list")], "any", None,
       "one of values, with the given probabilities", "distribution"),
    _b("geometric", [("p", "number")], "int", None, "failures before the first success", "distribution"),
]

BUILTINS: dict[str, Builtin] = {b.name: b for b in _BUILTINS}

CONSTANTS = {"eos": "token"}  # `eos` equals the end-of-text token of any model

# Names people reach for that the sandbox deliberately lacks, with what to do instead.
FORBIDDEN = {
    name: "a .steer program cannot open files, import modules or run Python; pass data in with `input`"
    for name in ("open", "eval", "exec", "compile", "__import__", "import", "getattr", "setattr", "globals",
                 "locals", "vars", "input", "print", "exit", "quit", "breakpoint", "help", "dir", "type",
                 "delattr", "memoryview", "object", "os", "sys", "subprocess")
}

SETTINGS: dict[str, dict[str, str]] = {
    "smc": {"particles": "int", "ess": "float", "resampling": "str", "seed": "int", "max_tokens": "int"},
    "smc-steer": {"particles": "int", "beam": "int", "seed": "int", "max_tokens": "int"},
    "is": {"particles": "int", "seed": "int", "max_tokens": "int"},
}
METHOD_ALIASES = {"smc_steer": "smc-steer", "importance": "is"}
