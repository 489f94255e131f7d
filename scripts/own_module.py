"""grokedge's analyses on a LightningModule grokedge did not write.

    python scripts/own_module.py OUT_DIR [--steps 60] [--seed 0] [--threads 1]

The model is Lightning's demo ``Transformer`` (``lightning.pytorch.demos``: an
``nn.Transformer`` encoder-decoder with ``nn.MultiheadAttention``, returning
log-probabilities flattened to [B·T, V]) inside a small LightningModule written the way
Lightning's docs write one. It learns to sort synthetic token sequences generated here
(no network), trained with AdamW; OUT_DIR is a run directory as the CLI writes one
(``grokedge.callbacks.RunFiles``): ``metrics.jsonl`` (every logged scalar),
``analyses.jsonl`` (the analyses' rows) and ``summary.json``, so that
``python -m grokedge.report OUT_DIR`` reads it.

The one grokedge line is ``FunctionalAdapter.attach(...)``: it builds, from the module's
own ``forward`` and its loss (``F.nll_loss``), the functional ``evaluate(params, batch)``
and the hidden-state ``trace(params, batch)`` of the ``grokedge.functional`` protocol. The
data module is plain Lightning: dict batches with the forward's inputs and ``labels``
(-100 where nothing is scored), plus ``probe_targets(batch)`` for the probes.

``callbacks=full``'s analyses that run on it: the spectral edge (``GramCallback``,
``EdgeAlignmentCallback``: any module trained with AdamW), the ablation, the ε-sweeps and
curvature (finite difference and exact HVP: the adapter runs attention through PyTorch's
math kernel, which has the forward-mode AD the HVP needs), the probes, the gap flow and
the universality class. What does not carry over:

- grok detection is ``GrokModule``'s: this module has no ``grok_step``, so nothing runs
  "at the grok step", every row's phase is ``pre`` and the class's "late" windows are the
  last ones;
- the weight-decay interventions' attention entropy (``wd/attn_entropy``) needs attention
  weights, which the adapter does not capture (the other read-outs work; the
  interventions are off here, as in ``callbacks=full``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import Transformer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from grokedge.adapters import FunctionalAdapter
from grokedge.callbacks import (
    AblationCallback,
    ClassCallback,
    EdgeAlignmentCallback,
    GapFlowCallback,
    GramCallback,
    PerturbationCallback,
    ProbeCallback,
    RunFiles,
)

VOCAB = 12  # token 0 starts the decoder (BOS); 1..11 are the values sorted
LENGTH = 8
BOS = 0


# ------------------------------------------------------------------ the user's own code


class SortingTransformer(L.LightningModule):
    """Lightning's demo Transformer, trained to sort its input (teacher forcing)."""

    def __init__(self, lr: float = 3e-3, weight_decay: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Transformer(
            vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=2, dropout=0.0
        )

    def forward(self, inputs: Tensor, decoder_inputs: Tensor) -> Tensor:
        return self.model(inputs, decoder_inputs)  # log-probabilities [B·T, VOCAB]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output = self(batch["input"], batch["decoder_input"])
        loss = F.nll_loss(output, batch["labels"].view(-1))
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        output = self(batch["input"], batch["decoder_input"])
        acc = (output.argmax(-1) == batch["labels"].view(-1)).float().mean()
        name = SortingData.eval_names[dataloader_idx]
        self.log(f"{name}/acc", acc, add_dataloader_idx=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )


class Sequences(Dataset):
    """Random sequences of tokens 1..VOCAB-1 and their sorted copy, as dict samples."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input = torch.randint(1, VOCAB, (n, LENGTH), generator=generator)
        self.labels = self.input.sort(dim=1).values
        start = torch.full((n, 1), BOS)
        self.decoder_input = torch.cat([start, self.labels[:, :-1]], dim=1)

    def __len__(self) -> int:
        return len(self.input)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input": self.input[i],
            "decoder_input": self.decoder_input[i],
            "labels": self.labels[i],
        }


class SortingData(L.LightningDataModule):
    """Train and test sequences; ``probe_targets`` names the task variables to probe."""

    eval_names = ("test", "train")  # val_dataloader() order; the gap flow reads "train"

    def __init__(self, seed: int = 0, batch_size: int = 32) -> None:
        super().__init__()
        self.train_set = Sequences(512, seed)
        self.test_set = Sequences(256, seed + 1)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(s, batch_size=128) for s in (self.test_set, self.train_set)]

    def probe_targets(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """[B, T] per task variable: the value to emit next, and how many are left."""
        left = torch.arange(LENGTH, 0, -1, device=batch["labels"].device)
        return {
            "next_value": batch["labels"].float(),
            "left": left.expand_as(batch["labels"]).float(),
        }


# ------------------------------------------------------------------ grokedge's analyses


def analyses(steps: int) -> list[L.Callback]:
    """``callbacks=full``'s set at the cadences of a run of ``steps`` optimizer steps."""
    every = max(10, steps // 3 // 5 * 5)  # a multiple of the Gram interval
    subset = {"n_sequences": 64, "every": every, "at_end": True}
    return [
        GramCallback(interval=5, window=5, top_k=4),  # first: the analyses read its edge
        EdgeAlignmentCallback(),
        AblationCallback(n_random=4, **subset),
        PerturbationCallback(grid_points=7, **subset),
        ProbeCallback(folds=3, mlp_max_iter=50, **subset),
        GapFlowCallback(every=every, n_sequences=128),
        ClassCallback(folds=3, n_sequences=64),
    ]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory for the run files")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest for so small a model)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    args.out.mkdir(parents=True, exist_ok=True)
    module = SortingTransformer()
    FunctionalAdapter.attach(
        module,
        F.nll_loss,  # the module's own loss: its forward returns log-probabilities
        inputs=("input", "decoder_input"),  # forward's arguments, as batch keys
        hidden="model.transformer.decoder.layers",  # the blocks whose outputs are probed
    )
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,  # RunFiles writes metrics.jsonl whatever the logger
        # RunFiles first: the run directory of the CLI (metrics.jsonl, a fresh
        # analyses.jsonl, summary.json, the closing lines) for this plain Trainer.
        callbacks=[RunFiles(args.out), *analyses(args.steps)],
        val_check_interval=20,
        check_val_every_n_epoch=None,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=SortingData(args.seed))
    return args.out


if __name__ == "__main__":
    print(main(sys.argv[1:]))
