"""Running a checked program: `ScriptProgram` is a `steer.Program` whose step interprets the AST.

The particle's whole execution state is plain data (variables and a stack of frames pointing into
the shared AST), so resampling copies a particle mid-program like any other.  One SMC step runs the
program up to the next sampled token and the statements that follow it (observations, conditions,
twists), stopping just before the token after; so every particle moves one token per step.

Sandbox limits hold at run time too: loop bounds, a cap on statements executed, on tokens sampled,
on the depth of helper calls, on the size of strings and lists (checked before a value is built, so
memory stays bounded), and a wall-clock budget for the whole run that slow built-ins respect too.
"""

from __future__ import annotations

import math
import operator
import time
from typing import Any

from steer.distributions import Bernoulli, Categorical, Geometric
from steer.errors import SteerError
from steer.context import LMContext
from steer.lm.base import LanguageModel, Token
from steer.constraints.base import Constraint
from steer.constraints.target import rewrite_tokens
from steer.potentials import ScoringModel
from steer.program import Program
from steer.words import NextWord

from . import ast
from .builtins import (
    BUILTINS,
    DEADLINE,
    MAX_CALL_DEPTH,
    MAX_LENGTH,
    REQUIRED,
    BuiltinError,
    accepts,
    check_size,
    remember_size,
    size_of,
    text,
    type_of,
)
from .errors import Diagnostic, LangError, ProgramError
from .limits import count_work_for, scalar_problem, work_problem

MAX_STATEMENTS = 1_000_000  # per particle and run
TIME_LIMIT = 600.0  # seconds of wall-clock time per run, unless the caller gives another


class _Return(Exception):
    def __init__(self, value: Any):
        self.value = value


class _Frame:
    """A block being executed: its statements, the next index, and the loop it belongs to (if any)."""

    __slots__ = ("count", "i", "items", "limit", "loop", "stmts")

    def __init__(self, stmts: list[ast.Stmt], loop: ast.Stmt | None = None, limit: int = 0, items=None):
        self.stmts, self.i, self.loop = stmts, 0, loop
        self.count, self.limit, self.items = 0, limit, items

    def __deepcopy__(self, memo):  # the AST and the iterated items are never mutated: share them
        new = _Frame.__new__(_Frame)
        new.stmts, new.i, new.loop = self.stmts, self.i, self.loop
        new.count, new.limit, new.items = self.count, self.limit, self.items
        return new


class Code:
    """What all particles of one run share: the checked module, the model, the limits."""

    def __init__(self, module: ast.Module, lm: LanguageModel, max_tokens: int,
                 time_limit: float | None = TIME_LIMIT):
        self.module = module
        self.lm = lm
        self.max_tokens = max_tokens
        self.time_limit = time_limit
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.functions = {f.name: f for f in module.functions}
        self.constraints: dict[tuple, Any] = {}

    def __deepcopy__(self, memo):
        return self

    def fail(self, node: ast.Node, message: str) -> LangError:
        return LangError([Diagnostic(self.module.filename, node.line, node.col, message)], self.module.source)


class ScriptProgram(Program):
    """One particle of a `.steer` program."""

    def __init__(self, code: Code, inputs: dict[str, Any]):
        super().__init__()
        self.code = code
        self.env: dict[str, Any] = dict(inputs)
        self.frames = [_Frame(code.module.body)]
        self.statements = 0
        self.tokens_sampled = 0
        self.value: Any = None
        self._has_value = False
        self._model_values: dict[int, float] = {}  # model calls awaited for the statement being run
        self._depth = 0  # helper calls in progress
        self._at: ast.Node | None = None  # the statement being run, where an error deep inside is reported
        self._work = [0]  # characters and items built so far (see `limits.work_problem`)

    # -- stepping ----------------------------------------------------------------------------------
    async def step(self) -> None:
        DEADLINE.set(self.code.deadline)
        count_work_for(self._work)
        try:
            await self._run_until_next_token()
        except ProgramError as e:
            raise self.code.fail(e.node, e.message) from None
        except RecursionError:  # a value nested thousands deep, printed or compared: at that statement
            raise self.code.fail(self._at or self.code.module,
                                 "a value here is nested too deeply (a list inside a list thousands of times)") from None

    async def _run_until_next_token(self) -> None:
        moved = False
        while self.frames:
            frame = self.frames[-1]
            if frame.i >= len(frame.stmts):
                self._next_iteration(frame)
                continue
            stmt = frame.stmts[frame.i]
            if _samples_token(stmt):
                if moved:
                    return  # the next step starts here
                if self.tokens_sampled >= self.code.max_tokens:
                    break
                moved = True
            frame.i += 1
            self._spend(stmt)
            self._at = stmt
            count_work_for(self._work)  # (particles' steps interleave where they await the model)
            await self._exec(stmt)
            if self.finished:
                return
        self.finish()

    def finish(self) -> None:
        if not self.finished and self.weight > float("-inf"):
            self._compute_result()
        super().finish()

    def _compute_result(self) -> None:
        results = self.code.module.results
        if results:
            self._at = results[0]
        try:
            if results:
                self.value = _hashable(self._eval(results[0].value, self.env))
            else:
                contexts = [v for v in self.env.values() if isinstance(v, LMContext)]
                self.value = contexts[0].text if contexts else None
        except ProgramError as e:
            raise self.code.fail(e.node, e.message) from None
        except RecursionError:
            raise self.code.fail(results[0], "the result is nested too deeply (a list inside a list thousands "
                                             "of times)") from None
        self._has_value = True

    def result(self) -> Any:
        return self.value if self._has_value else None

    def __str__(self) -> str:
        if self._has_value:
            return str(self.value)
        return " | ".join(v.text for v in self.env.values() if isinstance(v, LMContext))

    def _spend(self, node: ast.Node) -> None:
        self.statements += 1
        if self.statements > MAX_STATEMENTS:
            raise ProgramError(node, f"the program ran more than {MAX_STATEMENTS:,} statements; "
                                     "lower a loop bound")
        if self.code.deadline is not None and time.monotonic() > self.code.deadline:
            raise ProgramError(node, f"the run passed its time limit of {self.code.time_limit:g} s "
                                     "(--time-limit sets another)")

    def _next_iteration(self, frame: _Frame) -> None:
        loop = frame.loop
        if loop is None:
            self.frames.pop()
            return
        frame.count += 1
        frame.i = 0
        if frame.count >= frame.limit:
            self.frames.pop()
        elif isinstance(loop, ast.Repeat):
            if loop.var is not None:
                self.env[loop.var] = frame.count
        elif isinstance(loop, ast.For):
            self.env[loop.var] = frame.items[frame.count]
        elif isinstance(loop, ast.While) and not _truth(self._eval(loop.test, self.env), loop.test):
            self.frames.pop()

    # -- statements --------------------------------------------------------------------------------
    async def _exec(self, s: ast.Stmt) -> None:
        env = self.env
        if isinstance(s, (ast.Assign, ast.Condition, ast.Score, ast.Twist)):
            await self._model_calls(s.test if isinstance(s, ast.Condition) else s.value, env)
        if isinstance(s, ast.Sample):
            value = await self._sample(s)
            if s.target is not None:
                env[s.target] = value
        elif isinstance(s, ast.Observe):
            await self._observe(s)
        elif isinstance(s, ast.Condition):
            self.condition(_truth(self._eval(s.test, env), s.test), f"condition at line {s.line} failed")
        elif isinstance(s, ast.Score):
            self.score(_number(self._eval(s.value, env), s.value))
        elif isinstance(s, ast.Twist):
            self.twist(_number(self._eval(s.value, env), s.value))
        elif isinstance(s, ast.Finish):
            self.finish()
        elif isinstance(s, ast.Stop):
            while self.frames and self.frames[-1].loop is None:
                self.frames.pop()
            self.frames.pop()
        elif isinstance(s, ast.ContextDecl):
            prompt = self._eval(s.prompt, env)
            if not isinstance(prompt, (str, Token)):
                raise ProgramError(s.prompt, f"a context's prompt must be a string, got {type_of(prompt)}")
            options = {}
            for o in s.options:
                value = self._eval(o.value, env)
                if o.name == "end":
                    ends = [value] if isinstance(value, (str, Token)) else value
                    if not isinstance(ends, list) or not all(isinstance(e, (str, Token)) and text(e) for e in ends):
                        raise ProgramError(o.value, "`end` must be a non-empty string or a list of them")
                    options["end"] = [text(e) for e in ends]
                elif o.name == "max_tokens":
                    if type_of(value) != "int":
                        raise ProgramError(o.value, f"`max_tokens` must be an integer, got {type_of(value)}")
                    options["max_tokens"] = value
                else:
                    options["allow_special" if o.name == "special" else o.name] = _truth(value, o.value)
            try:
                env[s.name] = LMContext(self.code.lm, text(prompt), **options)
            except SteerError as e:
                raise ProgramError(s, str(e)) from None
        elif isinstance(s, ast.If):
            for test, body in s.branches:
                if _truth(self._eval(test, env), test):
                    self.frames.append(_Frame(body))
                    return
            if s.orelse:
                self.frames.append(_Frame(s.orelse))
        elif isinstance(s, (ast.Repeat, ast.While, ast.For)):
            self._enter_loop(s, env, self.frames)
        else:
            self._exec_pure(s, env)

    def _enter_loop(self, s: ast.Stmt, env: dict, frames: list[_Frame]) -> None:
        if isinstance(s, ast.Repeat):
            n = self._eval(s.count, env)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ProgramError(s.count, f"repeat needs a whole number of times >= 0, got {n!r}")
            if n and s.var is not None:
                env[s.var] = 0
            frame = _Frame(s.body, s, n)
        elif isinstance(s, ast.For):
            items = self._eval(s.iterable, env)
            if isinstance(items, Token):
                items = items.text
            if not isinstance(items, (list, str)):
                raise ProgramError(s.iterable, f"for ... in needs a list or a string, got {type_of(items)}")
            items = list(items)
            if items:
                env[s.var] = items[0]
            frame = _Frame(s.body, s, len(items), items)
        else:
            n = self._eval(s.max, env)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ProgramError(s.max, f"`max` needs a whole number >= 0, got {n!r}")
            frame = _Frame(s.body, s, n)
            if not n or not _truth(self._eval(s.test, env), s.test):
                return
        if frame.limit:
            frames.append(frame)

    def _exec_pure(self, s: ast.Stmt, env: dict) -> None:
        """Statements allowed in helper functions too: they compute, never sample or weigh."""
        if isinstance(s, ast.Assign):
            value = self._eval(s.value, env)
            if s.op is not None:
                value = _binary(s.op[0], env[s.name], value, s)
            env[s.name] = value
        elif isinstance(s, ast.Return):
            raise _Return(self._eval(s.value, env))
        else:
            raise ProgramError(s, f"{type(s).__name__.lower()} is not allowed here")

    # -- sampling and observing --------------------------------------------------------------------
    def _dist_args(self, call: ast.Call) -> dict[str, Any]:
        return _bind(BUILTINS[call.func], call, [self._eval(a, self.env) for a in call.args],
                     {k.name: self._eval(k.value, self.env) for k in call.kwargs})

    def _context(self, call: ast.Call, args: dict[str, Any]) -> LMContext:
        ctx = args["c"]
        if not isinstance(ctx, LMContext):
            raise ProgramError(call, f"{call.func}() needs a context, got {type_of(ctx)}")
        return ctx

    async def _sample(self, s: ast.Sample) -> Any:
        call, args = s.dist, self._dist_args(s.dist)
        if call.func in ("next", "word"):
            ctx = self._context(call, args)
            where = None
            if s.where is not None:
                where = self._eval(s.where, self.env)
                if not isinstance(where, Constraint):
                    raise ProgramError(s.where, f"`where` needs a token mask or tilt, got {type_of(where)}")
            # the constraint's allowed tokens are observed, then the token is drawn by its tilt
            mask = where if where is not None and where.restricts else None
            try:
                if call.func == "word":
                    before = len(ctx.tokens)
                    value = await self.call(NextWord(ctx, mask, tilt=where))
                    self.tokens_sampled += len(ctx.tokens) - before
                    return value
                token = await self._next_token(ctx, mask, where)
                if ctx.rewrote_prompt and len(ctx.generated) == 1 and not self.finished:
                    # the token only re-wrote the healed prompt text: `next` is the token that writes
                    self.tokens_sampled -= 1
                    token = await self._next_token(ctx, mask, where)
                return token
            except SteerError as e:
                raise ProgramError(s, str(e)) from None
        return await self.sample(self._simple_distribution(call, args))

    async def _next_token(self, ctx: LMContext, mask: Constraint | None, where: Constraint | None) -> Token:
        if mask is not None:
            await self.observe(ctx.allowed(mask), True)
            if self.finished:  # no allowed token: the particle died
                return ctx.lm.token(next(iter(ctx.lm.vocab.eos_ids)))
        self.tokens_sampled += 1
        return await self.sample(ctx.next_token(tilt=where))

    def _simple_distribution(self, call: ast.Call, args: dict[str, Any]):
        try:
            if call.func == "bernoulli":
                return Bernoulli(_number(args["p"], call))
            if call.func == "geometric":
                return Geometric(_number(args["p"], call))
            if call.func == "categorical":
                values, probs = args["values"], args["probs"]
                if not isinstance(values, list) or not isinstance(probs, list):
                    raise ProgramError(call, "categorical(values, probs) needs two lists")
                return Categorical(values, probs=[_number(p, call) for p in probs])
        except SteerError as e:
            raise ProgramError(call, str(e)) from None
        raise ProgramError(call, f"{call.func}() cannot be sampled")

    async def _observe(self, s: ast.Observe) -> None:
        call, args = s.dist, self._dist_args(s.dist)
        value = self._eval(s.value, self.env)
        try:
            if call.func == "next":
                ctx = self._context(call, args)
                token_id = _token_id(ctx, value, s.value)
                rewrite = _rewrite_of_heal(ctx, token_id)
                if rewrite is not None:  # as `sample next` does: the token that writes, after the re-write
                    await self.observe(ctx.next_token(), rewrite)
                    if self.finished:
                        return
                await self.observe(ctx.next_token(), token_id)
            elif call.func in ("continuation", "word"):
                ctx = self._context(call, args)
                if not isinstance(value, (str, Token)):
                    raise ProgramError(s.value, f"observe needs text here, got {type_of(value)}")
                await self.observe(ctx.continuation(), text(value))
            else:
                await self.observe(self._simple_distribution(call, args), value)
        except SteerError as e:
            raise ProgramError(s, str(e)) from None

    # -- expressions -------------------------------------------------------------------------------
    def _eval(self, e: ast.Expr, env: dict) -> Any:
        if isinstance(e, ast.Const):
            return e.value
        if isinstance(e, ast.Name):
            if e.id in env:
                return env[e.id]
            if e.id == "eos":
                return self.code.lm.token(next(iter(self.code.lm.vocab.eos_ids)))
            raise ProgramError(e, f"'{e.id}' has no value here (it is assigned only on some paths)")
        if isinstance(e, ast.ListExpr):
            items = [self._eval(item, env) for item in e.items]
            seen: dict[int, int] = {}
            _check_size(len(items) + sum(size_of(v, seen) for v in items), e)
            return items
        if isinstance(e, ast.Unary):
            v = self._eval(e.operand, env)
            if e.op == "not":
                if isinstance(v, Constraint):
                    try:
                        return ~v
                    except SteerError as error:
                        raise ProgramError(e, str(error)) from None
                return not _truth(v, e.operand)
            if type_of(v) not in ("int", "float", "bool"):
                raise ProgramError(e, f"cannot negate {type_of(v)}")
            return -v
        if isinstance(e, ast.Binary):
            if e.op in ("and", "or"):
                left = self._eval(e.left, env)
                if isinstance(left, Constraint):
                    right = self._eval(e.right, env)
                    if not isinstance(right, Constraint):
                        raise ProgramError(e, f"cannot combine a mask with {type_of(right)}")
                    try:
                        return left & right if e.op == "and" else left | right
                    except SteerError as error:
                        raise ProgramError(e, str(error)) from None
                if _truth(left, e.left) == (e.op == "or"):
                    return e.op == "or"
                return _truth(self._eval(e.right, env), e.right)
            return _binary(e.op, self._eval(e.left, env), self._eval(e.right, env), e)
        if isinstance(e, ast.Index):
            target, i = self._eval(e.target, env), self._eval(e.index, env)
            target = text(target) if isinstance(target, Token) else target
            if not isinstance(target, (str, list)):
                raise ProgramError(e, f"cannot index a {type_of(target)}")
            if not isinstance(i, int):
                raise ProgramError(e.index, f"positions must be whole numbers, got {type_of(i)}")
            if not -len(target) <= i < len(target):
                raise ProgramError(e.index, f"position {i} is outside a {type_of(target)} of length {len(target)}")
            return target[i]
        if isinstance(e, ast.Slice):
            target = self._eval(e.target, env)
            target = text(target) if isinstance(target, Token) else target
            bounds = [None if p is None else self._eval(p, env) for p in (e.start, e.stop)]
            if not isinstance(target, (str, list)):
                raise ProgramError(e, f"cannot slice a {type_of(target)}")
            if not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in bounds):
                raise ProgramError(e, "slice bounds must be whole numbers")
            return target[bounds[0]:bounds[1]]
        if isinstance(e, ast.Call):
            return self._call(e, env)
        raise ProgramError(e, f"{type(e).__name__} cannot be evaluated")

    async def _model_calls(self, e: ast.Expr, env: dict) -> None:
        """Await the model calls (reward()) in `e`, innermost first, before `e` is evaluated: each is a
        request the scheduler batches with the other particles'."""
        self._model_values.clear()
        calls = [c for c in ast.subexpressions(e)
                 if isinstance(c, ast.Call) and c.func in BUILTINS and BUILTINS[c.func].kind == "model_call"]
        for call in reversed(calls):
            builtin = BUILTINS[call.func]
            bound = _bind(builtin, call, [self._eval(a, env) for a in call.args],
                          {k.name: self._eval(k.value, env) for k in call.kwargs})
            model, instruction, response = (bound[p.name] for p in builtin.params)
            if not isinstance(model, ScoringModel):
                raise ProgramError(call.args[0] if call.args else call,
                                   f"reward() needs a reward model declared with `reward_model`, got {type_of(model)}")
            self._model_values[id(call)] = await model.reward(text(instruction), text(response))

    def _call(self, e: ast.Call, env: dict) -> Any:
        args = [self._eval(a, env) for a in e.args]
        if e.func in self.code.functions:
            f = self.code.functions[e.func]
            local = {name: self.env[name] for name in self._input_names()}
            local.update(zip(f.params, args))
            if self._depth >= MAX_CALL_DEPTH:
                raise ProgramError(e, f"helper calls nest more than {MAX_CALL_DEPTH} deep")
            self._depth += 1
            try:
                self._run_function(f.body, local)
            except _Return as r:
                return r.value
            finally:
                self._depth -= 1
            raise ProgramError(e, f"function '{e.func}' ended without returning a value")
        builtin = BUILTINS.get(e.func)
        if builtin is None or builtin.kind == "distribution":
            raise ProgramError(e, f"cannot call {e.func}() here")
        if builtin.kind == "model_call":
            return self._model_values.pop(id(e))
        bound = _bind(builtin, e, args, {k.name: self._eval(k.value, env) for k in e.kwargs})
        values = [bound[p.name] for p in builtin.params]
        if builtin.kind == "mask":  # constraints cache per-state masks: build each one once per run
            key = (e.func, _hashable(values))
            if key not in self.code.constraints:
                self.code.constraints[key] = self._apply(builtin, values, e)
            return self.code.constraints[key]
        return self._apply(builtin, values, e)

    def _apply(self, builtin, values: list, e: ast.Call) -> Any:
        try:
            result = builtin.impl(*values)
            size = size_of(result) if isinstance(result, (str, list)) else 0
            if isinstance(result, list):
                check_size(size)
            problem = scalar_problem(result) or work_problem(size)
            if problem is not None:
                raise BuiltinError(problem)
            return result
        except BuiltinError as err:
            raise ProgramError(e, f"{builtin.name}(): {err}") from None
        except SteerError as err:
            raise ProgramError(e, str(err)) from None
        except (TypeError, ValueError, ArithmeticError) as err:  # arguments the built-in cannot take
            kinds = ", ".join(type_of(v) for v in values)
            raise ProgramError(e, f"{builtin.name}() cannot take ({kinds}): {err}") from None

    def _input_names(self) -> list[str]:
        return [i.name for i in self.code.module.inputs]

    def _run_function(self, stmts: list[ast.Stmt], env: dict) -> None:
        """Helpers run to completion inside one expression (they cannot sample, so never suspend)."""
        frames = [_Frame(stmts)]
        while frames:
            frame = frames[-1]
            if frame.i >= len(frame.stmts):
                loop = frame.loop
                frame.count += 1
                frame.i = 0
                if loop is None or frame.count >= frame.limit:
                    frames.pop()
                elif isinstance(loop, ast.Repeat) and loop.var is not None:
                    env[loop.var] = frame.count
                elif isinstance(loop, ast.For):
                    env[loop.var] = frame.items[frame.count]
                elif isinstance(loop, ast.While) and not _truth(self._eval(loop.test, env), loop.test):
                    frames.pop()
                continue
            s = frame.stmts[frame.i]
            frame.i += 1
            self._spend(s)
            if isinstance(s, ast.If):
                for test, body in s.branches:
                    if _truth(self._eval(test, env), test):
                        frames.append(_Frame(body))
                        break
                else:
                    if s.orelse:
                        frames.append(_Frame(s.orelse))
            elif isinstance(s, (ast.Repeat, ast.While, ast.For)):
                self._enter_loop(s, env, frames)
            elif isinstance(s, ast.Stop):
                while frames and frames[-1].loop is None:
                    frames.pop()
                frames.pop()
            else:
                self._exec_pure(s, env)


def _samples_token(s: ast.Stmt) -> bool:
    return isinstance(s, ast.Sample) and s.dist.func in ("next", "word")


def _bind(builtin, call: ast.Call, args: list, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip((p.name for p in builtin.params), args))
    bound.update(kwargs)
    for p in builtin.params:
        if p.name not in bound:
            if p.default is REQUIRED:
                raise ProgramError(call, f"{builtin.name}() is missing argument '{p.name}'")
            bound[p.name] = p.default
        elif bound[p.name] is not p.default and not accepts(p.type, type_of(bound[p.name])):
            raise ProgramError(call, f"argument '{p.name}' of {builtin.name}() must be {p.type}, "
                                     f"got {type_of(bound[p.name])}")
    return bound


def _token_id(ctx: LMContext, value: Any, node: ast.Node) -> int:
    if isinstance(value, Token):
        return value.id
    if isinstance(value, str):
        ids = ctx.lm.encode(value, bos=False)
        if len(ids) != 1:
            raise ProgramError(node, f"{value!r} is {len(ids)} tokens; observe it from continuation(c) instead")
        return ids[0]
    raise ProgramError(node, f"observe ... from next(c) needs a token or a string, got {type_of(value)}")


def _rewrite_of_heal(ctx: LMContext, token_id: int) -> int | None:
    """While healing is pending, a token that cannot come first (it does not start with the backed-off
    prompt text) comes after the token that only re-writes that text: that token, if the vocabulary has
    it (None otherwise, or when nothing is pending)."""
    vocab = ctx.lm.vocab
    if token_id in vocab.eos_ids or vocab.strings[token_id].startswith(ctx.heal):
        return None  # (with nothing pending every token starts with "")
    found = rewrite_tokens(ctx)
    return found[0] if found else None


def _truth(value: Any, node: ast.Node) -> bool:
    if isinstance(value, (LMContext, Constraint)):
        raise ProgramError(node, f"a {type_of(value)} is neither true nor false")
    if isinstance(value, Token):
        return bool(value.text)
    return bool(value)


def _number(value: Any, node: ast.Node) -> float:
    if type_of(value) not in ("int", "float", "bool"):
        raise ProgramError(node, f"expected a number, got {type_of(value)}")
    if isinstance(value, float) and math.isnan(value):
        raise ProgramError(node, "the value is NaN")
    return value


_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
               "//": operator.floordiv, "%": operator.mod}
_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _binary(op: str, a: Any, b: Any, node: ast.Node) -> Any:
    if op in ("==", "!="):
        equal = _equal(a, b)
        return equal if op == "==" else not equal
    if op in ("in", "not in"):
        if isinstance(b, Token):
            b = b.text
        if isinstance(b, str):
            if not isinstance(a, (str, Token)):
                raise ProgramError(node, f"'{op}' on text needs text on its left, got {type_of(a)}")
            found = text(a) in b
        elif isinstance(b, list):
            found = any(_equal(a, x) for x in b)
        else:
            raise ProgramError(node, f"'{op}' needs a string or a list on its right, got {type_of(b)}")
        return found if op == "in" else not found
    a, b = (text(a) if isinstance(a, Token) else a), (text(b) if isinstance(b, Token) else b)
    ta, tb = type_of(a), type_of(b)
    numeric = ta in ("int", "float", "bool") and tb in ("int", "float", "bool")
    if op in _COMPARE:
        if numeric or (ta == tb == "str"):
            return _COMPARE[op](a, b)
        raise ProgramError(node, f"cannot compare {ta} and {tb} with '{op}'")
    ok = numeric or (op == "+" and ta == tb and ta in ("str", "list")) or (
        op == "*" and {ta, tb} in ({"str", "int"}, {"list", "int"}))
    if not ok:
        raise ProgramError(node, f"cannot apply '{op}' to {ta} and {tb}")
    if op == "*" and not numeric:
        n, seq = (b, a) if ta in ("str", "list") else (a, b)
        if n * len(seq) > MAX_LENGTH:
            raise ProgramError(node, f"result would hold {n * len(seq):,} items; the limit is {MAX_LENGTH:,}")
        _check_size(max(n, 0) * size_of(seq), node)
    joined_size = None
    if op == "+" and ta in ("str", "list"):
        if len(a) + len(b) > MAX_LENGTH:
            raise ProgramError(node, f"result would hold {len(a) + len(b):,} items; the limit is {MAX_LENGTH:,}")
        seen: dict[int, int] = {}
        joined_size = size_of(a, seen) + size_of(b, seen)
        _check_size(joined_size, node)
    try:
        result = _ARITHMETIC[op](a, b)
    except ZeroDivisionError:
        raise ProgramError(node, "division by zero") from None
    except OverflowError:
        raise ProgramError(node, "number too large") from None
    if isinstance(result, list) and joined_size is not None:
        remember_size(result, joined_size)
    problem = scalar_problem(result) or work_problem(len(result) if isinstance(result, (str, list)) else 0)
    if problem is not None:
        raise ProgramError(node, problem)
    return result


def _check_size(size: int, node: ast.Node) -> None:
    try:
        check_size(size)
    except BuiltinError as e:
        raise ProgramError(node, str(e)) from None


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Token) and isinstance(b, Token) and (a.is_eos or b.is_eos):
        return a.is_eos and b.is_eos  # `eos` stands for every end-of-text token of the model
    if isinstance(a, Token) or isinstance(b, Token):
        return a == b if isinstance(a, Token) else b == a
    return a == b


def _hashable(value: Any) -> Any:
    """Results group in the posterior, so they must be hashable: lists become tuples, tokens text."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Token):
        return value.text
    if isinstance(value, LMContext):
        return value.text
    return value
