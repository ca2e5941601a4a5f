"""List every import between the project's modules and check that layers only point down.

Reads the source with `ast` (nothing is imported), so imports inside functions and under
`if TYPE_CHECKING:` count like any other: a type hint is a dependency too (the listing marks them).
Exits 1 and names the modules when the imports form a cycle or a module imports from a higher layer.

    python scripts/import_graph.py [--list]

Layers, lowest first (a module may import its own layer or lower ones):
    0 base      steer.errors, steer.files, steer.randomness, steer.scheduler, steer.jsonl, steer.template
    1 lm        steer.lm.*: vocabularies, tokens, the LanguageModel interface and its backends
    2 constraints  steer.constraints.*: masks, checks, tilts, the llguidance engine
    3 context   steer.context, steer.distributions, steer.potentials, steer.mixture
    4 samplers  steer.program, steer.smc, steer.resampling, steer.report, steer.generate, steer.words
    5 front ends  steer (the package), steer.cli, steer_lang, train, retrieval
A deliberate lazy import of a heavy optional dependency is an import of a third-party package, so it
never shows here.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("steer", "steer_lang", "train", "retrieval")
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("steer.errors", "steer.files", "steer.randomness", "steer.scheduler", "steer.jsonl",
              "steer.template")),
    ("lm", ("steer.lm",)),
    ("constraints", ("steer.constraints",)),
    ("context", ("steer.context", "steer.distributions", "steer.potentials", "steer.mixture")),
    ("samplers", ("steer.program", "steer.smc", "steer.resampling", "steer.report", "steer.generate",
                  "steer.words")),
    ("front ends", ("steer", "steer.cli", "steer_lang", "train", "retrieval")),
]


def modules() -> dict[str, Path]:
    """Every module of the project by dotted name (a package by its `__init__.py`)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _resolve(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` reads from."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _type_only(tree: ast.Module) -> set[int]:
    """The ids of import nodes under `if TYPE_CHECKING:`."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(n) for child in node.body for n in ast.walk(child))
    return ids


def imports(known: dict[str, Path]) -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, type only) for every import of one project module by another."""
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        hints = _type_only(tree)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, path, node)
                # `from . import x` names a submodule when x is one, else a name of the package
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source
                           for a in node.names]
            for target in targets:
                while target and target not in known:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name and target.split(".")[0] in PACKAGES:
                    found.append((name, target, node.lineno, id(node) in hints))
    return sorted(set(found))


def layer(module: str) -> int:
    """The layer of `module`: the longest listed prefix decides (`steer.lm.hf` is in `steer.lm`)."""
    best, level = -1, len(LAYERS) - 1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    return level


def cycles(edges: list[tuple[str, str, int, bool]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def problems(edges: list[tuple[str, str, int, bool]], known: dict[str, Path]) -> list[str]:
    found = []
    for a, b, line, _ in edges:
        # a package's __init__ gathers what lies under it: importing its own submodules is not upward
        if layer(b) > layer(a) and not b.startswith(a + "."):
            found.append(f"{known[a].relative_to(ROOT)}:{line}: {a} (layer {LAYERS[layer(a)][0]}) imports "
                         f"{b} (layer {LAYERS[layer(b)][0]}), a higher layer")
    for group in cycles(edges):
        found.append("import cycle: " + " -> ".join(group))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every import between project modules")
    args = parser.parse_args(argv)
    known = modules()
    edges = imports(known)
    if args.list:
        for a, b, line, type_only in edges:
            print(f"{a} -> {b}  ({known[a].relative_to(ROOT)}:{line}{', type hint' if type_only else ''})")
    found = problems(edges, known)
    for problem in found:
        print(problem)
    print(f"{len(known)} modules, {len(edges)} imports between them, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
