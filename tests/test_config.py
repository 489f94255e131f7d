"""Every config combination composes; bad input fails early, clearly, leaving nothing."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="grokedge.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize(
    "task,callbacks,logger,trainer",
    list(
        itertools.product(
            options("task"), options("callbacks"), options("logger"), options("trainer")
        )
    ),
)
def test_every_combination_composes(task: str, callbacks: str, logger: str, trainer: str) -> None:
    cfg = compose_cfg(
        [f"task={task}", f"callbacks={callbacks}", f"logger={logger}", f"trainer={trainer}"]
    )
    assert cfg.task.name == task
    assert cfg.model._target_.startswith("grokedge.models.")
    # Everything but Hydra's run-time interpolations resolves.
    container = OmegaConf.to_container(cfg.task, resolve=True)
    assert container["max_steps"] >= 1


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.task.name in {"dyck", "modular", "scan"}


@pytest.mark.parametrize("model", options("model"))
def test_every_model_composes_with_its_task(model: str) -> None:
    task = model.split("_")[0]  # scan_small, dyck_large, ... go with their task
    assert compose_cfg([f"task={task}", f"model={model}"]).model is not None


def test_model_override_wins_over_the_task_default() -> None:
    cfg = compose_cfg(["task=scan", "model=scan_small"])
    assert cfg.model.d_model < compose_cfg(["task=scan"]).model.d_model


def test_launcher_presets_compose() -> None:
    for launcher in options("hydra/launcher"):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="grokedge.conf", version_base="1.3"):
            cfg = compose(
                "train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True
            )
        assert cfg.hydra.launcher._target_


BAD = [
    (["optimizer.weight_decay=-1"], ["optimizer.weight_decay=-1", ">= 0"]),
    (["optimizer.weight_decay=abc"], ["optimizer.weight_decay='abc'", "a number"]),
    (["optimizer.lr=0"], ["optimizer.lr=0", "> 0"]),
    (["optimizer.lr=fast"], ["optimizer.lr='fast'", "a number"]),
    (["trainer.max_steps=0"], ["trainer.max_steps=0", "integer >= 1"]),
    (["callbacks=gram", "callbacks.gram.window=1"], ["callbacks.gram.window=1"]),
    (["callbacks=gram", "callbacks.gram.select=[nosuch*]"], ["callbacks.gram.select", "nosuch"]),
    (
        ["task=scan", "task.datamodule.split=nosuch"],
        ["task.datamodule.split", "nosuch", "addprim_jump"],
    ),
    (["torch_threads=0"], ["torch_threads=0 is not allowed", "integer >= 1"]),
    (["torch_threads=-1"], ["torch_threads=-1 is not allowed", "integer >= 1"]),
    (["torch_threads=abc"], ["torch_threads='abc' is not allowed", "integer >= 1"]),
    (["torch_threads=1.5"], ["torch_threads=1.5 is not allowed", "integer >= 1"]),
    (
        ["task.grok.alternatives.thresholds=[0.9,1.5]"],
        ["task.grok.alternatives.thresholds=[0.9, 1.5]", "(0, 1]"],
    ),
    (
        ["task.grok.alternatives.thresholds=[0.955]"],
        ["task.grok.alternatives.thresholds=[0.955]", "at most two decimals"],
    ),
    (
        ["task.grok.alternatives.patiences=[1,0]"],
        ["task.grok.alternatives.patiences=[1, 0]", "integers >= 1"],
    ),
]


@pytest.mark.parametrize("overrides,needles", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_fail_before_training(cli, tmp_path: Path, overrides, needles) -> None:
    run_dir = tmp_path / "run"
    proc = cli([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr
    for needle in needles:
        assert needle in message, message[-2000:]
    assert "Traceback" not in message
    assert not run_dir.exists(), "a failed start must not leave a run directory"


@pytest.mark.parametrize(
    "value,expected", [(None, None), ("1", 1), ("12", 12), ("0", None), ("-2", None), ("x", None)]
)
def test_torch_threads_from_the_environment(monkeypatch, value, expected) -> None:
    """GROKEDGE_TORCH_THREADS (the default's source; the local launcher sets "1") reaches
    the config as a string: its digits count as the number, anything else is refused by
    name. Unset, torch_threads is null: torch's own default, left alone."""
    from grokedge.checks import ConfigError
    from grokedge.config_checks import torch_threads

    if value is None:
        monkeypatch.delenv("GROKEDGE_TORCH_THREADS", raising=False)
    else:
        monkeypatch.setenv("GROKEDGE_TORCH_THREADS", value)
    cfg = compose_cfg([])
    if value is None or expected is not None:
        assert torch_threads(cfg) == expected
    else:
        with pytest.raises(ConfigError, match=f"torch_threads='{value}' is not allowed"):
            torch_threads(cfg)


def test_torch_threads_null_leaves_torchs_default(tmp_path: Path, monkeypatch) -> None:
    """torch_threads=null builds a run without touching torch's thread count."""
    import torch

    from grokedge.train import build, compose

    monkeypatch.delenv("GROKEDGE_TORCH_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # not what torch would choose itself on a multi-core machine
    try:
        cfg = compose(["torch_threads=null", "callbacks=none", "logger=none"], tmp_path)
        build(cfg, tmp_path)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "group,value", [("task", "nosuch"), ("callbacks", "nosuch"), ("logger", "nosuch")]
)
def test_unknown_group_option_lists_the_allowed_ones(cli, tmp_path, group, value) -> None:
    run_dir = tmp_path / "run"
    proc = cli([f"{group}={value}", f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert f"Could not find '{group}/{value}'" in proc.stderr
    assert "Available options" in proc.stderr and "none" in proc.stderr or group == "task"
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "task,model,n_params,p",
    [
        ("dyck", "dyck_large", 42_577_933, 14_155_776),
        ("scan", "scan_large", 44_186_633, 18_874_368),
    ],
)
def test_large_models_have_tens_of_millions_of_parameters_and_train(
    tmp_path: Path, task: str, model: str, n_params: int, p: int
) -> None:
    """The counts stated in conf/model/*_large.yaml, and one real forward/backward."""
    import torch

    from grokedge.edge.selection import ParameterSelector
    from grokedge.train import build, compose

    cfg = compose([f"task={task}", f"model={model}", "callbacks=none", "logger=none"], tmp_path)
    run = build(cfg, tmp_path)
    net = run.module.net
    assert run.module.n_params == n_params
    assert ParameterSelector(net.named_parameters(), "attention").p == p
    run.datamodule.setup("fit")
    batch = next(iter(run.datamodule.train_dataloader()))
    loss = run.module.stats(batch).mean_loss()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [q.grad for q in net.parameters() if q.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)
