"""Helpers that several test modules share (conftest.py puts this directory on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torch_agd.train import rundir

# Debian's dataset-fashion-mnist: the real data, found in place without a download.
FASHION = Path("/usr/share/datasets/fashion-mnist")
# A --data-dir holding fashion-mnist/: Debian's copy (a named data dir is used alone, never replaced)
DEBIAN_DATA = FASHION.parent
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def metrics_rows(out: str | Path) -> list[dict]:
    """Every line of a run directory's metrics.jsonl, read strictly (a torn line fails)."""
    return [json.loads(line) for line in (Path(out) / rundir.METRICS).read_text().splitlines()]


def bitwise_equal(a, b) -> bool:
    """Bitwise equality of nested checkpoint contents: tensors of the same dtype and values,
    dicts with the same keys, lists and tuples of the same type and length, equal leaves."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(bitwise_equal, a, b))
    return not isinstance(b, torch.Tensor) and a == b
