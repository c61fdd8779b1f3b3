"""Files of a run directory, written so that a kill at any moment leaves the last good copy.

Every write goes to a temporary file in the same directory, is flushed to disk, and then
renamed over the old file (os.replace is atomic on POSIX), so a reader sees the old file or
the new one, never half of one. checkpoint.pt holds only tensors, numbers, strings, lists
and dicts, so ``torch.load(path, weights_only=True)`` loads it.
"""

from __future__ import annotations

import io
import json
import os

import torch

from torch_agd.atomic import atomic_write_bytes

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def rng_state() -> dict:
    """The global generators' states. The data order needs none (it is seeded from (seed, epoch))."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, *, model, optimizer, epoch: int, metrics: list[dict]) -> None:
    """Save after ``epoch`` completed epochs; ``metrics`` is every epoch's row so far."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "metrics": metrics,
        "rng": rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    # Loaded to the CPU: load_state_dict copies into tensors already on the right device.
    return torch.load(path, map_location="cpu", weights_only=True)
