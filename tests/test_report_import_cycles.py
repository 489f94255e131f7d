"""``scripts/import_cycles.py`` on tiny synthetic packages whose cycles are known: it must
find a planted cycle (also through a late, function-level import, a relative import and a
package living outside the main root), ignore ``TYPE_CHECKING`` imports, and exit 0 on
a package without cycles."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "import_cycles.py"


@pytest.fixture(scope="module")
def cycles_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_cycles", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_cycles"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _package(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` ({relative path: source}) under ``root``; returns ``root``."""
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


def _cycles(script: ModuleType, roots: dict[str, Path]) -> list[list[str]]:
    graph = script.import_graph(script.module_files(roots))
    return sorted(script.cycles(graph))


def test_a_planted_late_import_cycle_is_found(cycles_script: ModuleType, tmp_path: Path) -> None:
    pkg = _package(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "from pkg.b import g\n\ndef f():\n    return g()\n",
            # The cycle closes only at call time: a function-level import.
            "b.py": "def g():\n    from pkg import a\n    return a\n",
            "c.py": "import pkg.a\n",  # imports into the cycle, is not part of it
        },
    )
    assert _cycles(cycles_script, {"pkg": pkg}) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_relative_imports_and_a_package_outside_the_root(
    cycles_script: ModuleType, tmp_path: Path
) -> None:
    # pkg.plug lives in its own directory (as grokedge.callbacks lives in callbacks/).
    pkg = _package(tmp_path / "src" / "pkg", {"__init__.py": "", "core.py": "from . import x\n"})
    _package(pkg, {"x.py": "from pkg.plug.hook import h\n"})
    plug = _package(
        tmp_path / "plug",
        {"__init__.py": "", "hook.py": "from ..core import y\nh = 1\n"},
    )
    found = _cycles(cycles_script, {"pkg": pkg, "pkg.plug": plug})
    assert found == [["pkg.core", "pkg.x", "pkg.plug.hook", "pkg.core"]]


def test_three_cycles_sharing_modules_are_each_listed_once(
    cycles_script: ModuleType, tmp_path: Path
) -> None:
    # a <-> b, b <-> c, and a -> b -> c -> a: the elementary cycles, enumerated by hand.
    pkg = _package(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "import pkg.b\n",
            "b.py": "import pkg.a\nimport pkg.c\n",
            "c.py": "import pkg.b\nimport pkg.a\n",
        },
    )
    assert _cycles(cycles_script, {"pkg": pkg}) == [
        ["pkg.a", "pkg.b", "pkg.a"],
        ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ["pkg.b", "pkg.c", "pkg.b"],
    ]


def test_type_checking_imports_do_not_count(cycles_script: ModuleType, tmp_path: Path) -> None:
    pkg = _package(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "import pkg.b\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n",
        },
    )
    assert _cycles(cycles_script, {"pkg": pkg}) == []
    graph = cycles_script.import_graph(cycles_script.module_files({"pkg": pkg}), True)
    assert list(cycles_script.cycles(graph)) == [["pkg.a", "pkg.b", "pkg.a"]]


@pytest.mark.parametrize(("b_source", "status"), [("import pkg.a\n", 1), ("x = 1\n", 0)])
def test_exit_status_and_output(tmp_path: Path, b_source: str, status: int) -> None:
    pkg = _package(
        tmp_path / "pkg", {"__init__.py": "", "a.py": "from pkg import b\n", "b.py": b_source}
    )
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", f"pkg={pkg}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == status, done.stderr
    if status:
        assert done.stdout.startswith("pkg.a -> pkg.b (") and "-> pkg.a (" in done.stdout
        assert "a.py:1)" in done.stdout and "b.py:1)" in done.stdout
    else:
        assert done.stdout == ""
    assert f"{status} cycles" in done.stderr


def test_bad_root_is_one_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", "no-equals-sign"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "expected package=directory" in done.stderr
