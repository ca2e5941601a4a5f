"""The typed syntax tree of a `.steer` program: plain dataclasses, each with its source position.

Nodes are immutable in use and shared by every particle running the program, so copying a particle
never copies its code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Node:
    line: int
    col: int

    def __deepcopy__(self, memo):  # code is shared by all particles
        return self

    def __copy__(self):
        return self


# -- expressions ------------------------------------------------------------------------------------
class Expr(Node):
    pass


@dataclass(eq=False)
class Const(Expr):
    value: Any  # str, int, float or bool


@dataclass(eq=False)
class Name(Expr):
    id: str


@dataclass(eq=False)
class ListExpr(Expr):
    items: list[Expr]


@dataclass(eq=False)
class Unary(Expr):
    op: str  # "-" or "not"
    operand: Expr


@dataclass(eq=False)
class Binary(Expr):
    op: str  # + - * / // % == != < <= > >= in "not in" and or
    left: Expr
    right: Expr


@dataclass(eq=False)
class Index(Expr):
    target: Expr
    index: Expr


@dataclass(eq=False)
class Slice(Expr):
    target: Expr
    start: Expr | None
    stop: Expr | None


@dataclass(eq=False)
class Attribute(Expr):
    """`x.name`: parsed only to be refused with a clear message (the language has no attributes)."""

    target: Expr
    name: str


@dataclass(eq=False)
class Keyword(Node):
    name: str
    value: Expr


@dataclass(eq=False)
class Call(Expr):
    func: str
    args: list[Expr]
    kwargs: list[Keyword]


def subexpressions(e: Expr):
    """`e` and every expression inside it, parents before children."""
    yield e
    if isinstance(e, ListExpr):
        parts = e.items
    elif isinstance(e, Unary):
        parts = [e.operand]
    elif isinstance(e, Binary):
        parts = [e.left, e.right]
    elif isinstance(e, Index):
        parts = [e.target, e.index]
    elif isinstance(e, Slice):
        parts = [p for p in (e.target, e.start, e.stop) if p is not None]
    elif isinstance(e, Call):
        parts = [*e.args, *(k.value for k in e.kwargs)]
    else:
        parts = []
    for part in parts:
        yield from subexpressions(part)


@dataclass(eq=False)
class Setting(Node):
    name: str
    value: Expr


# -- statements -------------------------------------------------------------------------------------
class Stmt(Node):
    pass


@dataclass(eq=False)
class Assign(Stmt):
    name: str
    value: Expr
    op: str | None = None  # "+=" etc. for augmented assignment


@dataclass(eq=False)
class Sample(Stmt):
    target: str | None
    dist: Call
    where: Expr | None


@dataclass(eq=False)
class Observe(Stmt):
    value: Expr
    dist: Call


@dataclass(eq=False)
class Condition(Stmt):
    test: Expr


@dataclass(eq=False)
class Score(Stmt):
    value: Expr


@dataclass(eq=False)
class Twist(Stmt):
    value: Expr


@dataclass(eq=False)
class Finish(Stmt):
    pass


@dataclass(eq=False)
class Stop(Stmt):
    pass


@dataclass(eq=False)
class Return(Stmt):
    value: Expr


@dataclass(eq=False)
class ContextDecl(Stmt):
    name: str
    prompt: Expr
    options: list[Setting] = field(default_factory=list)  # heal = false


@dataclass(eq=False)
class ExprStmt(Stmt):
    expr: Expr


@dataclass(eq=False)
class If(Stmt):
    branches: list[tuple[Expr, list[Stmt]]]
    orelse: list[Stmt]


@dataclass(eq=False)
class Repeat(Stmt):
    count: Expr
    var: str | None
    body: list[Stmt]


@dataclass(eq=False)
class While(Stmt):
    test: Expr
    max: Expr | None
    body: list[Stmt]


@dataclass(eq=False)
class For(Stmt):
    var: str
    iterable: Expr
    body: list[Stmt]


# -- declarations -----------------------------------------------------------------------------------
@dataclass(eq=False)
class Input(Node):
    name: str
    type: str | None
    default: Expr | None


@dataclass(eq=False)
class ModelOption(Node):
    """`backend = "vllm"` or `dtype = "bfloat16"` after a model declaration."""

    name: str
    value: str


@dataclass(eq=False)
class ModelDecl(Node):
    path: str | None  # None: the default model
    options: list[ModelOption] = field(default_factory=list)


@dataclass(eq=False)
class ResourceDecl(Node):
    """`reward_model NAME = "dir"` or `retriever NAME = "dir"`: a model or index directory the program
    may use through reward() or retrieve(); the only files a program can reach."""

    kind: str  # "reward_model" | "retriever"
    name: str
    path: str


@dataclass(eq=False)
class SamplerDecl(Node):
    method: str
    settings: list[Setting]


@dataclass(eq=False)
class FunctionDef(Node):
    name: str
    params: list[str]
    body: list[Stmt]


@dataclass(eq=False)
class ResultDecl(Node):
    value: Expr


@dataclass(eq=False)
class Import(Node):
    """`import ...` / `from ...`: parsed only to be refused with a clear message."""


@dataclass(eq=False)
class Module(Node):
    """A whole `.steer` file: declarations in source order and the body (the statements, in order)."""

    filename: str
    source: str
    inputs: list[Input] = field(default_factory=list)
    models: list[ModelDecl] = field(default_factory=list)
    resources: list[ResourceDecl] = field(default_factory=list)
    samplers: list[SamplerDecl] = field(default_factory=list)
    functions: list[FunctionDef] = field(default_factory=list)
    results: list[ResultDecl] = field(default_factory=list)
    imports: list[Import] = field(default_factory=list)
    body: list[Stmt] = field(default_factory=list)
