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


@pytest.mark.parametrize("source,message", [
    ("repeat 100000000:\n    x = 1\n", "ran more than 1,000,000 statements"),
    ("def spin(n):\n    k = 0\n    repeat n:\n        k += 1\n    return k\nx = spin(10000000)\n",
     "ran more than 1,000,000 statements"),
    ('x = "a" * 100000000\n', "the limit is 1,000,000"),
    ('s = "ab"\nrepeat 40:\n    s = s + s\n', "the limit is 1,000,000"),
    ("x = range(100000000)\n", "the limit is 1,000,000"),
    ("x = 2\nrepeat 10:\n    x = x * x\n", "integer too large"),
    ("x = 10.0\nrepeat 12:\n    x = exp(x)\n", "exp"),
])
def test_limits_hold_at_run_time(tiny_lm, source, message):
    assert message in refused(source, tiny_lm)


def test_while_stops_at_its_bound_at_run_time(tiny_lm):
    post = Script.from_source("n = 0\nwhile true max 7:\n    n += 1\nresult n\n").run(tiny_lm, particles=1)
    assert post.particles[0].result() == 7
