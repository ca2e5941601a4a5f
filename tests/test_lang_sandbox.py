"""The sandbox: a .steer program cannot import, touch files, reach Python objects, loop or recurse
forever, or exhaust memory; each attempt is refused with a clear message."""

import pytest

from steer_lang import LangError, Script


def refused(source, lm=None):
    with pytest.raises(LangError) as info:
        script = Script.from_source(source, "p.steer")
        script.run(lm, particles=1)
    return str(info.value)


@pytest.mark.parametrize("source,message", [
    ("import os\n", "imports are not allowed"),
    ("from os import system\n", "imports are not allowed"),
    ('x = open("/etc/passwd")\n', "'open' is not available: a .steer program cannot open files"),
    ('x = eval("1")\n', "'eval' is not available"),
    ('x = __import__("os")\n', "'__import__' is not available"),
    ('x = "".__class__\n', "attribute access (.__class__) is not part of the language"),
    ("x = __builtins__\n", "undefined name '__builtins__'"),
    ("while true:\n    x = 1\n", "unbounded loop"),
    ("def f(n):\n    return f(n - 1)\nx = f(3)\n", "recursion is not allowed, so every program ends: f -> f"),
])
def test_refused_before_running(source, message):
    assert message in refused(source)


@pytest.mark.slow
@pytest.mark.parametrize("source,message", [
    ("repeat 100000000:\n    x = 1\n", "ran more than 1,000,000 statements"),
    ("def spin(n):\n    k = 0\n    repeat n:\n        k += 1\n    return k\nx = spin(10000000)\n",
     "ran more than 1,000,000 statements"),
    ('x = "a" * 100000000\n', "the limit is 1,000,000"),
    ('s = "ab"\nrepeat 40:\n    s = s + s\n', "the limit is 1,000,000"),
    ("x = range(100000000)\n", "the limit is 1,000,000"),
    ("x = 2\nrepeat 10:\n    x = x * x\n", "integer beyond ±2**63"),
    ("x = 10.0\nrepeat 12:\n    x = exp(x)\n", "exp"),
    ('x = round(float("inf"))\n', "cannot convert 'inf' to a finite float"),
    ("x = round(1e300)\n", "cannot round 1e+300 to an integer"),
])
def test_limits_hold_at_run_time(tiny_lm, source, message):
    assert message in refused(source, tiny_lm)


def test_while_stops_at_its_bound_at_run_time(tiny_lm):
    post = Script.from_source("n = 0\nwhile true max 7:\n    n += 1\nresult n\n").run(tiny_lm, particles=1)
    assert post.particles[0].result() == 7


@pytest.mark.parametrize("source,message", [
    # sizes are checked before a value is built: these would take gigabytes
    ('s = "a" * 999999\nl = [s] * 999999\n', "999,999,000,000 characters and items in all"),
    ('s = "a" * 999999\nl = [s, s]\nrepeat 40:\n    l = l + l\n', "the limit is 10,000,000"),
    ('s = "a" * 999999\nl = [s] * 9\nx = str(l)\n', "the text of this list would be longer"),
    ('s = "a" * 999999\nl = [s] * 9\nx = join(l, "")\n', "the joined text would be longer"),
    ('s = "a" * 999999\nl = [s, s, s, s, s, s, s, s, s, s, s]\n', "the limit is 10,000,000"),
    ('s = split("a b " * 240000)\nl = [s, s, s, s, s, s, s, s, s, s, s]\n', "the limit is 10,000,000"),
])
def test_memory_is_bounded_before_building(tiny_lm, source, message):
    assert message in refused(source, tiny_lm)


def test_size_of_counts_shared_lists_in_full_without_walking_them_twice():
    from steer_lang.builtins import size_of

    s = "a" * 1000
    inner = [s] * 1000
    outer = [inner] * 1000
    assert size_of(inner) == 1000 + 1000 * 1000
    assert size_of(outer) == 1000 + 1000 * size_of(inner)


@pytest.mark.slow
def test_the_run_stops_at_its_time_limit(tiny_lm):
    import time

    source = 'n = 0\nrepeat 100000:\n    if matches("a" * 3000 + "b", "(a+)+$"):\n        n += 1\nresult n\n'
    started = time.monotonic()
    with pytest.raises(LangError) as info:
        Script.from_source(source, "slow.steer").run(tiny_lm, particles=1, time_limit=2)
    assert time.monotonic() - started < 4
    assert "slow.steer:3:" in str(info.value) and ("time limit" in str(info.value))


def test_helper_calls_nest_at_most_the_limit():
    from steer_lang.builtins import MAX_CALL_DEPTH

    def chain(first):
        links = "".join(f"def f{i}(x):\n    return f{i + 1}(x)\n" for i in range(first, MAX_CALL_DEPTH))
        return links + f"def f{MAX_CALL_DEPTH}(x):\n    return x\nresult f{first}(1)\n"

    Script.from_source(chain(1))  # f1 .. f50: 50 nested calls
    message = refused(chain(0))
    assert "p.steer:1:5: calling 'f0' nests 51 helper calls; the limit is 50" in message


@pytest.mark.parametrize("call,message", [
    ('regex("[a-")', "regex(): invalid regular expression"),
    ('partial_regex("(?<")', "partial_regex()"),
    ('grammar("start: x")', 'unknown name: "x" (grammar line 1, column 8)'),
    ('json_schema("{not json")', "not valid JSON"),
    ('regex("(?<=a)b")', "partial_regex checks look-around"),
    ('json_schema("{\\"not\\": {}}")', 'Unimplemented keys: [\"not\"] at $'),
])
def test_check_compiles_literal_patterns_as_run_would(call, message):
    with pytest.raises(LangError) as info:
        Script.from_source(f'context c = "a"\nt = sample next(c) where {call}\n', "p.steer")
    assert "p.steer:2:" in str(info.value) and message in str(info.value)


def test_resource_paths_stay_in_the_programs_folder(tmp_path):
    program = tmp_path / "prog"
    program.mkdir()
    (program / "inside").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (program / "link").symlink_to(outside)
    for written in ("../elsewhere", str(outside), "link", "~"):
        (program / "p.steer").write_text(f'reward_model judge = "{written}"\nx = 1\n')
        script = Script.from_file(program / "p.steer")
        with pytest.raises(LangError) as info:
            script.resources()
        assert f"p.steer:1:14: '{written}' is outside the program's folder" in str(info.value)
    (program / "p.steer").write_text('model "../elsewhere"\nx = 1\n')
    with pytest.raises(LangError, match="outside the program's folder"):
        Script.from_file(program / "p.steer").model_path()
    assert Script.from_file(program / "p.steer", allow_paths=[outside]).model_path() == outside.resolve()
