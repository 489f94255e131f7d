"""The run directory of any Trainer (``metrics.jsonl``, a fresh ``analyses.jsonl``,
``summary.json``, the closing lines): :class:`grokedge.run_files.RunFiles`, the one writer
the CLI uses too, exported here with the other callbacks."""

from grokedge.run_files import RunFiles

__all__ = ["RunFiles"]
