"""grokedge as a library: ``pip install`` (not editable) into a fresh virtual environment.

The package is built from a copy of the checkout's files (tracked and new, not ignored:
the build writes build/ and *.egg-info next to its sources) and installed with
``--no-deps`` into a venv outside the repository; its dependencies come from the repo's
venv through a ``.pth`` file (no network, no torch download), which adds that venv's
site-packages but not the checkout, so ``grokedge`` resolves to the installed copy. From
a directory outside the checkout: the callbacks import, the Hydra config ships
(``--cfg job``), and a tiny real run trains.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def _sh(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fresh venv's python, grokedge installed from a copy of the checkout."""
    root = tmp_path_factory.mktemp("installed")
    files = _sh(["git", "ls-files", "-co", "--exclude-standard", "-z"], REPO).split("\0")
    source = root / "source"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    venv = root / "venv"
    # No pip of its own: pip and setuptools (>= 69, pyproject.toml's build requirement)
    # come from the repo's venv through the .pth file below, like every dependency.
    # The system site-packages as the repo's venv has them (its pyvenv.cfg), so that the
    # packages it takes from there (e.g. packaging) are found too.
    system = "include-system-site-packages = true" in (Path(sys.prefix) / "pyvenv.cfg").read_text()
    flags = ["--system-site-packages"] if system else []
    _sh([sys.executable, "-m", "venv", "--without-pip", *flags, str(venv)], root)
    python = venv / "bin" / "python"
    site = _sh(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root
    ).strip()
    # The repo venv's packages (torch, lightning, hydra, ...), not the checkout itself: a
    # plain path line, so that the repo venv's own .pth files (its editable grokedge) are
    # not read.
    (Path(site) / "repo_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _sh(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(source)],
        root,
        env,
    )
    return python


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def test_installed_package_imports_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    code = (
        "import grokedge, grokedge.callbacks as c; "
        "from grokedge.callbacks import GramCallback, AblationCallback; "
        "from grokedge.adapters import FunctionalAdapter; "
        "import grokedge.edge, grokedge.experiments, grokedge.analysis, grokedge.reporting; "
        "import grokedge.report, grokedge.train; "
        "from importlib.resources import files; "
        "print('FILE', grokedge.__file__); print('CB', c.__file__); "
        "print('CLAIMS', files('grokedge.conf').joinpath('report/claims.yaml').is_file())"
    )
    out = _sh([str(installed), "-c", code], tmp_path, _env())
    venv = installed.parents[1]
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert Path(lines["FILE"]).is_relative_to(venv), lines["FILE"]
    assert Path(lines["CB"]).is_relative_to(venv), lines["CB"]
    assert not Path(lines["FILE"]).is_relative_to(REPO)
    assert lines["CLAIMS"] == "True"
    # Every config file of the checkout ships.
    conf = Path(lines["FILE"]).parent / "conf"
    shipped = {p.relative_to(conf) for p in conf.rglob("*.yaml")}
    wanted = {p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml")}
    assert wanted <= shipped, sorted(wanted - shipped)


def test_installed_cli_composes_and_trains_outside_the_checkout(
    installed: Path, tmp_path: Path
) -> None:
    job = _sh([str(installed), "-m", "grokedge.train", "--cfg", "job"], tmp_path, _env())
    assert "callbacks:" in job and "trainer:" in job
    run = tmp_path / "run"
    _sh(
        [
            str(installed),
            "-m",
            "grokedge.train",
            "task=dyck",
            "trainer.max_steps=20",
            "logger=none",
            "callbacks=gram",
            "torch_threads=1",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
        _env(),
    )
    assert (run / "summary.json").is_file()


def test_installed_own_module_example_imports(installed: Path, tmp_path: Path) -> None:
    script = tmp_path / "own_module.py"
    shutil.copy2(REPO / "scripts" / "own_module.py", script)
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('own_module', {str(script)!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print('MAIN', callable(m.main))"
    )
    out = _sh([str(installed), "-c", code], tmp_path, _env())
    assert "MAIN True" in out
