"""Static checks on a parsed program.  Every problem found is reported, each at its line and column.

What is checked: names are defined before use; calls name a known function with the right number,
names and types of arguments; distributions appear only after `sample` / `observe`; inputs are never
assigned; every `while` has a `max`; helper functions are pure and never recursive; the sampler,
its settings and the declarations are known and given once.
"""

from __future__ import annotations

import difflib

from steer.lm.loading import DTYPES
from steer.lm.registry import backend_names
from steer.resampling import SCHEMES

from . import ast
from .builtins import (
    BUILTINS,
    COMPILED_LITERALS,
    CONSTANTS,
    FORBIDDEN,
    MAX_CALL_DEPTH,
    METHOD_ALIASES,
    REQUIRED,
    SETTINGS,
    accepts,
    type_of,
)
from .errors import Diagnostic, LangError

INPUT_TYPES = ("str", "int", "float", "bool", "list")
CONTEXT_OPTIONS = ("heal", "canonical", "special", "end", "max_tokens")  # keyword arguments of lm.context
_NUMERIC = ("int", "float", "bool")
_TEXT = ("str", "token")


def check(module: ast.Module) -> None:
    """Raise LangError listing every problem in `module` (returns None when it is well formed)."""
    errors = _Checker(module).run()
    if errors:
        raise LangError(errors, module.source)


class _Scope:
    def __init__(self, names: dict[str, str], readonly: set[str], function: str | None = None):
        self.names = names
        self.readonly = readonly
        self.function = function  # the helper being checked, if any
        self.loops = 0
        self.model_calls = False  # whether reward() may be called in the expression being checked


class _Checker:
    def __init__(self, module: ast.Module):
        self.m = module
        self.errors: list[Diagnostic] = []
        self.inputs: dict[str, str] = {}
        self.functions = {f.name: f for f in module.functions}
        self.calls: dict[str, set[str]] = {f.name: set() for f in module.functions}

    def error(self, node: ast.Node, message: str) -> None:
        self.errors.append(Diagnostic(self.m.filename, node.line, node.col, message))

    def run(self) -> list[Diagnostic]:
        try:
            self._module()
        except RecursionError:
            self.errors.append(Diagnostic(self.m.filename, 1, 1, "the program is nested too deeply"))
        return self.errors

    # -- declarations ------------------------------------------------------------------------------
    def _module(self) -> None:
        m = self.m
        for node in m.imports:
            self.error(node, "imports are not allowed: a .steer program runs in a sandbox "
                             "(built-in functions only; pass data in with `input`)")
        for kind, nodes in (("model", m.models), ("sampler", m.samplers), ("result", m.results)):
            for node in nodes[1:]:
                self.error(node, f"a program has at most one `{kind}` declaration")
        for node in m.inputs:
            self._input(node)
        for node in m.resources:
            self._resource(node)
        for node in m.models[:1]:
            self._model(node)
        for node in m.samplers[:1]:
            self._sampler(node)
        seen: set[str] = set()
        for f in m.functions:
            if f.name in seen:
                self.error(f, f"function '{f.name}' is defined twice")
            seen.add(f.name)
            self._function(f)
        self._recursion()
        if not any("recursion" in e.message for e in self.errors):
            self._call_depth()
        scope = _Scope(dict(self.inputs), set(self.inputs))
        self._block(m.body, scope)
        for node in m.results[:1]:
            self._expr(node.value, scope)

    def _declared_name(self, node: ast.Node, name: str, what: str) -> bool:
        """Variables and functions have separate namespaces; only the constant `eos` is reserved."""
        if name in CONSTANTS:
            self.error(node, f"{what} '{name}' would hide the constant '{name}'; choose another name")
            return False
        return True

    def _model(self, node: ast.ModelDecl) -> None:
        choices = {"backend": backend_names(), "dtype": tuple(DTYPES)}
        seen: set[str] = set()
        for option in node.options:
            if option.name not in choices:
                self.error(option, f"unknown model option '{option.name}'; choose one of {', '.join(choices)}")
            elif option.name in seen:
                self.error(option, f"model option '{option.name}' is given twice")
            elif option.value not in choices[option.name]:
                self.error(option, f"{option.name} must be one of {', '.join(choices[option.name])}, "
                                   f"got {option.value!r}")
            seen.add(option.name)

    def _input(self, node: ast.Input) -> None:
        if node.name in self.inputs:
            self.error(node, f"input '{node.name}' is declared twice")
        self._declared_name(node, node.name, "input")
        declared = node.type
        if declared is not None and declared not in INPUT_TYPES:
            self.error(node, f"unknown input type '{declared}'; choose one of {', '.join(INPUT_TYPES)}")
            declared = None
        actual = None
        if node.default is not None:
            actual = self._expr(node.default, _Scope(dict(self.inputs), set(self.inputs)))
            if actual not in (*INPUT_TYPES, "any"):
                self.error(node.default, f"an input's default must be one of {', '.join(INPUT_TYPES)}, got {actual}")
            elif declared is not None and not accepts(declared, actual):
                self.error(node.default, f"input '{node.name}' is declared {declared} but its default is {actual}")
        elif declared is None:
            self.error(node, f"input '{node.name}' needs a type or a default (e.g. `input {node.name}: str`)")
        self.inputs[node.name] = declared or actual or "any"

    def _resource(self, node: ast.ResourceDecl) -> None:
        if node.name in self.inputs:
            self.error(node, f"'{node.name}' is already declared")
        elif self._declared_name(node, node.name, node.kind.replace("_", " ")):
            self.inputs[node.name] = node.kind  # read-only and visible everywhere, like an input

    def _sampler(self, node: ast.SamplerDecl) -> None:
        method = METHOD_ALIASES.get(node.method, node.method)
        if method not in SETTINGS:
            self.error(node, f"unknown sampler '{node.method}'; choose one of {', '.join(SETTINGS)}")
            return
        known = SETTINGS[method]
        given: set[str] = set()
        scope = _Scope(dict(self.inputs), set(self.inputs))
        for s in node.settings:
            if s.name in given:
                self.error(s, f"setting '{s.name}' is given twice")
            given.add(s.name)
            actual = self._expr(s.value, scope)
            if s.name not in known:
                hint = _suggest(s.name, known)
                self.error(s, f"unknown setting '{s.name}' for {method}{hint}; settings: {', '.join(known)}")
                continue
            if not accepts(known[s.name], actual):
                self.error(s.value, f"setting '{s.name}' must be {known[s.name]}, got {actual}")
            elif isinstance(s.value, ast.Const):
                problem = setting_problem(s.name, s.value.value)
                if problem:
                    self.error(s.value, problem)

    def _function(self, f: ast.FunctionDef) -> None:
        if f.name in BUILTINS or f.name in FORBIDDEN:
            self.error(f, f"function '{f.name}' would hide the built-in '{f.name}'; choose another name")
        params: dict[str, str] = {}
        for p in f.params:
            if p in params:
                self.error(f, f"parameter '{p}' appears twice in '{f.name}'")
            params[p] = "any"
        scope = _Scope({**self.inputs, **params}, set(self.inputs), function=f.name)
        self._block(f.body, scope)
        if not any(isinstance(s, ast.Return) for s in _walk(f.body)):
            self.error(f, f"function '{f.name}' never returns a value (add `return ...`)")

    def _call_depth(self) -> None:
        """Helper calls may nest MAX_CALL_DEPTH deep at run time: a longer chain is reported at the
        function that starts it (one error per chain, not per link)."""
        depth: dict[str, int] = {}
        for root in self.calls:  # iteratively: a chain of thousands of helpers must not overflow here
            stack = [(root, False)]
            while stack:
                name, expanded = stack.pop()
                if name in depth:
                    continue
                callees = self.calls.get(name, set())
                if expanded:
                    depth[name] = 1 + max((depth.get(c, 0) for c in callees), default=0)
                else:
                    stack.append((name, True))
                    stack.extend((c, False) for c in callees if c not in depth)
        callees = {c for called in self.calls.values() for c in called}
        for name in self.calls:
            if depth[name] > MAX_CALL_DEPTH and name not in callees:
                self.error(self.functions[name], f"calling '{name}' nests {depth[name]} helper calls; "
                                                 f"the limit is {MAX_CALL_DEPTH}")

    def _recursion(self) -> None:
        reported: set[str] = set()
        for name in self.calls:
            cycle = _cycle_from(name, self.calls)
            if cycle and name not in reported:
                reported.update(cycle)
                path = " -> ".join(cycle + [cycle[0]])
                self.error(self.functions[name], f"recursion is not allowed, so every program ends: {path}")

    # -- statements --------------------------------------------------------------------------------
    def _block(self, stmts: list[ast.Stmt], scope: _Scope) -> None:
        for stmt in stmts:
            self._stmt(stmt, scope)

    def _effect(self, node: ast.Stmt, scope: _Scope, what: str) -> bool:
        """Effects belong to the program; helpers compute values only."""
        if scope.function is not None:
            self.error(node, f"`{what}` cannot appear in function '{scope.function}' "
                             "(functions compute values; sample and weigh in the program body)")
            return False
        return True

    def _assign(self, node: ast.Node, name: str, value_type: str, scope: _Scope) -> None:
        if name in scope.readonly:
            kind = self.inputs.get(name)
            if kind in ("reward_model", "retriever"):
                self.error(node, f"cannot assign to {kind.replace('_', ' ')} '{name}' (it is declared once, at the top)")
            else:
                self.error(node, f"cannot assign to input '{name}' (inputs are read-only; copy it first: "
                                 f"`my_{name} = {name}`)")
            return
        if not self._declared_name(node, name, "variable"):
            return
        previous = scope.names.get(name)
        scope.names[name] = value_type if previous in (None, value_type) else "any"

    def _stmt(self, s: ast.Stmt, scope: _Scope) -> None:
        # Model calls are awaited before their statement runs: only these statements of the body can.
        scope.model_calls = scope.function is None and isinstance(s, (ast.Assign, ast.Condition, ast.Score,
                                                                         ast.Twist))
        try:
            self._statement(s, scope)
        finally:
            scope.model_calls = False

    def _statement(self, s: ast.Stmt, scope: _Scope) -> None:
        if isinstance(s, ast.Assign):
            t = self._expr(s.value, scope)
            if s.op is not None:
                if s.name not in scope.names:
                    self.error(s, f"undefined name '{s.name}'")
                    t = "any"
                else:
                    t = self._binary_type(s, s.op[0], scope.names[s.name], t)
            self._assign(s, s.name, t, scope)
        elif isinstance(s, ast.Sample):
            t = "any"
            if self._effect(s, scope, "sample"):
                t = self._distribution(s.dist, scope, sampled=True)
                if s.where is not None:
                    wt = self._expr(s.where, scope)
                    if s.dist.func not in ("next", "word"):
                        self.error(s.where, f"`where` restricts tokens: it applies to next(...) and word(...), "
                                            f"not {s.dist.func}(...)")
                    elif not accepts("mask", wt):
                        self.error(s.where, f"`where` needs a token mask such as word_length(max=5), got {wt}")
            if s.target is not None:
                self._assign(s, s.target, t, scope)
        elif isinstance(s, ast.Observe):
            vt = self._expr(s.value, scope)
            if self._effect(s, scope, "observe"):
                t = self._distribution(s.dist, scope, sampled=False)
                if s.dist.func == "next" and vt not in ("token", "str", "any"):
                    self.error(s.value, f"observe ... from next(...) needs a token or a one-token string, got {vt}")
                elif s.dist.func in ("continuation", "word") and not accepts("text", vt):
                    self.error(s.value, f"observe ... from {s.dist.func}(...) needs text, got {vt}")
                elif t != "any" and s.dist.func not in ("next", "word", "continuation") and not accepts(t, vt):
                    self.error(s.value, f"{s.dist.func}(...) produces {t}, so observing a {vt} is impossible")
        elif isinstance(s, (ast.Condition, ast.Score, ast.Twist)):
            expr = s.test if isinstance(s, ast.Condition) else s.value
            t = self._expr(expr, scope)
            keyword = type(s).__name__.lower()
            if self._effect(s, scope, keyword) and keyword != "condition" and not accepts("number", t):
                self.error(expr, f"`{keyword}` needs a number (a log weight), got {t}")
        elif isinstance(s, ast.Finish):
            self._effect(s, scope, "finish")
        elif isinstance(s, ast.Stop):
            if not scope.loops:
                self.error(s, "`stop` outside a loop (it leaves the innermost loop; `finish` ends the program)")
        elif isinstance(s, ast.Return):
            self._expr(s.value, scope)
            if scope.function is None:
                self.error(s, "`return` outside a function (use `finish` to end the program)")
        elif isinstance(s, ast.ContextDecl):
            t = self._expr(s.prompt, scope)
            for option in s.options:
                ot = self._expr(option.value, scope)
                if option.name not in CONTEXT_OPTIONS:
                    self.error(option, f"unknown context option '{option.name}'; options: "
                                       f"{', '.join(CONTEXT_OPTIONS)}")
                elif option.name == "end":
                    if not (accepts("str", ot) or accepts("list", ot)):
                        self.error(option.value, f"`end` must be a string or a list of strings, got {ot}")
                    elif isinstance(option.value, ast.Const) and option.value.value == "":
                        self.error(option.value, "`end` strings must not be empty")
                elif option.name == "max_tokens":
                    if not accepts("int", ot):
                        self.error(option.value, f"`max_tokens` must be an integer, got {ot}")
                    elif isinstance(option.value, ast.Const) and option.value.value < 1:
                        self.error(option.value, f"`max_tokens` must be at least 1, got {option.value.value}")
                elif not accepts("bool", ot):
                    self.error(option.value, f"`{option.name}` must be true or false, got {ot}")
            if self._effect(s, scope, "context"):
                if not accepts("text", t):
                    self.error(s.prompt, f"a context's prompt must be a string, got {t}")
                self._assign(s, s.name, "context", scope)
        elif isinstance(s, ast.ExprStmt):
            self._expr(s.expr, scope)
            self.error(s, "this expression does nothing on its own (assign it: `x = ...`)")
        elif isinstance(s, ast.If):
            for test, body in s.branches:
                self._expr(test, scope)
                self._block(body, scope)
            self._block(s.orelse, scope)
        elif isinstance(s, (ast.Repeat, ast.While, ast.For)):
            self._loop(s, scope)

    def _loop(self, s: ast.Stmt, scope: _Scope) -> None:
        if isinstance(s, ast.Repeat):
            t = self._expr(s.count, scope)
            if not accepts("int", t):
                self.error(s.count, f"repeat needs a whole number of times, got {t}")
            if s.var is not None:
                self._assign(s, s.var, "int", scope)
        elif isinstance(s, ast.While):
            self._expr(s.test, scope)
            if s.max is None:
                self.error(s, "unbounded loop: give it a bound, `while CONDITION max N:`")
            else:
                t = self._expr(s.max, scope)
                if not accepts("int", t):
                    self.error(s.max, f"`max` needs a whole number, got {t}")
        else:
            t = self._expr(s.iterable, scope)
            if t not in ("list", "str", "any"):
                self.error(s.iterable, f"for ... in needs a list or a string, got {t}")
            self._assign(s, s.var, "str" if t == "str" else "any", scope)
        scope.loops += 1
        self._block(s.body, scope)
        scope.loops -= 1

    # -- expressions -------------------------------------------------------------------------------
    def _expr(self, e: ast.Expr, scope: _Scope) -> str:
        if isinstance(e, ast.Const):
            return type_of(e.value)
        if isinstance(e, ast.Name):
            if e.id in scope.names:
                return scope.names[e.id]
            if e.id in CONSTANTS:
                return CONSTANTS[e.id]
            if e.id in BUILTINS or e.id in self.functions:
                self.error(e, f"'{e.id}' is a function: call it, `{e.id}(...)`")
            elif scope.function is not None:
                self.error(e, f"undefined name '{e.id}' (a function sees only its parameters and the inputs)")
            else:
                self.error(e, f"undefined name '{e.id}'{_suggest(e.id, scope.names)}")
            return "any"
        if isinstance(e, ast.ListExpr):
            for item in e.items:
                self._expr(item, scope)
            return "list"
        if isinstance(e, ast.Unary):
            t = self._expr(e.operand, scope)
            if e.op == "not":
                return "mask" if t == "mask" else "bool"
            if not accepts("number", t):
                self.error(e, f"cannot negate {t}")
                return "any"
            return "int" if t == "bool" else t
        if isinstance(e, ast.Binary):
            return self._binary_type(e, e.op, self._expr(e.left, scope), self._expr(e.right, scope))
        if isinstance(e, (ast.Index, ast.Slice)):
            t = self._expr(e.target, scope)
            parts = [e.index] if isinstance(e, ast.Index) else [p for p in (e.start, e.stop) if p is not None]
            for part in parts:
                pt = self._expr(part, scope)
                if not accepts("int", pt):
                    self.error(part, f"positions must be whole numbers, got {pt}")
            if t not in ("str", "list", "token", "any"):
                self.error(e, f"cannot index a {t}")
                return "any"
            return "str" if t in _TEXT else ("list" if isinstance(e, ast.Slice) and t == "list" else "any")
        if isinstance(e, ast.Attribute):
            self._expr(e.target, scope)
            self.error(e, f"attribute access (.{e.name}) is not part of the language; "
                          "use the built-in functions, e.g. text(c)")
            return "any"
        if isinstance(e, ast.Call):
            return self._call(e, scope)
        raise AssertionError(f"unknown expression {e!r}")

    def _binary_type(self, node: ast.Node, op: str, a: str, b: str) -> str:
        if op in ("and", "or"):
            if "mask" in (a, b):
                if {a, b} <= {"mask", "any"}:
                    return "mask"
                self.error(node, f"cannot combine a mask with {b if a == 'mask' else a} using '{op}'")
                return "any"
            return "bool"
        if op in ("==", "!="):
            return "bool"
        if op in ("in", "not in"):
            if b not in ("str", "list", "token", "any"):
                self.error(node, f"'{op}' needs a string or a list on its right, got {b}")
            elif b in _TEXT and a not in (*_TEXT, "any"):
                self.error(node, f"'{op}' on text needs text on its left, got {a}")
            return "bool"
        if "any" in (a, b):
            return "bool" if op in ("<", "<=", ">", ">=") else "any"
        if op in ("<", "<=", ">", ">="):
            if (a in _NUMERIC and b in _NUMERIC) or (a in _TEXT and b in _TEXT):
                return "bool"
            self.error(node, f"cannot compare {a} and {b} with '{op}'")
            return "bool"
        if a in _NUMERIC and b in _NUMERIC:
            if op == "/" or "float" in (a, b):
                return "float"
            return "int"
        if op == "+" and a in _TEXT and b in _TEXT:
            return "str"
        if op == "+" and a == b == "list":
            return "list"
        if op == "*" and {a, b} in ({"str", "int"}, {"list", "int"}):
            return "str" if "str" in (a, b) else "list"
        hint = " (make text with str(x))" if op == "+" and (a in _TEXT or b in _TEXT) else ""
        self.error(node, f"cannot apply '{op}' to {a} and {b}{hint}")
        return "any"

    def _call(self, e: ast.Call, scope: _Scope) -> str:
        for arg in e.args:
            self._expr(arg, scope)
        for kw in e.kwargs:
            self._expr(kw.value, scope)
        if e.func in self.functions:
            f = self.functions[e.func]
            if scope.function is not None:
                self.calls[scope.function].add(e.func)
            if e.kwargs:
                self.error(e.kwargs[0], f"function '{e.func}' takes positional arguments only")
            if len(e.args) != len(f.params):
                self.error(e, f"{e.func}() takes {_count(len(f.params), 'argument')}, got {len(e.args)}")
            return "any"
        builtin = BUILTINS.get(e.func)
        if builtin is None:
            if e.func in FORBIDDEN:
                self.error(e, f"'{e.func}' is not available: {FORBIDDEN[e.func]}")
            else:
                names = list(BUILTINS) + list(self.functions)
                self.error(e, f"unknown function '{e.func}'{_suggest(e.func, names)}")
            return "any"
        if builtin.kind == "distribution":
            self.error(e, f"{e.func}(...) is a distribution: write `x = sample {e.func}(...)` "
                          f"or `observe VALUE from {e.func}(...)`")
            return builtin.returns
        if builtin.kind == "model_call" and not scope.model_calls:
            where = f"function '{scope.function}'" if scope.function else "this statement"
            self.error(e, f"{e.func}() calls a model, which {where} cannot do: use it directly in `score`, "
                          "`twist`, `condition` or an assignment in the program body")
        self._arguments(e, builtin, scope)
        return builtin.returns

    def _distribution(self, call: ast.Call, scope: _Scope, sampled: bool) -> str:
        builtin = BUILTINS.get(call.func)
        if builtin is None or builtin.kind != "distribution":
            dists = ", ".join(b.name for b in BUILTINS.values() if b.kind == "distribution")
            verb = "sample" if sampled else "observe ... from"
            self.error(call, f"`{verb}` needs a distribution ({dists}), got {call.func}(...)")
            return "any"
        for arg in call.args:
            self._expr(arg, scope)
        for kw in call.kwargs:
            self._expr(kw.value, scope)
        if sampled and call.func == "continuation":
            self.error(call, "continuation(c) can only be observed: `observe \"text\" from continuation(c)`")
        self._arguments(call, builtin, scope)
        return builtin.returns

    def _arguments(self, call: ast.Call, builtin, scope: _Scope) -> None:
        params = builtin.params
        bound: dict[str, ast.Expr] = {}
        if len(call.args) > len(params):
            self.error(call, f"{builtin.name}() takes at most {_count(len(params), 'argument')}, "
                             f"got {len(call.args)}: {builtin.signature()}")
        for p, arg in zip(params, call.args):
            bound[p.name] = arg
        names = {p.name for p in params}
        for kw in call.kwargs:
            if kw.name not in names:
                self.error(kw, f"{builtin.name}() has no parameter '{kw.name}'{_suggest(kw.name, names)}: "
                               f"{builtin.signature()}")
            elif kw.name in bound:
                self.error(kw, f"{builtin.name}() got two values for '{kw.name}'")
            else:
                bound[kw.name] = kw.value
        for p in params:
            if p.name not in bound:
                if p.default is REQUIRED:
                    self.error(call, f"{builtin.name}() is missing argument '{p.name}': {builtin.signature()}")
                continue
            actual = self._type_quiet(bound[p.name], scope)
            if not accepts(p.type, actual):
                self.error(bound[p.name], f"argument '{p.name}' of {builtin.name}() must be {p.type}, got {actual}")
        if builtin.name in COMPILED_LITERALS and all(isinstance(v, ast.Const) for v in bound.values()):
            self._compile_literal(call, builtin, bound)

    def _compile_literal(self, call: ast.Call, builtin, bound: dict[str, ast.Expr]) -> None:
        """A regex, grammar or JSON schema written as a literal is compiled now, as the run would (no
        model is needed), so `steer check` finds what `steer run` would refuse."""
        values = [bound[p.name].value if p.name in bound else p.default for p in builtin.params]
        try:
            builtin.impl(*values)
        except Exception as e:  # noqa: BLE001 - BuiltinError or SteerError: the message is the user's
            self.error(call, f"{builtin.name}(): {e}")

    def _type_quiet(self, e: ast.Expr, scope: _Scope) -> str:
        """The type of an already-checked expression, without reporting its errors a second time."""
        errors = len(self.errors)
        t = self._expr(e, scope)
        del self.errors[errors:]
        return t


def setting_problem(name: str, value) -> str | None:
    """Why a sampler setting's value is out of range (None if it is fine)."""
    if name in ("particles", "beam", "max_tokens") and (not isinstance(value, int) or value < 1):
        return f"{name} must be a whole number of at least 1, got {value!r}"
    if name == "ess" and (not isinstance(value, (int, float)) or not 0 <= value <= 1):
        return f"ess must lie between 0 and 1, got {value!r}"
    if name == "resampling" and value not in SCHEMES:
        return f"unknown resampling scheme {value!r}; choose one of {', '.join(sorted(SCHEMES))}"
    if name == "seed" and not isinstance(value, int):
        return f"seed must be a whole number, got {value!r}"
    return None


def _walk(stmts: list[ast.Stmt]):
    for s in stmts:
        yield s
        if isinstance(s, ast.If):
            for _, body in s.branches:
                yield from _walk(body)
            yield from _walk(s.orelse)
        elif isinstance(s, (ast.Repeat, ast.While, ast.For)):
            yield from _walk(s.body)


def _cycle_from(start: str, calls: dict[str, set[str]]) -> list[str] | None:
    """A call path from `start` back to itself, if there is one."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        name, path = stack.pop()
        for callee in sorted(calls.get(name, ())):
            if callee == start:
                return path
            if callee not in seen:
                seen.add(callee)
                stack.append((callee, path + [callee]))
    return None


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
