"""The files of a run directory, by name, and the one way they are written and read.

A run directory is what ``agd train --out DIR`` leaves (docs/architecture.md): config.json,
metrics.jsonl (one JSON object per epoch), checkpoint.pt (a directory, checkpoint/, under --fsdp)
and, once every epoch finished, summary.json. The trainer writes them, sweeps and the results page read them; all take the
names and the JSON format from here. Every write is atomic (torch_agd.atomic), so a reader, or
a run killed at any moment, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch_agd.atomic import atomic_write_bytes
from torch_agd.errors import UsageError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_DIR = "checkpoint"  # --fsdp: a torch.distributed.checkpoint directory (train/fsdp.py)
SUMMARY = "summary.json"


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def read_json(path: str | os.PathLike) -> dict:
    """The object in ``path``; {} if it is missing or not JSON (a run that never got that far)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """One object per line. A last line that is not JSON is dropped: a run killed mid-write (files
    written before every write was atomic) can end in a torn line, and the lines before it are
    still good. Any other line that is not JSON is damage, not a torn end: a UsageError."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise UsageError(f"{path}: line {number} of {len(lines)} is not JSON, and only a torn last line "
                             f"may be; `agd train --out {Path(path).parent} --resume` rewrites the file from "
                             f"the run's checkpoint") from None
    return rows
