"""Read a W&B offline run's records back from its ``.wandb`` file, without a server.

wandb 0.31 no longer ships a Python reader of its transaction log (the writer lives in
its Go core), so this is a small one. The file is a LevelDB-style log: a 7-byte header
(``:W&B``, magic ``0xBEE1`` little-endian, version 0), then 32 KiB blocks of chunks, each
with a 7-byte header (CRC32C ``uint32``, length ``uint16``, type ``uint8``: 1 full,
2 first, 3 middle, 4 last); a block tail shorter than a chunk header is zero padding.
Every reassembled chunk is one ``wandb.proto.wandb_internal_pb2.Record``.

The report uses it to find a run's project, group and name (to log its figures in the
same group); the tests use it to check what a run declared and logged.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = b":W&B"
BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_raw_records(path: str | Path) -> Iterator[bytes]:
    """The serialized records of a ``.wandb`` file, in order (a torn tail is ignored)."""
    data = Path(path).read_bytes()
    if data[:4] != HEADER:
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:7]!r})")
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # zero padding at the end of a block
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        pos += CHUNK_HEADER
        if kind == 0 and length == 0:  # preallocated, never written
            break
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def iter_records(path: str | Path) -> Iterator[Any]:
    """The records of a ``.wandb`` file as ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in iter_raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        yield record


@dataclass
class OfflineRun:
    """What the report needs to know about an offline run."""

    dir: Path
    run_id: str
    project: str
    group: str
    name: str
    job_type: str


def run_file(run_dir: Path) -> Path | None:
    """The ``run-<id>.wandb`` file of an ``offline-run-*`` directory (None if absent)."""
    files = sorted(run_dir.glob("run-*.wandb"))
    return files[0] if files else None


def read_offline_run(run_dir: Path) -> OfflineRun | None:
    """The run record (id, project, group, name) of an ``offline-run-*`` directory."""
    path = run_file(run_dir)
    if path is None:
        return None
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return OfflineRun(
                run_dir, run.run_id, run.project, run.run_group, run.display_name, run.job_type
            )
    return None


def summary_of(path: str | Path) -> dict[str, Any]:
    """The run's final summary: every summary update folded in order (top-level keys)."""
    out: dict[str, Any] = {}
    for record in iter_records(path):
        if record.WhichOneof("record_type") != "summary":
            continue
        for item in record.summary.update:
            key = item.key or (item.nested_key[0] if len(item.nested_key) == 1 else None)
            if key is not None:
                out[key] = json.loads(item.value_json)
    return out


def history_of(path: str | Path) -> list[dict[str, Any]]:
    """The run's history rows (top-level keys; media entries keep their nested dicts)."""
    rows = []
    for record in iter_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            node = row
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows
