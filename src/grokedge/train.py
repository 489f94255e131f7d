"""Hydra entry point: compose -> check -> instantiate -> fit -> summary.

    python -m grokedge.train task=dyck callbacks=gram seed=42 optimizer.weight_decay=1
    python -m grokedge.train -m task=dyck optimizer.weight_decay=0,1 seed=42,137,2024

The run directory (Hydra's output dir; ``hydra.run.dir=DIR`` to choose it) receives
``.hydra/``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/`` and the loggers' files.
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from grokedge.checks import ConfigError, not_allowed
from grokedge.config_checks import (
    building_from_config,
    check_config,
    grok_alternatives,
    torch_threads,
)

# Lightning (with torch, torchmetrics, scipy.signal and matplotlib behind it: ~3 s on 2
# cores), W&B, the model and the callbacks are imported where a run needs them, so that
# `--help` and `--cfg job` print in under a second (issue 11, item 4; docs/benchmarks.md,
# "Start-up"; tests/test_startup.py checks what `import grokedge.train` loads).
if TYPE_CHECKING:
    import lightning as L

    from grokedge.module import GrokModule
    from grokedge.run_files import RunFiles
    from grokedge.tasks.base import GrokDataModule

# Lightning 2.6 calls a torch API that torch 2.13 deprecates, once per fit: noise to users.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


@dataclass
class Run:
    """Everything one training run needs, built but not yet started."""

    cfg: DictConfig
    run_dir: Path
    datamodule: GrokDataModule
    module: GrokModule
    trainer: L.Trainer
    files: RunFiles


def check_resume(cfg: DictConfig, module: GrokModule) -> None:
    """Refuse a ``resume=`` checkpoint that cannot continue this run, before training.

    Reads the file (memory-mapped: no copy of a large checkpoint) and checks that it is a
    Lightning checkpoint of the same task whose weights have this model's names and shapes.
    """
    path = cfg.get("resume")
    if path is None:
        return
    import torch

    from grokedge.run_files import error_text

    allowed = "allowed: a checkpoint of a run of the same task and model"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a zip, truncated, pickled objects: all the same to a user
        raise not_allowed(
            "resume", str(path), f"it cannot be read as a checkpoint ({error_text(e)}); {allowed}"
        ) from e
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise not_allowed("resume", str(path), f"no state_dict in it; {allowed}")
    task = (blob.get("grokedge") or {}).get("task")
    if task is not None and task != cfg.task.name:
        raise not_allowed(
            "resume",
            str(path),
            f"it is a checkpoint of task={task}, this run is task={cfg.task.name}; {allowed}",
        )
    theirs, own = blob["state_dict"], module.state_dict()
    missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    shapes = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape)
    if missing or unexpected or shapes:
        raise not_allowed(
            "resume",
            str(path),
            f"its weights do not fit the model of task={cfg.task.name} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}); {allowed}",
        )


def _instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose errors name the config key and the cause."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        raise ConfigError(str(cause)) from e


def _loggers(cfg: DictConfig, run_dir: Path, files: RunFiles) -> list[Any]:
    from grokedge.wandb_setup import wandb_init_kwargs

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    # The run files' history first: Lightning names its directories after loggers[0].
    loggers: list[Any] = [files.history]
    for name, node in (cfg.get("logger") or {}).items():
        extra: dict[str, Any] = {}
        if name == "wandb":
            # One W&B run per job, grouped by sweep so that seeds aggregate.
            if node.get("group") is None and multirun:
                extra["group"] = f"{cfg.task.name}-{Path(hydra_cfg.sweep.dir).name}"
            if node.get("name") is None:
                extra["name"] = hydra_cfg.job.override_dirname or run_dir.name
            extra = wandb_init_kwargs(extra, list(hydra_cfg.overrides.task), multirun)
        loggers.append(_instantiate(node, **extra))
    return loggers


def _lightning_logs_on_stderr() -> None:
    """Lightning's own messages ("GPU available: ...", "`Trainer.fit` stopped: ...") once,
    on stderr, whenever Lightning was imported.

    Lightning's packages give themselves a stderr handler and stop propagating only if they
    are imported before the root logger has handlers. Imported lazily, after Hydra has
    configured logging, each message would be printed twice: by the ``lightning`` logger's
    own handler and by Hydra's root handlers.
    """
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if logger.propagate:
            logger.addHandler(logging.StreamHandler())
            logger.propagate = False


def build(cfg: DictConfig, run_dir: Path) -> Run:
    """Check the config and instantiate data, model, module, callbacks, loggers, trainer.

    Raises :class:`ConfigError` before any training for a value grokedge cannot run with.
    """
    check_config(cfg)
    import lightning as L
    import torch

    from grokedge.callbacks.init_from import InitFromCheckpoint
    from grokedge.resume import RunIdentity
    from grokedge.run_files import RunFiles
    from grokedge.wandb_setup import WandbDashboardCallback

    _lightning_logs_on_stderr()
    threads = torch_threads(cfg)  # checked above: None (torch's default) or an int >= 1
    if threads is not None:
        torch.set_num_threads(threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: GrokDataModule = _instantiate(cfg.task.datamodule)
    net = _instantiate(cfg.model, **datamodule.model_dims())
    datamodule.init_model_(net, cfg.seed)
    # conf/module/: every knob of GrokModule (interpolating the task's grok criterion, ...);
    # only the run-time objects come from here.
    module: GrokModule = _instantiate(
        cfg.module,
        net=net,
        optimizer=_instantiate(cfg.optimizer),
        eval_names=datamodule.eval_names,
    )
    check_resume(cfg, module)
    # The one writer of the run's files, first: the analyses' setup reads its directory.
    files = RunFiles(
        run_dir,
        grok_alternatives=grok_alternatives(cfg),
        fields={"task": cfg.task.name, "torch_threads": torch.get_num_threads()},
    )
    with building_from_config():  # their messages name config keys, not Python arguments
        callbacks = [
            _instantiate(node)
            for name, node in (cfg.get("callbacks") or {}).items()
            if _is_callback_node(f"callbacks.{name}", node)
        ]
    init_from = cfg.get("init_from")
    if init_from is not None and "init_from" not in (cfg.get("callbacks") or {}):
        # init_from=<ckpt> works with any callbacks set (experiment=wd_intervention also
        # names the callback in its set, with its knobs).
        try:
            with building_from_config():
                callbacks.insert(0, InitFromCheckpoint(init_from))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    for callback in callbacks:
        # Checks that need the built model (a selector matching nothing, a weight decay
        # that cannot be split exactly) must fail here, before any training.
        # ... and checks against the task's declarations (probe targets a callback reads).
        for check, against in (("check_module", module), ("check_data", datamodule)):
            if hasattr(callback, check):
                try:
                    getattr(callback, check)(against)
                except ValueError as e:
                    raise ConfigError(str(e)) from e
    callbacks.insert(0, files)
    callbacks += [
        _instantiate(cfg.nonfinite),
        RunIdentity(cfg.task.name, str(cfg.model.get("_target_")), run_dir),
        _instantiate(cfg.checkpoint),
        _instantiate(cfg.progress_bar),
    ]
    callbacks.append(WandbDashboardCallback())  # define_metric + summary (no-op without W&B)
    loggers = _loggers(cfg, run_dir, files)
    trainer = _instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return Run(cfg, run_dir, datamodule, module, trainer, files)


def _is_callback_node(key: str, node: Any) -> bool:
    """Whether ``node`` builds a callback (it has a ``_target_``).

    A paper preset pins a knob of the Gram callback (``callbacks.gram.edge_definition``);
    with a callbacks set that has no Gram callback (``callbacks=none``) that knob is all
    that is left of the node. It configures nothing the run has, so it is skipped, and said.
    """
    if not isinstance(node, DictConfig) or "_target_" in node:
        return True
    knobs = ", ".join(f"{key}.{k}" for k in node)
    print(
        f"grokedge: {knobs} ignored: the callbacks set has no {key} callback to configure",
        file=sys.stderr,
    )
    return False


def fit(run: Run) -> dict[str, Any]:
    """Train; ``summary.json`` (``"status": "ok"``) and the closing lines come from the
    run's :class:`~grokedge.run_files.RunFiles` callback; returns the summary.

    If training raises, ``summary.json`` is written with ``"status": "failed"`` and
    ``"error": "<ExceptionType>: <message>"`` (and what was logged until then), the W&B run
    is finished as failed, and the exception propagates.
    """
    n_params = run.module.n_params
    print(f"grokedge: {run.cfg.task.name} model with {n_params:,} parameters -> {run.run_dir}")
    error: BaseException | None = None
    try:
        run.files.resumed_from = _carry_run_files(run)
        for logger in run.trainer.loggers:
            logger.log_hyperparams(
                {"config": OmegaConf.to_container(run.cfg, resolve=True), "n_params": n_params}
            )
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.cfg.resume)
    except BaseException as e:  # KeyboardInterrupt/SystemExit too: the summary says so
        error = e
        raise
    finally:
        _finish_wandb(exit_code=0 if error is None else 1)
        # The callback wrote it at the end of the fit (teardown, on_exception); an error
        # raised outside Lightning's hooks (a resume's files) is recorded here.
        summary = run.files.finish(run.trainer, run.module, error)
    return summary


def _carry_run_files(run: Run) -> list[dict[str, Any]] | None:
    """A resumed run (``resume=``): start its ``metrics.jsonl`` and ``analyses.jsonl`` with
    the checkpoint's run's rows up to the checkpoint, before anything is logged, so that
    its directory holds the whole run (``resume.carry_run_files``); returns
    ``summary.json``'s ``resumed_from`` (None: not resumed). Rank zero writes the files."""
    from grokedge.resume import RunIdentity, carry_run_files
    from grokedge.run_files import METRICS_FILE

    if run.cfg.get("resume") is None:
        return None
    resumed = carry_run_files(run.cfg.resume, run.run_dir, write=run.trainer.is_global_zero)
    if resumed.lines.get(METRICS_FILE):
        run.files.history.carry(resumed.metrics, resumed.step)
    for callback in run.trainer.callbacks:  # the next checkpoints carry the chain on
        if isinstance(callback, RunIdentity):
            callback.resumed_from = resumed.resumed_from
    return resumed.resumed_from


def _finish_wandb(exit_code: int = 0) -> None:
    # Sequential multirun jobs would share one W&B run without this; a non-zero exit code
    # marks the W&B run as failed.
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def discard_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote at job start."""
    if not run_dir.is_dir():
        return
    leftovers = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)


def compose(overrides: list[str], run_dir: str | Path) -> DictConfig:
    """The config ``python -m grokedge.train`` would run with, for use in-process.

    Sets up Hydra's global state as a job would (so ``${hydra:runtime.output_dir}``
    resolves to ``run_dir``); for notebooks, scripts and tests.

    Example:
        >>> cfg = compose(["task=dyck", "trainer.max_steps=100"], "outputs/try")
        >>> summary = fit(build(cfg, Path("outputs/try")))  # doctest: +SKIP
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="grokedge.conf", version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(run_dir).resolve())
        cfg.hydra.job.override_dirname = ",".join(overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a job: the app's config without Hydra's own node
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return cfg


def _failed_job_summary(cfg: DictConfig, run_dir: Path, exc: BaseException) -> None:
    """``summary.json`` of a sweep job refused before training (nothing else is written)."""
    from grokedge.run_files import STATUS_FAILED, error_text, write_summary

    write_summary(
        run_dir,
        {
            "task": OmegaConf.select(cfg, "task.name", default=None),
            "status": STATUS_FAILED,
            "error": error_text(exc),
            "grok_step": None,
            "steps": 0,
        },
    )


@hydra.main(version_base="1.3", config_path="pkg://grokedge.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One run, or one job of a sweep (``-m``).

    A single run refused by a :class:`ConfigError` exits with status 2 and leaves no run
    directory; one that fails while training writes a failed ``summary.json`` and
    re-raises (exit status 1). A sweep job's exception is recorded in the job's
    ``summary.json`` (``"status": "failed"``, ``"error"``) and the sweep goes on; the
    sweep exits with status 1 after its last job (``run_files.SweepStatus``).
    """
    from grokedge.run_files import CONFIG_ERROR_EXIT, error_text

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run = build(cfg, run_dir)
    except ConfigError as e:
        print(f"grokedge: configuration error: {e}", file=sys.stderr)
        if multirun:
            _failed_job_summary(cfg, run_dir, e)
            return None
        discard_run_dir(run_dir)
        sys.exit(CONFIG_ERROR_EXIT)
    try:
        summary = fit(run)
    except Exception as e:
        if not multirun:
            raise
        # fit wrote the failed summary and finished W&B; the next job goes on.
        traceback.print_exc()
        print(f"grokedge: sweep job {run_dir} failed: {error_text(e)}", file=sys.stderr)
        return None
    value = summary.get(cfg.task.grok.metric)
    return None if value is None else float(value)


# Hydra's options that print and exit without running the task function.
PRINT_ONLY_OPTIONS = frozenset(
    {"-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info"}
    | {"-sc", "--shell-completion"}
)


def _import_for_a_run() -> None:
    """Import what every run needs, with the garbage collector paused, then freeze it.

    Importing torch and Lightning creates some 400,000 objects that nearly all live until the
    process ends: the collections they trigger free nothing and cost ~20 % of the import
    time (0.8 s of 4 s on 2 cores, measured). Frozen, they are also left out of every
    later collection. Only module-level objects exist at this point, so nothing of a run
    or a sweep job is frozen. Importing Lightning before Hydra configures logging also
    keeps Lightning's own stderr handlers (see ``_lightning_logs_on_stderr``).
    """
    gc.disable()
    try:
        import lightning  # noqa: F401
        import torchmetrics  # noqa: F401

        import grokedge.module  # noqa: F401
        import grokedge.resume  # noqa: F401
        import grokedge.run_files  # noqa: F401
        import grokedge.wandb_setup  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


if __name__ == "__main__":
    if not any(arg.split("=", 1)[0] in PRINT_ONLY_OPTIONS for arg in sys.argv[1:]):
        _import_for_a_run()  # --help and --cfg job import none of it
    try:
        main()
    finally:
        # At exit the collector would traverse every object of torch, Lightning and the run
        # (~1 s on 2 cores); frozen, they are still freed, without that traversal. Only
        # here, at the very end of the process: in a sweep, a freeze after each job would
        # keep the job's cyclic garbage alive.
        gc.freeze()
