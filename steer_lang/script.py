"""A checked `.steer` program ready to run: its inputs, settings and model, and the program objects.

`Script.run` is the one path from text to a posterior, shared by the CLI and Python callers; it
builds a `ScriptProgram` (a `steer.Program`) and hands it to `steer.run`, the same samplers that run
hand-written Python programs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.errors import SteerError
from steer.lm import LanguageModel, load_model
from steer.potentials import load_potential
from steer.smc import Posterior, run

from . import ast
from .builtins import MAX_SIZE, METHOD_ALIASES, SETTINGS, size_of, type_of
from .checker import check, setting_problem
from .errors import LangError
from .interpreter import TIME_LIMIT, Code, ScriptProgram
from .limits import MAX_INT
from .parser import MAX_SOURCE, decode_source, parse

DEFAULTS = {"method": "smc", "particles": 16, "ess": 0.5, "resampling": "systematic", "seed": 0, "beam": 3,
            "max_tokens": 128}
_UNSET = object()


@dataclass
class InputSpec:
    name: str
    type: str
    default: Any = _UNSET  # _UNSET: the caller must give a value


class Script:
    """A parsed and checked program.  Build with `Script.from_file(path)` or `Script.from_source(text)`."""

    def __init__(self, module: ast.Module, base_dir: Path | None = None,
                 allow_paths: Sequence[str | Path] = ()):
        check(module)
        self.module = module
        self.base_dir = base_dir or Path.cwd()
        # Model, reward-model and index paths must stay inside these folders (symlinks resolved).
        self.allowed = [self.base_dir.resolve(), *(Path(p).expanduser().resolve() for p in allow_paths)]
        self.inputs: dict[str, InputSpec] = {}
        values: dict[str, Any] = {}
        for node in module.inputs:
            default = _UNSET
            if node.default is not None:
                default = values[node.name] = self._evaluate(node.default, values)
            self.inputs[node.name] = InputSpec(node.name, node.type or type_of(default), default)

    @classmethod
    def from_source(cls, source: str, filename: str = "<string>", *, base_dir: Path | None = None,
                    allow_paths: Sequence[str | Path] = ()) -> Script:
        return cls(parse(source, filename), base_dir=base_dir, allow_paths=allow_paths)

    @classmethod
    def from_file(cls, path: str | Path, *, allow_paths: Sequence[str | Path] = ()) -> Script:
        """The program in `path`; the files it names resolve relative to its folder and must stay in it
        (or in one of `allow_paths`)."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_SOURCE + 1)  # a larger file is refused without reading it all
        except OSError as e:
            raise SteerError(f"cannot read {path}: {e.strerror or e}") from None
        source = decode_source(data, str(path))
        return cls(parse(source, str(path)), base_dir=path.parent, allow_paths=allow_paths)

    # -- inputs, settings, model -------------------------------------------------------------------
    def input_values(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """Input values: `given` (values, or strings from the command line) over the defaults."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.inputs))
        if unknown:
            declared = ", ".join(self.inputs) or "none"
            raise SteerError(f"unknown input {unknown[0]!r}; the program declares: {declared}")
        values: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            if name in given:
                values[name] = _coerce(spec, given[name])
            elif spec.default is not _UNSET:
                node = next(i for i in self.module.inputs if i.name == name)
                values[name] = self._evaluate(node.default, values)  # defaults may use earlier inputs
            else:
                raise SteerError(f"input {name!r} has no default; give it with --set {name}=VALUE")
        return values

    def settings(self, values: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
        """Sampler settings: `overrides` (None = not given) over the file's `sampler` over the defaults.

        `values` are the resolved input values (see `input_values`); settings may be computed from them.
        """
        values = self.input_values() if values is None else values
        settings = dict(DEFAULTS)
        for node in self.module.samplers[:1]:
            settings["method"] = METHOD_ALIASES.get(node.method, node.method)
            for s in node.settings:
                value = self._evaluate(s.value, values)
                problem = setting_problem(s.name, value)
                if problem:
                    raise self._fail(s.value, problem)
                settings[s.name] = value
        settings.update({k: v for k, v in overrides.items() if v is not None})
        settings["method"] = METHOD_ALIASES.get(settings["method"], settings["method"])
        if settings["method"] not in SETTINGS:
            raise SteerError(f"unknown method {settings['method']!r}; choose one of {', '.join(SETTINGS)}")
        for name in ("particles", "ess", "resampling", "seed", "beam", "max_tokens"):
            problem = setting_problem(name, settings[name])
            if problem:
                raise SteerError(problem)
        return settings

    def model_path(self) -> Path | None:
        """The model the file names (relative to the file), or None for the default model."""
        if not self.module.models or self.module.models[0].path is None:
            return None
        return self._confined(self.module.models[0], self.module.models[0].path)

    def _confined(self, node: ast.Node, written: str) -> Path:
        """`written` relative to the program's folder, symlinks resolved; refused (at the declaration)
        when it leaves the allowed folders, so a program cannot reach files it was not given."""
        if not written.strip():
            raise self._fail(node, "the path is empty")
        if "\x00" in written:
            raise self._fail(node, "a path cannot hold a NUL character")
        path = Path(written).expanduser()
        path = (path if path.is_absolute() else self.base_dir / path).resolve()
        if not any(path.is_relative_to(root) for root in self.allowed):
            raise self._fail(node, f"{written!r} is outside the program's folder ({self.allowed[0]}); move it "
                                   "there, or allow its folder with --allow-path DIR (allow_paths=[...] in Python)")
        return path

    def check_paths(self) -> None:
        """Judge every path the file names as a run would, before any model loads (`steer check` too)."""
        self.model_path()
        for node in self.module.resources:
            self._confined(node, node.path)

    def check_settings(self) -> None:
        """Judge the sampler settings as a run with the inputs' defaults would, where every input has one
        (`steer check`: a setting computed from an input with a bad default is an error at once)."""
        if all(spec.default is not _UNSET for spec in self.inputs.values()):
            self.settings(self.input_values())

    def model_options(self) -> dict[str, str]:
        """The `backend` and `dtype` the file's model declaration asks for (checked already)."""
        return {o.name: o.value for o in self.module.models[0].options} if self.module.models else {}

    def load_model(self, **overrides: Any) -> LanguageModel:
        """The file's model with its options; `overrides` (path=, backend=, dtype=, device=) that are not None win."""
        given = {k: v for k, v in overrides.items() if v is not None}
        options: dict[str, Any] = {"path": given.get("path") or self.model_path(), **self.model_options()}
        options.update(given)
        try:
            return load_model(options.pop("path"), **options)
        except SteerError as e:
            if given.get("path") or not self.module.models or self.module.models[0].path is None:
                raise
            raise self._fail(self.module.models[0], str(e)) from None  # at the file's model declaration

    def resources(self) -> dict[str, Any]:
        """The reward models and retrievers the file declares, loaded once (paths are relative to the file)."""
        if getattr(self, "_resources", None) is None:
            from retrieval.retriever import Retriever  # faiss, an optional heavy dependency: loaded when used

            # a reward model (sequence classifier) or a causal LM used as its own judge; an index directory
            loaders = {"reward_model": load_potential, "retriever": Retriever.load}
            loaded = {}
            for node in self.module.resources:
                loaded[node.name] = loaders[node.kind](self._confined(node, node.path))
            self._resources = loaded
        return self._resources

    # -- running -----------------------------------------------------------------------------------
    def program(self, lm: LanguageModel, inputs: dict[str, Any] | None = None,
                max_tokens: int | None = None, time_limit: float | None = TIME_LIMIT) -> ScriptProgram:
        """The program as a `steer.Program` (one particle; the samplers copy it).  `time_limit`: seconds
        of wall-clock time from now that the run may take (None: no limit)."""
        values = self.input_values(inputs)
        limit = max_tokens if max_tokens is not None else self.settings(values)["max_tokens"]
        return ScriptProgram(Code(self.module, lm, limit, time_limit), {**values, **self.resources()})

    def run(self, lm: LanguageModel | None = None, *, inputs: dict[str, Any] | None = None,
            progress: bool = False, record_particles: bool = False, time_limit: float | None = TIME_LIMIT,
            **overrides: Any) -> Posterior:
        """Run with the file's sampler settings, `overrides` (particles=, method=, seed=, ...) winning;
        the run stops with a `file:line:col` error once it has taken `time_limit` seconds."""
        values = self.input_values(inputs)
        s = self.settings(values, **overrides)
        if lm is None:
            lm = self.load_model()
        options: dict[str, Any] = {"particles": s["particles"], "seed": s["seed"], "progress": progress,
                                   "record_particles": record_particles}
        if s["method"] == "smc":
            options.update(ess_threshold=s["ess"], resampling=s["resampling"])
        elif s["method"] == "smc-steer":
            options.update(beam=s["beam"])
        return run(self.program(lm, values, s["max_tokens"], time_limit), s["method"], **options)

    # -- helpers -----------------------------------------------------------------------------------
    def _evaluate(self, expr: ast.Expr, inputs: dict[str, Any]) -> Any:
        """A constant expression over inputs (defaults, settings): evaluated without a model."""
        evaluator = ScriptProgram(Code(self.module, None, 1), inputs)
        try:
            return evaluator._eval(expr, dict(inputs))
        except Exception as e:  # noqa: BLE001 - reported at the expression
            message = getattr(e, "message", None) or f"cannot evaluate this expression: {e}"
            raise self._fail(expr, message) from None

    def _fail(self, node: ast.Node, message: str) -> LangError:
        return Code(self.module, None, 1).fail(node, message)


def _coerce(spec: InputSpec, value: Any) -> Any:
    """An input value of the declared type, within the language's limits; strings (from the command
    line) are parsed."""
    value = _parsed(spec, value)
    seen: dict[int, int] = {}
    for item in [value, *(value if isinstance(value, list) else [])]:
        if isinstance(item, int) and not isinstance(item, bool) and not -MAX_INT < item < MAX_INT:
            raise SteerError(f"input {spec.name!r}: integers must lie within ±2**63, got {item}")
        if isinstance(item, (str, list)) and size_of(item, seen) > MAX_SIZE:
            raise SteerError(f"input {spec.name!r} is too large ({size_of(item, seen):,} characters and items; "
                             f"the limit is {MAX_SIZE:,})")
    return value


def _parsed(spec: InputSpec, value: Any) -> Any:
    if not isinstance(value, str) or spec.type == "str":
        if spec.type not in ("any", type_of(value)) and not (spec.type == "float" and type_of(value) == "int"):
            raise SteerError(f"input {spec.name!r} is {spec.type}, got {type_of(value)}")
        return float(value) if spec.type == "float" else value
    text = value.strip()
    try:
        if spec.type == "int":
            return int(text)
        if spec.type == "float":
            return float(text)
    except ValueError:
        raise SteerError(f"input {spec.name!r} is {spec.type}, got {value!r}") from None
    if spec.type == "bool":
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise SteerError(f"input {spec.name!r} is bool: give true or false, got {value!r}")
    if spec.type == "list":
        return _literal_list(spec.name, text)
    return value


def _literal_list(name: str, text: str) -> list:
    """A list literal in the language's own syntax, e.g. ["ocean", "music"] (nothing is evaluated)."""
    try:
        module = parse(f"result {text}\n", f"--set {name}")
    except LangError as e:
        raise SteerError(f"input {name!r} is a list, e.g. '[\"a\", \"b\"]': {e.first.message}") from None

    def literal(e: ast.Expr) -> Any:
        if isinstance(e, ast.Const):
            return e.value
        if isinstance(e, ast.ListExpr):
            return [literal(x) for x in e.items]
        if isinstance(e, ast.Unary) and e.op == "-" and isinstance(e.operand, ast.Const):
            return -e.operand.value
        raise SteerError(f"input {name!r} must be a literal list, got {text!r}")

    value = literal(module.results[0].value) if module.results and not module.body else None
    if not isinstance(value, list):
        raise SteerError(f"input {name!r} is a list, e.g. '[\"a\", \"b\"]', got {text!r}")
    return value
