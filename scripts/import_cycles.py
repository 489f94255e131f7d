"""Every import cycle among a package's modules, from their source (nothing is imported).

    python scripts/import_cycles.py                  # grokedge, as pyproject.toml maps it
    python scripts/import_cycles.py --root pkg=path  # another package (repeatable)

The modules are the ``.py`` files under each package root: by default the
``[tool.setuptools] package-dir`` of ``pyproject.toml`` (``grokedge`` -> ``src/grokedge``,
``grokedge.callbacks`` -> ``callbacks``, ``grokedge.conf`` -> ``conf``), so a module that
lives outside ``src/`` is one of the package's like any other. Every ``import`` and
``from ... import`` statement counts, at module level or inside a function (a late import
still closes a cycle when it runs), relative ones resolved; those under ``if
TYPE_CHECKING:`` never run and are left out unless ``--type-checking``. ``from a import
b`` is an edge to ``a.b`` when that is a module, else to ``a`` (its ``__init__``); an
import of ``a.b.c`` is an edge to ``a.b.c`` only (not to the packages above it).

Prints every elementary cycle (``a -> b -> a``, each edge with the file and line of its
import), one per line, up to ``--max-cycles`` (then stops); exit status 1 when there is any, 0 when
there is none, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = "pyproject.toml"
DEFAULT_MAX_CYCLES = 1000
"""Cycles printed at most (their number can grow exponentially with the graph's size)."""


@dataclass(frozen=True)
class ImportSite:
    """Where a module imports another: its file and the line of the statement."""

    path: Path
    line: int


def package_roots(pyproject: Path) -> dict[str, Path]:
    """{package: directory} from ``[tool.setuptools] package-dir`` of ``pyproject``."""
    try:
        import tomllib  # Python >= 3.11
    except ImportError as e:  # 3.10: no TOML reader in the standard library
        raise ValueError("reading pyproject.toml needs Python >= 3.11: give --root pkg=dir") from e
    data = tomllib.loads(pyproject.read_text("utf-8"))
    dirs = data.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    if not dirs:
        raise ValueError(f"{pyproject}: no [tool.setuptools] package-dir (give --root pkg=dir)")
    return {name: pyproject.parent / path for name, path in dirs.items()}


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """{module name: file} of every ``.py`` file under the roots (``__init__.py`` names its
    package). A root nested in another (``grokedge.callbacks`` in ``grokedge``) maps its
    own directory, wherever that is."""
    modules: dict[str, Path] = {}
    for package, directory in sorted(roots.items()):
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    hidden |= {id(n) for n in ast.walk(child)}
    return hidden


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of ``from <node.module> import ...`` inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(
    module: str, path: Path, modules: dict[str, Path], type_checking: bool = False
) -> dict[str, ImportSite]:
    """{imported module of ``modules``: its first import site} of one file."""
    tree = ast.parse(path.read_text("utf-8"), filename=str(path))
    hidden = set() if type_checking else _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    found: dict[str, ImportSite] = {}

    def add(target: str, line: int) -> None:
        if target in modules and target != module:
            found.setdefault(target, ImportSite(path, line))

    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                add(name if name in modules else base, node.lineno)
    return found


def import_graph(
    modules: dict[str, Path], type_checking: bool = False
) -> dict[str, dict[str, ImportSite]]:
    """{module: {imported module: site}} over ``modules``."""
    return {m: imports_of(m, p, modules, type_checking) for m, p in sorted(modules.items())}


def _components(graph: dict[str, dict[str, ImportSite]]) -> list[list[str]]:
    """The strongly connected components (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return out


def cycles(graph: dict[str, dict[str, ImportSite]]) -> Iterator[list[str]]:
    """Every elementary cycle, as [m0, m1, ..., m0], each once: it starts at its smallest
    module (by name) and is found by a depth-first search within its strongly connected
    component over the modules after that one."""
    for component in _components(graph):
        members = set(component)
        for start in component:
            allowed = {m for m in members if m >= start}
            path = [start]
            branches = [iter(sorted(t for t in graph[start] if t in allowed))]
            while branches:
                nxt = next(branches[-1], None)
                if nxt is None:
                    branches.pop()
                    path.pop()
                    continue
                if nxt == start:
                    yield [*path, start]
                elif nxt not in path:
                    path.append(nxt)
                    branches.append(iter(sorted(t for t in graph[nxt] if t in allowed)))


def describe(cycle: list[str], graph: dict[str, dict[str, ImportSite]], base: Path) -> str:
    """``a -> b -> a`` with each edge's import site (file relative to ``base``, line)."""
    parts = [cycle[0]]
    for a, b in zip(cycle, cycle[1:], strict=False):
        site = graph[a][b]
        where = site.path.relative_to(base) if site.path.is_relative_to(base) else site.path
        parts.append(f"-> {b} ({where}:{site.line})")
    return " ".join(parts)


def _root_arg(text: str) -> tuple[str, Path]:
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"--root={text!r}: expected package=directory")
    return name, Path(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=_root_arg,
        action="append",
        help="package=directory (repeatable); default: pyproject.toml's package-dir",
    )
    parser.add_argument("--pyproject", type=Path, default=REPO / PYPROJECT)
    parser.add_argument("--type-checking", action="store_true", help="count TYPE_CHECKING imports")
    parser.add_argument("--max-cycles", type=int, default=DEFAULT_MAX_CYCLES)
    args = parser.parse_args(argv)
    if args.max_cycles < 1:
        parser.error(f"--max-cycles={args.max_cycles} is not allowed: an integer >= 1")
    roots = dict(args.root) if args.root else package_roots(args.pyproject)
    for name, directory in roots.items():
        if not directory.is_dir():
            parser.error(f"--root {name}={directory}: not a directory")
    modules = module_files(roots)
    graph = import_graph(modules, args.type_checking)
    base = Path.cwd()
    found = 0
    for cycle in cycles(graph):
        if found == args.max_cycles:  # stop: the rest may be exponentially many
            print(f"... more cycles, not listed (--max-cycles {args.max_cycles})")
            break
        found += 1
        print(describe(cycle, graph, base))
    edges = sum(len(t) for t in graph.values())
    print(f"{len(modules)} modules, {edges} import edges, {found} cycles", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
