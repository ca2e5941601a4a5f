"""The checker: each kind of error at its exact line:col, all errors of a file reported at once."""

import pytest

from steer_lang import LangError, Script, check, parse

HEADER = 'input prompt = "Hello"\ncontext c = prompt\n'  # lines 1-2 of every case below


def errors(source):
    with pytest.raises(LangError) as info:
        Script.from_source(HEADER + source, "p.steer")
    return [(d.line, d.col, d.message) for d in info.value.diagnostics]


def one_error(source):
    (error,) = errors(source)
    return error


@pytest.mark.parametrize("source,line,col,fragment", [
    # names
    ("x = y + 1\n", 3, 5, "undefined name 'y'"),
    ("x = promt\n", 3, 5, "did you mean 'prompt'"),
    ("x = len\n", 3, 5, "'len' is a function"),
    ("def f(a):\n    return a + c\n", 4, 16, "a function sees only its parameters and the inputs"),
    # calls: arity, keywords, types
    ("x = len(prompt, 2)\n", 3, 5, "takes at most 1 argument, got 2"),
    ("x = contains(prompt)\n", 3, 5, "missing argument 'sub'"),
    ("x = word_length(maxx=3)\n", 3, 17, "has no parameter 'maxx'"),
    ("x = word_length(3, max=4)\n", 3, 20, "got two values for 'max'"),
    ("x = text(prompt)\n", 3, 10, "argument 'c' of text() must be context, got str"),
    ("x = upper(3)\n", 3, 11, "must be text, got int"),
    ("x = frobnicate(3)\n", 3, 5, "unknown function 'frobnicate'"),
    ("def f(a):\n    return a\nx = f(1, 2)\n", 5, 5, "f() takes 1 argument, got 2"),
    # operator types
    ('x = prompt + 1\n', 3, 12, "cannot apply '+' to str and int"),
    ('x = prompt < 3\n', 3, 12, "cannot compare str and int"),
    ('x = 3 in 4\n', 3, 7, "needs a string or a list on its right"),
    ('x = -prompt\n', 3, 5, "cannot negate str"),
    ("x = prompt[1.5]\n", 3, 12, "positions must be whole numbers"),
    # sampling and observing
    ("t = sample len(prompt)\n", 3, 12, "`sample` needs a distribution"),
    ("t = next(c)\n", 3, 5, "next(...) is a distribution"),
    ("t = sample next(prompt)\n", 3, 17, "argument 'c' of next() must be context, got str"),
    ("t = sample next(c) where 5\n", 3, 26, "`where` needs a token mask"),
    ("t = sample bernoulli(0.5) where word_length(max=3)\n", 3, 33, "`where` restricts tokens"),
    ('sample continuation(c)\n', 3, 8, "can only be observed"),
    ("observe 3 from next(c)\n", 3, 9, "needs a token or a one-token string"),
    ("observe 3 from bernoulli(0.5)\n", 3, 9, "produces bool"),
    ('score "high"\n', 3, 7, "`score` needs a number"),
    ("x = word_length(max=3) and 4\n", 3, 5, "cannot combine a mask with int"),
    # control flow
    ("while true:\n    x = 1\n", 3, 1, "unbounded loop"),
    ("while true max 2.5:\n    x = 1\n", 3, 16, "`max` needs a whole number"),
    ('repeat "3":\n    x = 1\n', 3, 8, "repeat needs a whole number"),
    ("for x in 3:\n    y = x\n", 3, 10, "needs a list or a string"),
    ("stop\n", 3, 1, "`stop` outside a loop"),
    ("return 1\n", 3, 1, "`return` outside a function"),
    ("len(prompt)\n", 3, 1, "does nothing on its own"),
    # inputs and declarations
    ('prompt = "other"\n', 3, 1, "cannot assign to input 'prompt'"),
    ("repeat 2 as prompt:\n    x = 1\n", 3, 1, "cannot assign to input 'prompt'"),
    ("input n: integer = 3\n", 3, 7, "unknown input type 'integer'"),
    ("input n\n", 3, 7, "needs a type or a default"),
    ('input n: int = "3"\n', 3, 16, "declared int but its default is str"),
    ("input prompt = 3\n", 3, 7, "input 'prompt' is declared twice"),
    ("eos = 3\n", 3, 1, "would hide the constant 'eos'"),
    ("def len(x):\n    return x\n", 3, 5, "would hide the built-in 'len'"),
    ("def f(x):\n    x = 1\n", 3, 5, "never returns a value"),
    ("def f(x):\n    sample next(c)\n    return x\n", 4, 5, "`sample` cannot appear in function 'f'"),
    # settings
    ("sampler mcmc(particles = 3)\n", 3, 9, "unknown sampler 'mcmc'"),
    ("sampler smc(particle = 3)\n", 3, 13, "unknown setting 'particle' for smc (did you mean 'particles'?)"),
    ("sampler smc-steer(ess = 0.5)\n", 3, 19, "unknown setting 'ess' for smc-steer"),
    ("sampler smc(particles = 0)\n", 3, 25, "particles must be a whole number of at least 1"),
    ("sampler smc(ess = 2)\n", 3, 19, "ess must lie between 0 and 1"),
    ('sampler smc(resampling = "random")\n', 3, 26, "unknown resampling scheme"),
    ('sampler smc(seed = "x")\n', 3, 20, "setting 'seed' must be int, got str"),
    ("sampler smc(seed = 1, seed = 2)\n", 3, 23, "given twice"),
    ("model default\nmodel default\n", 4, 1, "at most one `model`"),
    ('context d = "x", healing = false\n', 3, 18, "unknown context option 'healing'"),
    ('context d = "x", heal = 3\n', 3, 25, "`heal` must be true or false"),
    ('context d = "x", max_tokens = 0\n', 3, 31, "`max_tokens` must be at least 1"),
    ('context d = "x", end = ""\n', 3, 24, "`end` strings must not be empty"),
    ('context d = "x", end = 3\n', 3, 24, "`end` must be a string or a list of strings"),
    ('context d = "x"\nsample next(d) where prefer_words(["good"], "x")\n', 4, 45, "must be float, got str"),
    # retrievers
    ('x = retrieve("wiki", prompt)\n', 3, 14, "must be retriever, got str"),
    ('retriever wiki = "idx"\nwiki = 3\n', 4, 1, "cannot assign to retriever 'wiki'"),
    ('retriever prompt = "idx"\n', 3, 11, "'prompt' is already declared"),
    ('retriever wiki = "idx"\nx = retrieve(wiki)\n', 4, 5, "missing argument 'query'"),
])
def test_error_kinds_with_exact_positions(source, line, col, fragment):
    found = errors(source)
    assert any((l, c) == (line, col) and fragment in m for l, c, m in found), found


def test_recursion_is_refused_directly_and_through_another_function():
    (line, col, message), = errors("def f(n):\n    return f(n)\n")
    assert (line, col) == (3, 5) and "recursion is not allowed" in message and "f -> f" in message
    found = errors("def f(n):\n    return g(n)\ndef g(n):\n    return f(n)\n")
    assert len(found) == 1 and "f -> g -> f" in found[0][2]


def test_several_errors_are_all_reported_in_source_order():
    found = errors("x = y\nz = len(1, 2)\nwhile true:\n    stop\nprompt = 1\n")
    assert [(l, c) for l, c, _ in found] == [(3, 5), (4, 5), (5, 1), (7, 1)]


def test_formatted_report_has_location_source_line_and_caret():
    with pytest.raises(LangError) as info:
        Script.from_source("x = 1\ny = x + zz\n", "prog.steer")
    assert str(info.value) == "prog.steer:2:9: undefined name 'zz'\n    y = x + zz\n            ^"


def test_a_correct_program_passes():
    check(parse(HEADER + """
input words_wanted = ["a", "b"]
sampler smc(particles = 4, ess = 0.3, resampling = "stratified", seed = 1, max_tokens = 9)
def shout(s):
    out = upper(s)
    repeat 2:
        out += "!"
    return out
context d = "x", heal = false
s = sample next(d) where regex("a+") and banned_words(["b"]) and not end_of_text()
repeat 3 as i:
    t = sample next(c) where word_length(max=5) and not charset("xyz")
    w = sample word(c)
    b = sample bernoulli(0.5)
    k = sample categorical(["x", "y"], [0.3, 0.7])
    observe t from next(c)
    observe shout(w) from continuation(c)
    if t == eos or i > 1:
        finish
    twist 0.1 * len(text(c))
score -abs(len(words(text(c))) - 3)
condition matches(text(c), "[a-z ]*") or contains(words_wanted, "a")
result [text(c), shout(prompt)]
"""))
