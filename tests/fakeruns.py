"""Run directories as `agd train` leaves them, written without training: for the experiments'
tests (sweeps, figures, the results page)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch_agd.train.config import add_arguments, resolve_config


def flags(argv):
    """`--key value` pairs and bare `--flag`s of an `agd train` command line, as config.json."""
    config, i = {}, 0
    while i < len(argv):
        key = argv[i].lstrip("-").replace("-", "_")
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
            config[key], i = value, i + 2
        else:
            config[key], i = True, i + 1
    return config


def trainer_config(argv, agd_L: int | None = None) -> dict:
    """config.json as the trainer writes it for `agd train ARGV`: every flag, defaults resolved
    (a run with --steps keeps the default epochs, agd_depth auto or weights), and ``agd_L``, the
    depth AGD used, which the trainer records for AGD (given here: nothing is built)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config, _ = resolve_config(parser.parse_args(list(argv)))
    extra = {} if agd_L is None else {"agd_L": agd_L}
    return {**config.flag_values(), **extra, "version": "0.1.0", "git_commit": "0123abc"}


def write_run(run_dir: Path, config: dict, epochs: int, acc: float, *, finished=True, eta=True):
    """A run directory as `agd train` leaves it: config, metrics per epoch, summary last."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    rows = []
    for epoch in range(1, epochs + 1):
        frac = epoch / epochs
        rows.append({
            "epoch": epoch, "train_loss": 1.0 / (1 + epoch) + (1 - acc), "train_acc": acc * frac,
            "test_loss": 1.2 / (1 + epoch) + (1 - acc), "test_acc": acc * frac,
            "eta_mean": 0.3 / epoch if eta else None, "eta_min": 0.2 / epoch if eta else None,
            "eta_max": 0.4 / epoch if eta else None, "skipped_steps": 0,
            "epoch_seconds": 0.5, "train_samples_per_second": 1000.0,
        })
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "checkpoint.pt").write_bytes(b"fake")
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"test_acc": rows[-1]["test_acc"]}))


def diverge(run_dir: Path) -> None:
    """Make a written run diverged: no finite test accuracy, test loss or train loss."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [{**json.loads(line), "test_acc": None, "test_loss": None, "train_loss": None}
            for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
