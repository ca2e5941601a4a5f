"""Fuzzing: random and mutated programs never make the parser, checker or interpreter raise anything
but the language's own error (LangError, or SteerError for a run that cannot succeed)."""

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steer.errors import SteerError
from steer_lang import LangError, Script, parse
import pytest

pytestmark = pytest.mark.slow  # hundreds of generated programs: seconds each, so not in the fast subset

EXAMPLES = [p.read_text() for p in sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.steer"))]
PIECES = ["sample", "observe", "from", "where", "next(c)", "word(c)", "repeat", "while", "max", "for", "in",
          "if", "elif", "else", ":", "(", ")", "[", "]", ",", "=", "+=", "==", "-", "*", "/", "//", "%",
          "not", "and", "or", "stop", "finish", "return", "def", "input", "context", "sampler", "model",
          "result", "condition", "score", "twist", '"', "'", "#", "\n", "\n    ", "    ", "\t", "\\", "eos",
          "0", "1", "-1", "1e309", "9" * 30, "x", "c", "prompt", "import os", ".", "__class__", "\r\n"]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def mutated(draw):
    """An example program with a few edits: deletions, insertions of language pieces, line moves."""
    text = draw(st.sampled_from(EXAMPLES))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "duplicate_line", "swap_lines", "replace"]))
        i = draw(st.integers(0, len(text)))
        if kind == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 12)):]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(PIECES)) + text[i:]
        elif kind == "replace":
            text = text[:i] + draw(st.text(max_size=3)) + text[i + 1:]
        else:
            lines = text.split("\n")
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if kind == "duplicate_line":
                lines.insert(b, lines[a])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
    return text


def parse_and_check(source):
    try:
        return Script.from_source(source, "fuzz.steer")
    except LangError as e:
        assert e.diagnostics and all(d.line >= 1 and d.col >= 1 for d in e.diagnostics)
        assert str(e).startswith("fuzz.steer:")
        return None


@FUZZ
@given(st.text(max_size=200))
def test_random_text(source):
    parse_and_check(source)


@FUZZ
@given(st.lists(st.sampled_from(PIECES + [" ", "  "]), max_size=40).map("".join))
def test_random_token_soup(source):
    parse_and_check(source)


@FUZZ
@given(mutated())
def test_mutated_examples(source):
    parse_and_check(source)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_examples_that_check_also_run_safely(tiny_lm_for_fuzz, source):
    script = parse_and_check(source)
    if script is None:
        return
    try:
        script.run(tiny_lm_for_fuzz, particles=2, max_tokens=4)
    except SteerError:  # LangError at a place, ParticlesDiedError, a bad --set: all the user's to fix
        pass


def test_every_example_parses():
    assert all(parse(source) for source in EXAMPLES)


# -- built-ins with extreme arguments ----------------------------------------------------------------
from steer_lang.builtins import BUILTINS  # noqa: E402

EXTREME = {  # .steer expressions for each parameter type: empty, huge, unicode, out-of-range, negative
    "str": ['""', '"a" * 999999', '"\\u0130\\ufb03é😀"', '" "', '"(a+)+$"', '"[" * 5000', '"\\n\\t"'],
    "int": ["0", "-1", "4611686018427387904", "-4611686018427387904", "999999", "1"],
    "float": ["0.0", "-1.5", "1e308", "1e-308", "-1e308", "0.5"],
    "bool": ["true", "false"],
    "list": ["[]", '["a"] * 999999', '[1, "a", [2.5]]', '[[[[]]]]', '["ab", "b"]', "[0.0, -1]"],
    "context": ["c"],
}
EXTREME["text"] = EXTREME["str"]
EXTREME["number"] = EXTREME["int"] + EXTREME["float"]
EXTREME["any"] = [e for kind in ("str", "int", "float", "list", "bool") for e in EXTREME[kind]]
CALLABLE = sorted(name for name, b in BUILTINS.items() if b.kind in ("function", "mask")
                  and all(p.type in EXTREME for p in b.params))


@st.composite
def builtin_calls(draw):
    """A program of one to three calls of built-ins with extreme arguments, each result fed onwards."""
    lines = ['context c = "ab"']
    for i in range(draw(st.integers(1, 3))):
        builtin = BUILTINS[draw(st.sampled_from(CALLABLE))]
        args = [draw(st.sampled_from(EXTREME[p.type] + ([f"x{i - 1}"] if i else []))) for p in builtin.params
                if p.default is REQUIRED_PARAM or draw(st.booleans())]
        lines.append(f"x{i} = {builtin.name}({', '.join(args)})")
    lines.append(f"result str(x{i})")
    return "\n".join(lines) + "\n"


from steer_lang.builtins import REQUIRED as REQUIRED_PARAM  # noqa: E402


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(builtin_calls())
def test_builtins_with_extreme_arguments_end_with_a_result_or_a_located_error(tiny_lm_for_fuzz, source):
    """Every such program ends with a result or a `file:line:col` error, within the time budget (the
    work and size limits stop what would run long or grow large)."""
    import time

    script = parse_and_check(source)
    if script is None:
        return
    started = time.monotonic()
    try:
        posterior = script.run(tiny_lm_for_fuzz, particles=1, time_limit=20)
        assert posterior.particles[0].value is not None
    except LangError as e:
        assert e.diagnostics and all(d.line >= 1 and d.col >= 1 for d in e.diagnostics), e
    except SteerError as e:
        assert str(e).startswith("fuzz.steer:"), e
    assert time.monotonic() - started < 30, source
