"""GrokModule is instantiated from conf/module/ (issue 11, item 5): every knob in the config,
following the task's grok criterion and the root keys; build() passes only net, optimizer
and eval_names."""

from __future__ import annotations

from pathlib import Path

import pytest

from grokedge.train import build, compose


def test_module_node_follows_the_task_and_root_keys(tmp_path: Path) -> None:
    cfg = compose(
        [
            "task=scan",
            "task.grok.threshold=0.5",
            "task.grok.patience=2",
            "task.stop_after_grok=7",
            "warmup_steps=3",
            "trainer.log_every_n_steps=9",
        ],
        tmp_path,
    )
    assert cfg.module._target_ == "grokedge.module.GrokModule"
    assert cfg.module.grok_metric == "test/seq_acc"
    assert (cfg.module.grok_threshold, cfg.module.grok_patience) == (0.5, 2)
    assert (cfg.module.stop_after_grok, cfg.module.warmup_steps) == (7, 3)
    assert list(cfg.module.exact_match_sets) == ["test"]
    assert cfg.module.log_every_n_steps == 9


def test_built_module_has_the_configured_knobs(tmp_path: Path) -> None:
    cfg = compose(
        [
            "task=dyck",
            "callbacks=none",
            "logger=none",
            "task.grok.threshold=0.6",
            "module.grok_patience=3",  # the module's own key works too
            "warmup_steps=5",
        ],
        tmp_path,
    )
    module = build(cfg, tmp_path).module
    assert module.eval_names == ("test", "train", "ood")  # from the datamodule
    assert (module.grok_metric, module.grok_threshold, module.grok_patience) == (
        "test/acc",
        0.6,
        3,
    )
    assert (module.warmup_steps, module.stop_after_grok, module.log_every_n_steps) == (5, None, 50)
    assert module.eval_cadence == {"ood": 1000} and type(module.eval_cadence) is dict
    assert module.exact_match_sets == ()  # a Dyck model is not seq2seq


@pytest.mark.parametrize(
    "override,needles",
    [
        ("module.grok_threshold=2", ["module.grok_threshold=2", "a number in (0, 1]"]),
        ("module.warmup_steps=-1", ["module.warmup_steps=-1", "an integer >= 0"]),
        ("+module.nosuch=1", ["nosuch"]),
    ],
    ids=["threshold", "warmup", "unknown-knob"],
)
def test_bad_module_values_fail_before_training(cli, tmp_path: Path, override, needles) -> None:
    run_dir = tmp_path / "run"
    proc = cli([override, "logger=none", f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()
