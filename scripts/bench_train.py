"""Training-speed benchmarks of grokedge on Dyck (issue: foundation, items 8 and 10).

In one script run, side by side:

A. Lightning overhead: steps/s of grokedge's real Lightning run (``GrokModule`` +
   ``Trainer``, evaluation every 100 steps) against a plain PyTorch loop over the same
   model, data, optimizer and evaluation. Runs alternate; medians are reported.
B. Time to grok, seed 42, ω = 1: the paper's protocol as its code runs it (its
   ``nn.TransformerEncoder`` model, 50 rows a step, every 100 steps an evaluation of all
   5,000 test rows and the 50 training rows) against grokedge's run
   (``python -m grokedge.train task=dyck seed=42``, stopping at the grok step). Also checks
   that grokedge's deduplicated evaluation gives the row-by-row accuracy exactly.

    .venv/bin/python scripts/bench_train.py            # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from grokedge.batch import IGNORE_INDEX
from grokedge.models import CausalTransformer
from grokedge.module import token_stats
from grokedge.tasks.dyck import PAD, VOCAB_SIZE, DyckDataModule, depths
from grokedge.train import build, compose, fit

EVAL_EVERY = 100
GROK_ACC = 0.95


# -- A. Lightning against a plain loop --------------------------------------------------
def lightning_run(steps: int, workdir: Path) -> float:
    """Seconds of ``Trainer.fit`` for ``steps`` steps of grokedge's default Dyck run."""
    run_dir = workdir / f"lightning-{time.monotonic_ns()}"
    cfg = compose(
        [
            "task=dyck",
            "callbacks=none",
            f"trainer.max_steps={steps}",
            "logger=none",
            "progress_bar.refresh_rate=0",
            "task.datamodule.ood_sequences=0",
        ],
        run_dir,
    )
    return float(fit(build(cfg, run_dir))["wall_s"])


def plain_run(steps: int) -> float:
    """The same work as ``lightning_run`` in a hand-written loop."""
    torch.manual_seed(42)
    dm = DyckDataModule(ood_sequences=0, seed=42)
    dm.setup()
    net = CausalTransformer(**dm.model_dims())
    dm.init_model_(net, 42)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)
    eval_sets = [list(loader) for loader in dm.val_dataloader()]
    start = time.perf_counter()
    for step in range(steps):
        stats = token_stats(*_forward(net, dm.sample_train_batch(step)))
        opt.zero_grad(set_to_none=True)
        stats.mean_loss().backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if (step + 1) % EVAL_EVERY == 0:
            net.eval()
            with torch.no_grad():
                for batches in eval_sets:
                    accuracy_of(net, batches)
            net.train()
    return time.perf_counter() - start


def _forward(net: nn.Module, batch: dict) -> tuple:
    return net(batch["tokens"]), batch["labels"], batch["weight"]


def accuracy_of(net: nn.Module, batches: list[dict]) -> float:
    correct = total = 0.0
    for b in batches:
        s = token_stats(*_forward(net, b))
        correct += float((s.correct * s.token_weight).sum())
        total += float(s.token_weight.sum())
    return correct / total


# -- B. the paper's protocol ------------------------------------------------------------
class PaperDyckModel(nn.Module):
    """The paper code's model: torch's fused TransformerEncoder (docs/theory.md §2)."""

    def __init__(self, n_classes: int = 13, max_len: int = 48) -> None:
        super().__init__()
        d = 128
        self.tok = nn.Embedding(VOCAB_SIZE, d)
        self.pos = nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(
            d, 4, 256, 0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t))[None]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.head(self.ln(self.encoder(h, mask=mask, is_causal=True)))


def rows(seqs: list[tuple[int, ...]], width: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.full((len(seqs), width), PAD)
    y = torch.full((len(seqs), width), IGNORE_INDEX)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
        y[i, : len(s)] = torch.tensor(depths(s))
    return x, y


def paper_eval(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for i in range(0, len(x), 512):
            logits = net(x[i : i + 512])
            valid = y[i : i + 512] != IGNORE_INDEX
            correct += int(((logits.argmax(-1) == y[i : i + 512]) & valid).sum())
            total += int(valid.sum())
    net.train()
    return correct / total


def paper_time_to_grok(seed: int, max_steps: int) -> tuple[int | None, float]:
    dm = DyckDataModule(ood_sequences=0)
    dm.setup()
    train_x, train_y = rows(dm.train_sequences)
    test_x, test_y = rows(dm.test_sequences)
    torch.manual_seed(seed)
    net = PaperDyckModel()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)
    start = time.perf_counter()
    for step in range(1, max_steps + 1):
        idx = torch.randint(0, len(train_x), (50,))
        logits, y = net(train_x[idx]), train_y[idx]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % EVAL_EVERY == 0 or step == 1:
            paper_eval(net, train_x, train_y)
            if paper_eval(net, test_x, test_y) >= GROK_ACC:
                return step, time.perf_counter() - start
    return None, time.perf_counter() - start


def grokedge_time_to_grok(seed: int, max_steps: int, workdir: Path) -> dict:
    run_dir = workdir / "grok"
    cfg = compose(
        [
            "task=dyck",
            "callbacks=none",
            f"seed={seed}",
            f"trainer.max_steps={max_steps}",
            "task.stop_after_grok=0",
            "logger=none",
            "progress_bar.refresh_rate=0",
        ],
        run_dir,
    )
    return fit(build(cfg, run_dir))


def identical_accuracy_check() -> tuple[float, float]:
    torch.manual_seed(0)
    dedup, plain = (
        DyckDataModule(ood_sequences=0),
        DyckDataModule(ood_sequences=0, deduplicate=False),
    )
    dedup.setup()
    plain.setup()
    net = CausalTransformer(**dedup.model_dims()).eval()
    with torch.no_grad():
        return (
            accuracy_of(net, list(dedup.val_dataloader()[0])),
            accuracy_of(net, list(plain.val_dataloader()[0])),
        )


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (all runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["GROKEDGE_TORCH_THREADS"] = str(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lightning_run(20, work)  # warm-up: imports, allocator, first-call costs
        plain_s, lightning_s = [], []
        for _ in range(args.repeats):
            plain_s.append(plain_run(args.steps))
            lightning_s.append(lightning_run(args.steps, work))
        p, lt = statistics.median(plain_s), statistics.median(lightning_s)
        print("\n## A. Lightning against a plain loop (Dyck, eval every 100 steps)")
        print(f"| run | steps/s (median of {args.repeats}) | runs (s) |")
        print("|---|---|---|")
        print(f"| plain PyTorch loop | {args.steps / p:.1f} | {_seconds(plain_s)} |")
        print(f"| grokedge (Lightning) | {args.steps / lt:.1f} | {_seconds(lightning_s)} |")
        print(f"| **ratio Lightning / plain (time)** | **{lt / p:.3f}** | goal <= 1.15 |")

        a, b = identical_accuracy_check()
        paper_step, paper_s = paper_time_to_grok(args.seed, 5000)
        ours = grokedge_time_to_grok(args.seed, 5000, work)
        print(f"\n## B. Time to grok, Dyck seed {args.seed}, weight decay 1")
        print("| run | grok step | wall to grok (s) | s / step |")
        print("|---|---|---|---|")
        print(
            f"| paper's protocol and model | {paper_step} | {paper_s:.2f} | "
            f"{paper_s / (paper_step or 5000) * 1000:.1f} ms |"
        )
        print(
            f"| grokedge | {ours['grok_step']} | {ours['wall_s']:.2f} | "
            f"{ours['wall_s'] / max(ours['steps'], 1) * 1000:.1f} ms |"
        )
        print(
            f"| **ratio grokedge / paper (wall to grok)** | | **{ours['wall_s'] / paper_s:.3f}** "
            f"| goal <= 0.7 |"
        )
        print(
            f"\ndeduplicated test accuracy {a!r} vs row-by-row {b!r}: "
            f"{'identical' if a == b else 'DIFFERENT'}"
        )


if __name__ == "__main__":
    main()
