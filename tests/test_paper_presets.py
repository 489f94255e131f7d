"""Whatever reproduces the paper measures the paper's edge (``edge_definition=paper``).

The project's default edge is the normalized one (docs/edge_definitions.md); a preset or a
script stage that sets its numbers beside the paper's must pin the paper's own. A preset
declares that it does with a ``# paper preset`` comment line (Hydra ignores comments); a
preset whose header comment speaks of "the paper's" run, control or intervention must carry
that line, and every preset carrying it must compose to ``callbacks.gram.edge_definition:
paper``. The two shell scripts are run with a stand-in Python that records each training
command, and each paper stage's command is composed the same way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import REPO
from tests.test_config import compose_cfg, options

EXPERIMENTS = REPO / "conf" / "experiment"
PAPER = "paper"

MARKER = re.compile(r"^# paper preset\b", re.MULTILINE)
"""The declaration: a comment line of the preset's header."""

CLAIM = re.compile(r"\bthe paper's\b", re.IGNORECASE)
"""Header wording that says the preset is the paper's own run (its run, control, setup...)."""

NOT_PAPER = ("edge_controls",)
"""Presets that must not pin an edge: edge_controls measures every definition."""


def header(text: str) -> str:
    """The comment lines a preset begins with (its description), without Hydra's
    ``# @package`` directive."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line)
    return "\n".join(lines)


def unmarked_claims(texts: dict[str, str]) -> list[str]:
    """The presets whose header claims to be the paper's but that lack the marker."""
    return sorted(
        name
        for name, text in texts.items()
        if CLAIM.search(header(text)) and not MARKER.search(header(text))
    )


def marked(texts: dict[str, str]) -> list[str]:
    return sorted(name for name, text in texts.items() if MARKER.search(header(text)))


PRESETS = {name: (EXPERIMENTS / f"{name}.yaml").read_text() for name in options("experiment")}


def test_the_header_check_tells_a_claim_without_the_marker() -> None:
    """The two rules on made-up presets: a claim needs the marker; a body comment or the
    preset's name is no claim."""
    texts = {
        "claims": "# @package _global_\n# The paper's run.\nseed: 1\n",
        "declared": "# @package _global_\n# The paper's run.\n# paper preset: yes\nseed: 1\n",
        "body_only": "# @package _global_\n# A control.\nseed: 1  # the paper's seed\n",
        "lacks": "# @package _global_\n# The decoupling the paper lacks.\nseed: 1\n",
    }
    assert unmarked_claims(texts) == ["claims"]
    assert marked(texts) == ["declared"]


def test_every_preset_claiming_the_paper_declares_it() -> None:
    assert unmarked_claims(PRESETS) == []


def test_the_paper_presets_are_the_ones_read_from_the_headers() -> None:
    """What the headers say today: the paper's Dyck run and control, modular arithmetic,
    SCAN, the WD intervention, its Table 2 classes (on Dyck and modular, and on SCAN), and
    the decoupling (compared with them); never edge_controls."""
    expected = [
        "classes",
        "classes_scan",
        "decoupling",
        "dyck_control",
        "dyck_grok",
        "modular_grok",
        "scan_paper",
        "wd_intervention",
    ]
    assert marked(PRESETS) == expected
    assert not set(NOT_PAPER) & set(marked(PRESETS))


@pytest.mark.parametrize("experiment", marked(PRESETS))
@pytest.mark.parametrize("extra", [[], ["callbacks=full"]], ids=["own", "full"])
def test_a_paper_preset_composes_to_the_papers_edge(experiment: str, extra: list[str]) -> None:
    """With its own callbacks set and with callbacks=full (as scripts/reproduce_paper.sh
    runs them), the Gram callback it configures measures the paper's edge."""
    cfg = compose_cfg([f"experiment={experiment}", *extra])
    gram = cfg.callbacks.gram
    assert gram._target_ == "grokedge.callbacks.gram.GramCallback"
    assert gram.edge_definition == PAPER


@pytest.mark.parametrize("experiment", NOT_PAPER)
def test_edge_controls_keeps_the_default_edge(experiment: str) -> None:
    default = compose_cfg([]).callbacks.gram.edge_definition
    assert compose_cfg([f"experiment={experiment}"]).callbacks.gram.edge_definition == default


def test_a_pinned_edge_without_a_gram_callback_is_skipped(tmp_path: Path, capsys) -> None:
    """experiment=dyck_grok callbacks=none: the pinned knob is all that is left of
    callbacks.gram; the run builds without it and says so."""
    from grokedge.train import build, compose

    cfg = compose(["experiment=dyck_grok", "callbacks=none", "logger=none"], tmp_path)
    assert dict(cfg.callbacks) == {"gram": {"edge_definition": PAPER}}
    run = build(cfg, tmp_path)
    names = [type(c).__name__ for c in run.trainer.callbacks]
    assert "GramCallback" not in names and "DictConfig" not in names
    assert "callbacks.gram.edge_definition ignored" in capsys.readouterr().err


# ------------------------------------------------------------------------- the scripts

RECORDER = """#!{python}
# Stand-in for Python: records its arguments; a training sweep gets a job directory with
# the files the calling script looks for (overrides, checkpoints at steps 100 and 1000).
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:2] == ["-m", "grokedge.train"]:
    for a in args:
        if a.startswith("hydra.sweep.dir="):
            job = Path(a.split("=", 1)[1]) / "0"
            (job / ".hydra").mkdir(parents=True, exist_ok=True)
            (job / ".hydra" / "overrides.yaml").write_text(
                "- seed=42\\n- optimizer.weight_decay=1\\n")
            (job / "checkpoints").mkdir(exist_ok=True)
            for step in (100, 1000):
                (job / "checkpoints" / f"epoch=0-step={{step}}.ckpt").write_text("")
"""


def _recorder(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(RECORDER.format(python=sys.executable))
    path.chmod(0o755)
    return path


def _run_script(tmp_path: Path, args: list[str], env: dict[str, str]) -> list[list[str]]:
    """Run a script of scripts/ with the recorder; the argument lists of its training
    commands (after ``-m grokedge.train``)."""
    record = tmp_path / "record.jsonl"
    proc = subprocess.run(
        ["bash", *args],
        cwd=REPO,
        env={**os.environ, "RECORD": str(record), "WANDB_MODE": "disabled", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    return [c[2:] for c in calls if c[:2] == ["-m", "grokedge.train"]]


def _composable(args: list[str]) -> list[str]:
    """A training command's overrides as one job of its sweep (each swept key's first
    value), without the command-line flags and Hydra's own keys."""
    parser = OverridesParser.create()
    out = []
    for arg in args:
        if arg.startswith("-") or arg.startswith("hydra"):
            continue
        override = parser.parse_override(arg)
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            out.append(f"{override.get_key_element()}={first}")
        else:
            out.append(arg)
    return out


def _assert_paper_edge(args: list[str]) -> None:
    assert "callbacks.gram.edge_definition=paper" in args, args
    cfg = compose_cfg(_composable(args))
    assert cfg.callbacks.gram._target_ == "grokedge.callbacks.gram.GramCallback"
    assert cfg.callbacks.gram.edge_definition == PAPER


def _sweep_name(args: list[str]) -> str:
    return next(Path(a.split("=", 1)[1]).name for a in args if a.startswith("hydra.sweep.dir="))


@pytest.mark.parametrize("flags", [[], ["--quick"], ["--gpu"]], ids=["cpu", "quick", "gpu"])
def test_every_stage_of_reproduce_paper_passes_the_papers_edge(tmp_path: Path, flags) -> None:
    python = _recorder(tmp_path, "python")
    out = tmp_path / "paper"
    calls = _run_script(
        tmp_path,
        ["scripts/reproduce_paper.sh", *flags],
        {"PYTHON": str(python), "OUT": str(out)},
    )
    assert sorted(_sweep_name(c) for c in calls) == ["dyck", "modular", "scan", "wd_intervention"]
    for args in calls:
        _assert_paper_edge(args)


def test_the_class_stage_of_gpu_check_passes_the_papers_edge(tmp_path: Path) -> None:
    """scripts/gpu_check.sh with CLASSES=1, every program it starts stood in for: its
    SCAN class sweep (the paper's Table 2) runs on the paper's edge."""
    _recorder(tmp_path, "python3")
    _recorder(tmp_path, "nvidia-smi")
    out = tmp_path / "gpu"
    calls = _run_script(
        tmp_path,
        ["scripts/gpu_check.sh"],
        {
            "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
            "OUT": str(out),
            "SITE": str(tmp_path / "site"),
            "PKG": str(tmp_path / "pkg"),
            "CLASSES": "1",
        },
    )
    classes = [c for c in calls if any(a.startswith("hydra.sweep.dir=") for a in c)]
    assert [_sweep_name(c) for c in classes] == ["scan_classes"]
    _assert_paper_edge(classes[0])
