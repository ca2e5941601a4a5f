"""The .steer parser: every construct becomes the expected typed AST node, at the right place."""

import pytest

from steer_lang import LangError, ast, parse


def body(source):
    return parse(source).body


def only(source):
    (stmt,) = body(source)
    return stmt


def test_declarations():
    m = parse('input prompt = "Hi"\ninput n: int\ninput xs: list = [1, 2.5, "a", true]\n'
              'model "models/tiny"\nsampler smc-steer(particles = 4, beam = 2,)\nresult text(c)\n'
              "def f(a, b):\n    return a + b\n")
    assert [(i.name, i.type) for i in m.inputs] == [("prompt", None), ("n", "int"), ("xs", "list")]
    assert m.inputs[0].default.value == "Hi" and m.inputs[1].default is None
    assert [item.value for item in m.inputs[2].default.items] == [1, 2.5, "a", True]
    assert m.models[0].path == "models/tiny"
    assert m.samplers[0].method == "smc-steer"
    assert [(s.name, s.value.value) for s in m.samplers[0].settings] == [("particles", 4), ("beam", 2)]
    assert isinstance(m.results[0].value, ast.Call) and m.results[0].value.func == "text"
    f = m.functions[0]
    assert (f.name, f.params, type(f.body[0])) == ("f", ["a", "b"], ast.Return)
    assert parse("model default\n").models[0].path is None


def test_literals_and_operators():
    e = only("x = -1 + 2 * 3 // 4 % 5 - 6 / 2.5e1\n").value
    assert isinstance(e, ast.Binary) and e.op == "-"  # left-associative, * binds tighter than +
    assert e.left.op == "+" and isinstance(e.left.left, ast.Unary) and e.left.right.op == "%"
    assert e.right.op == "/" and e.right.right.value == 25.0
    e = only("x = not a and b or c in d and e not in f\n").value
    assert e.op == "or" and e.left.op == "and" and e.left.left.op == "not"
    assert e.right.op == "and" and e.right.left.op == "in" and e.right.right.op == "not in"
    for op in ("==", "!=", "<", "<=", ">", ">="):
        assert only(f"x = a {op} b\n").value.op == op
    assert only("x = 'it\\'s\\n'\n").value.value == "it's\n"
    assert [only(f"x = {v}\n").value.value for v in ("true", "True", "false", "False")] == [True, True, False, False]
    assert only("x = []\n").value.items == []


def test_indexing_slicing_calls():
    e = only("x = words(s)[0][1:][:2][:]\n").value
    assert isinstance(e, ast.Slice) and e.start is None and e.stop is None
    assert isinstance(e.target, ast.Slice) and e.target.stop.value == 2 and e.target.start is None
    assert isinstance(e.target.target.target, ast.Index)
    call = only("x = word_length(5, min=2, allow_eos=false)\n").value
    assert call.func == "word_length" and call.args[0].value == 5
    assert [(k.name, k.value.value) for k in call.kwargs] == [("min", 2), ("allow_eos", False)]
    assert isinstance(only("x = c.text\n").value, ast.Attribute)  # parsed, then refused by the checker


def test_statements():
    s = only("t = sample next(c) where word_length(max=5) and not charset('x')\n")
    assert (s.target, s.dist.func, s.where.op) == ("t", "next", "and")
    assert only("sample word(c)\n").target is None and only("sample word(c)\n").where is None
    s = only("observe t from next(b)\n")
    assert isinstance(s, ast.Observe) and s.value.id == "t" and s.dist.func == "next"
    assert isinstance(only("condition len(s) > 2\n"), ast.Condition)
    assert only("score -1.5\n").value.op == "-"
    assert isinstance(only("twist 0.5 * n\n"), ast.Twist)
    assert isinstance(only("finish\n"), ast.Finish)
    assert isinstance(only("context c = prompt + \"!\"\n"), ast.ContextDecl)
    a = only("n += 1\n")
    assert isinstance(a, ast.Assign) and a.op == "+="
    assert isinstance(only("len(x)\n"), ast.ExprStmt)
    assert isinstance(parse("import os\n").imports[0], ast.Import)
    assert isinstance(parse("from os import path\n").imports[0], ast.Import)


def test_blocks():
    src = """
repeat 3 as i:
    if i == 0: stop
    elif i == 1:
        x = 1
    else:
        x = 2
while x < 5 max 10:
    x += 1
for w in ["a", "b"]:
    # a comment line inside a block

    score 1
repeat n: finish
"""
    r, w, f, r2 = body(src)
    assert isinstance(r, ast.Repeat) and r.var == "i" and r.count.value == 3
    branch_if = r.body[0]
    assert len(branch_if.branches) == 2 and isinstance(branch_if.branches[0][1][0], ast.Stop)
    assert isinstance(branch_if.orelse[0], ast.Assign)
    assert isinstance(w, ast.While) and w.max.value == 10 and isinstance(w.body[0], ast.Assign)
    assert isinstance(f, ast.For) and f.var == "w" and isinstance(f.body[0], ast.Score)
    assert isinstance(r2, ast.Repeat) and r2.var is None and isinstance(r2.body[0], ast.Finish)
    assert body("while x max 3:\n    x = 1\n")[0].max.value == 3
    assert body("while x:\n    x = 1\n")[0].max is None  # parsed; the checker refuses it


def test_positions_are_one_based_and_point_at_the_construct():
    m = parse('input p = "x"\n\ncontext c = p\nrepeat 2:\n    t = sample next(c)\n')
    ctx, loop = m.body
    assert (ctx.line, ctx.col) == (3, 1) and (ctx.prompt.line, ctx.prompt.col) == (3, 13)
    sample = loop.body[0]
    assert (sample.line, sample.col) == (5, 5) and (sample.dist.line, sample.dist.col) == (5, 16)


def test_brackets_continue_lines_and_no_trailing_newline_is_needed():
    m = parse('input xs = [\n    "a",\n    "b",\n]\nx = len(\n  xs)')
    assert len(m.inputs[0].default.items) == 2 and isinstance(m.body[0], ast.Assign)


@pytest.mark.parametrize("source,line,col,fragment", [
    ("x = 1 +\n", 1, 8, "expected"),
    ("x = (1 + 2\n", 1, 10, "unexpected end of file"),
    ("repeat 3\n    x = 1\n", 1, 9, "expected ':'"),
    ("if x:\n    y = 1\n  z = 2\n", 3, 3, "indentation"),
    ("x = 1 $ 2\n", 1, 7, "unexpected character '$'"),
    ('x = "unterminated\n', 1, 5, "unexpected character"),
    ("x = 99999999999999999999999999999999999999999999" + "9" * 5000 + "\n", 1, 5, "too large"),
    ('x = "\\N{nonsense}"\n', 1, 5, "invalid escape"),
])
def test_syntax_errors_are_located(source, line, col, fragment):
    with pytest.raises(LangError) as info:
        parse(source, "p.steer")
    d = info.value.first
    assert (d.filename, d.line, d.col) == ("p.steer", line, col), str(info.value)
    assert fragment in d.message
    assert str(info.value).startswith(f"p.steer:{line}:{col}: ")
