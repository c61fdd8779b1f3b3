"""checkpoint.pt: everything a run needs to continue bit for bit after its last completed epoch.

It is written atomically (torch_agd.atomic), so a kill at any moment leaves the last good copy,
and holds only tensors, numbers, strings, lists and dicts, so ``torch.load(path,
weights_only=True)`` loads it. Its name, and the other files of a run directory, are in rundir.py.
"""

from __future__ import annotations

import io
import os

import torch

from torch_agd.atomic import atomic_write_bytes


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


def save_checkpoint(path: str | os.PathLike, *, model, optimizer, epoch: int, metrics: list[dict],
                    scheduler=None) -> None:
    """Save after ``epoch`` completed epochs; ``metrics`` is every epoch's row so far;
    ``scheduler``: the run's lr scheduler (--schedule, --warmup), if it has one."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "metrics": metrics,
        "rng": rng_state(),
    }
    if scheduler is not None:  # its step count; the multiplier itself is rebuilt from config.json
        state["scheduler"] = scheduler.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    # Loaded to the CPU: load_state_dict copies into tensors already on the right device.
    return torch.load(path, map_location="cpu", weights_only=True)
