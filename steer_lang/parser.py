"""Source text -> typed AST (`steer_lang.ast`), with syntax errors as `file:line:col` diagnostics."""

from __future__ import annotations

import ast as python_ast
import functools
import math
from collections.abc import Iterator
from importlib import resources

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)
from lark.lark import PostLex

from . import ast
from .errors import Diagnostic, LangError
from .limits import MAX_INT, first_surrogate

TAB = 4
_OPEN, _CLOSE = {"LPAR", "LSQB"}, {"RPAR", "RSQB"}

# How terminals read in "expected ..." messages.
_READABLE = {
    "_NL": "end of line", "$END": "end of file", "_INDENT": "an indented block", "_DEDENT": "end of block",
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "METHOD": "a method name (smc, smc-steer, is)",
}


class _Problem(Exception):
    def __init__(self, line: int, col: int, message: str):
        self.line, self.col, self.message = line, col, message


class _Indenter(PostLex):
    """Python-style INDENT / DEDENT tokens (no indentation inside brackets), with positioned errors."""

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        levels, depth, last = [0], 0, None
        for token in stream:
            last = token
            if token.type == "_NL":
                if depth:
                    continue
                yield token
                tail = token.value.rsplit("\n", 1)[-1] if "\n" in token.value else ""
                indent_text = tail[: len(tail) - len(tail.lstrip(" \t"))]
                if tail.lstrip(" \t").startswith("#"):  # a comment at the very end of the file
                    indent_text = ""
                indent = indent_text.count(" ") + TAB * indent_text.count("\t")
                if indent > levels[-1]:
                    levels.append(indent)
                    yield Token.new_borrow_pos("_INDENT", indent_text, token)
                else:
                    while indent < levels[-1]:
                        levels.pop()
                        yield Token.new_borrow_pos("_DEDENT", indent_text, token)
                    if indent != levels[-1]:
                        raise _Problem(token.end_line, indent + 1,
                                       "this line's indentation matches no enclosing block")
                continue
            if token.type in _OPEN:
                depth += 1
            elif token.type in _CLOSE:
                depth = max(depth - 1, 0)
            yield token
        while len(levels) > 1:
            levels.pop()
            yield Token.new_borrow_pos("_DEDENT", "", last) if last else Token("_DEDENT", "")


@functools.cache
def _lark() -> Lark:
    grammar = resources.files(__package__).joinpath("steer.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", postlex=_Indenter(), propagate_positions=True,
                maybe_placeholders=True)


def _pos(item) -> tuple[int, int]:
    if isinstance(item, Token):
        return item.line, item.column
    if isinstance(item, ast.Node):
        return item.line, item.col
    return item.line, item.column  # a lark Meta


@v_args(meta=True)
class _ToAST(Transformer):
    """Lark tree -> dataclasses.  Positions come from the token that best names the construct."""

    def __init__(self, filename: str, source: str):
        super().__init__()
        self.filename, self.source = filename, source

    # -- module and declarations -------------------------------------------------------------------
    def start(self, meta, items):
        module = ast.Module(1, 1, self.filename, self.source)
        lists = {ast.Input: module.inputs, ast.ModelDecl: module.models, ast.ResourceDecl: module.resources,
                 ast.SamplerDecl: module.samplers,
                 ast.FunctionDef: module.functions, ast.ResultDecl: module.results, ast.Import: module.imports}
        for item in items:
            if isinstance(item, Token):  # a leading newline
                continue
            lists.get(type(item), module.body).append(item)
        return module

    def input_decl(self, meta, c):
        name, type_, default = c
        return ast.Input(*_pos(name), str(name), str(type_) if type_ is not None else None, default)

    def model_decl(self, meta, c):
        value, *options = c
        path = None if value.type == "DEFAULT" else self._string(value)
        return ast.ModelDecl(*_pos(meta), path, options)

    def model_option(self, meta, c):
        name, value = c
        return ast.ModelOption(*_pos(name), str(name), self._string(value))

    def resource_decl(self, meta, c):
        kind, name, path = c[0], c[1], c[3]  # "!" keeps the keyword, and so "=" and the newline too
        return ast.ResourceDecl(*_pos(name), str(kind), str(name), self._string(path))

    def sampler_decl(self, meta, c):
        method, *settings = c
        return ast.SamplerDecl(*_pos(method), str(method), [s for s in settings if s is not None])

    def setting(self, meta, c):
        name, value = c
        return ast.Setting(*_pos(name), str(name), value)

    def def_decl(self, meta, c):
        name, *params, body = c
        return ast.FunctionDef(*_pos(name), str(name), [str(p) for p in params if p is not None], body)

    def result_decl(self, meta, c):
        return ast.ResultDecl(*_pos(meta), c[0])

    def import_stmt(self, meta, c):
        return ast.Import(*_pos(meta))

    # -- statements --------------------------------------------------------------------------------
    def target(self, meta, c):
        return c[0]

    def assign(self, meta, c):
        name, value = c
        return ast.Assign(*_pos(name), str(name), value)

    def aug_assign(self, meta, c):
        name, op, value = c
        return ast.Assign(*_pos(name), str(name), value, str(op))

    def sample_stmt(self, meta, c):
        target, dist, where = c
        return ast.Sample(*_pos(meta), str(target) if target is not None else None, dist, where)

    def observe_stmt(self, meta, c):
        value, dist = c
        return ast.Observe(*_pos(meta), value, dist)

    def condition_stmt(self, meta, c):
        return ast.Condition(*_pos(meta), c[0])

    def score_stmt(self, meta, c):
        return ast.Score(*_pos(meta), c[0])

    def twist_stmt(self, meta, c):
        return ast.Twist(*_pos(meta), c[0])

    def finish_stmt(self, meta, c):
        return ast.Finish(*_pos(c[0]))

    def stop_stmt(self, meta, c):
        return ast.Stop(*_pos(c[0]))

    def return_stmt(self, meta, c):
        return ast.Return(*_pos(meta), c[0])

    def context_stmt(self, meta, c):
        name, prompt, *options = c
        return ast.ContextDecl(*_pos(meta), str(name), prompt, options)

    def expr_stmt(self, meta, c):
        return ast.ExprStmt(*_pos(c[0]), c[0])

    def suite(self, meta, c):
        return [s for s in c if isinstance(s, ast.Stmt)]

    def if_stmt(self, meta, c):
        test, body, *elifs, orelse = c
        return ast.If(*_pos(meta), [(test, body), *elifs], orelse or [])

    def elif_clause(self, meta, c):
        return (c[0], c[1])

    def repeat_stmt(self, meta, c):
        count, var, body = c
        return ast.Repeat(*_pos(meta), count, str(var) if var is not None else None, body)

    def while_stmt(self, meta, c):
        test, _, bound, body = c
        return ast.While(*_pos(meta), test, bound, body)

    def for_stmt(self, meta, c):
        var, _, iterable, body = c
        return ast.For(*_pos(meta), str(var), iterable, body)

    # -- expressions -------------------------------------------------------------------------------
    def _chain(self, c, op=None):
        left = c[0]
        i = 1
        while i < len(c):
            if op is None:
                token, right = c[i], c[i + 1]
                i += 2
            else:
                token, right = None, c[i]
                i += 1
            line, col = _pos(token) if token is not None else _pos(left)
            left = ast.Binary(line, col, op or str(token), left, right)
        return left

    def or_expr(self, meta, c):
        return self._chain(c, "or")

    def and_expr(self, meta, c):
        return self._chain(c, "and")

    def not_op(self, meta, c):
        token, operand = c
        return ast.Unary(*_pos(token), "not", operand)

    def comparison(self, meta, c):
        left, (op, token), right = c
        return ast.Binary(*_pos(token), op, left, right)

    def comp_op(self, meta, c):
        return " ".join(str(t) for t in c), c[0]

    def aug_op(self, meta, c):
        return c[0]

    add_op = mul_op = aug_op

    def sum(self, meta, c):
        return self._chain(c)

    term = sum

    def neg(self, meta, c):
        return ast.Unary(*_pos(meta), "-", c[0])

    def index(self, meta, c):
        target, index = c
        return ast.Index(*_pos(meta), target, index)

    def slice(self, meta, c):
        target, start, stop = c
        return ast.Slice(*_pos(meta), target, start, stop)

    def attribute(self, meta, c):
        target, name = c
        return ast.Attribute(*_pos(name), target, str(name))

    def name(self, meta, c):
        return ast.Name(*_pos(c[0]), str(c[0]))

    def number(self, meta, c):
        token = c[0]
        text = str(token)
        shown = text if len(text) <= 24 else text[:20] + "..."
        try:
            value = float(text) if any(ch in text for ch in ".eE") else int(text)
        except (ValueError, OverflowError):
            raise _Problem(token.line, token.column, f"number {shown} is too large") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise _Problem(token.line, token.column, f"number {shown} is beyond the largest float (about 1.8e308)")
        if isinstance(value, int) and abs(value) >= MAX_INT:
            raise _Problem(token.line, token.column, f"integer {shown} is beyond ±2**63")
        return ast.Const(*_pos(token), value)

    def string(self, meta, c):
        return ast.Const(*_pos(c[0]), self._string(c[0]))

    def true(self, meta, c):
        return ast.Const(*_pos(meta), True)

    def false(self, meta, c):
        return ast.Const(*_pos(meta), False)

    def list(self, meta, c):
        return ast.ListExpr(*_pos(meta), [x for x in c if x is not None])

    def call(self, meta, c):
        name, *args = c
        positional = [a for a in args if isinstance(a, ast.Expr)]
        keywords = [a for a in args if isinstance(a, ast.Keyword)]
        return ast.Call(*_pos(name), str(name), positional, keywords)

    def arg(self, meta, c):
        name, value = c
        return value if name is None else ast.Keyword(*_pos(name), str(name), value)

    @staticmethod
    def _string(token: Token) -> str:
        try:
            value = python_ast.literal_eval(str(token))  # only ever a string literal (the lexer's STRING)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise _Problem(token.line, token.column, "invalid escape sequence in this string") from None
        if not isinstance(value, str):
            raise _Problem(token.line, token.column, "invalid string literal")
        bad = first_surrogate(value)
        if bad is not None:
            raise _Problem(token.line, token.column, f"\\u{ord(bad):04x} is half of a surrogate pair, not a "
                                                     "character: strings hold Unicode text")
        return value


def _describe(token: Token) -> str:
    if token.type in _READABLE and token.type not in ("NAME", "NUMBER", "STRING"):
        return _READABLE[token.type]
    return repr(str(token))


def _expected(names: set[str]) -> str:
    lark = _lark()
    shown = set()
    for name in names:
        if name in _READABLE:
            shown.add(_READABLE[name])
            continue
        try:
            pattern = lark.get_terminal(name).pattern
        except KeyError:
            continue
        if pattern.type == "str":
            shown.add(repr(pattern.value))
    if not shown:
        return ""
    items = sorted(shown, key=lambda s: (s[0] != "'", s))
    if len(items) > 12:
        items = items[:12] + ["..."]
    return "; expected " + ", ".join(items)


def _syntax_diagnostic(e: UnexpectedInput, filename: str) -> Diagnostic:
    if isinstance(e, UnexpectedCharacters):
        return Diagnostic(filename, e.line, e.column, f"syntax error: unexpected character {e.char!r}"
                          + _expected(e.allowed or set()))
    if isinstance(e, UnexpectedToken):
        token = e.token
        if token.type == "$END":
            line, col = (e.line, e.column) if e.line and e.line > 0 else (1, 1)
            return Diagnostic(filename, line, col, "syntax error: unexpected end of file" + _expected(e.expected))
        if token.type.startswith("__ANON"):  # the lexer fell back to a catch-all: one bad character
            return Diagnostic(filename, token.line or 1, token.column or 1,
                              f"syntax error: unexpected character {str(token)[:1]!r}")
        what = _describe(token)
        return Diagnostic(filename, token.line or 1, token.column or 1,
                          f"syntax error: unexpected {what}" + _expected(e.expected))
    if isinstance(e, UnexpectedEOF):
        return Diagnostic(filename, max(e.line, 1), max(e.column, 1), "syntax error: unexpected end of file")
    return Diagnostic(filename, getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1, f"syntax error: {e}")


MAX_SOURCE = 1_000_000  # characters of a program: a larger one is refused before parsing


def decode_source(data: bytes, filename: str) -> str:
    """A program file's bytes as text: UTF-8 (a leading byte-order mark is dropped); bytes that are
    not UTF-8 are an error at their line and column."""
    if len(data) > MAX_SOURCE:
        raise LangError([Diagnostic(filename, 1, 1, f"the program is larger than {MAX_SOURCE:,} bytes, "
                                                    "the limit for a program file")])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = data[:e.start]
        line = start.count(b"\n") + 1
        col = len(start[start.rfind(b"\n") + 1:].decode("utf-8", errors="replace")) + 1
        raise LangError([Diagnostic(filename, line, col, f"byte 0x{data[e.start]:02x} is not UTF-8 text "
                                                         "(save the program as UTF-8)")]) from None


def parse(source: str, filename: str = "<string>") -> ast.Module:
    """Parse `.steer` source into a Module.  Raises LangError (never anything else) on bad input."""
    source = source.removeprefix("\ufeff")  # a byte-order mark is not part of the program
    if len(source) > MAX_SOURCE:
        raise LangError([Diagnostic(filename, 1, 1, f"the program is {len(source):,} characters; the limit "
                                                    f"is {MAX_SOURCE:,}")])
    nul = source.find("\x00")
    if nul >= 0:
        line = source.count("\n", 0, nul) + 1
        col = nul - (source.rfind("\n", 0, nul) + 1) + 1
        raise LangError([Diagnostic(filename, line, col, "a NUL character in the program (write \\x00 in a "
                                                         "string for one)")], source)
    text = source if source.endswith("\n") else source + "\n"
    lark = _lark()
    try:
        tree = lark.parse(text)
        return _ToAST(filename, source).transform(tree)
    except _Problem as p:
        raise LangError([Diagnostic(filename, p.line, p.col, p.message)], source) from None
    except UnexpectedInput as e:
        raise LangError([_syntax_diagnostic(e, filename)], source) from None
    except RecursionError:
        raise LangError([Diagnostic(filename, 1, 1, "the program is nested too deeply")], source) from None
    except VisitError as e:  # the transformer's wrapper around one of ours
        inner = getattr(e, "orig_exc", None)
        if isinstance(inner, _Problem):
            raise LangError([Diagnostic(filename, inner.line, inner.col, inner.message)], source) from None
        if isinstance(inner, RecursionError):
            raise LangError([Diagnostic(filename, 1, 1, "the program is nested too deeply")], source) from None
        raise
