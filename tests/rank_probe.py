"""`agd train` that also saves what this process holds after every epoch, for the tests.

    python tests/rank_probe.py DUMP_DIR [agd train flags]    # under torchrun: once per rank

Ranks other than 0 write nothing of a run, and rank 0's checkpoint alone cannot show that rank 1
holds the same weights. So tests/test_distributed.py runs the trainer through this script: rank r
saves DUMP_DIR/rank{r}-epoch0.pt with the weights training starts from, and after each epoch e
DUMP_DIR/rank{r}-epoch{e}.pt = {"model": state_dict, "test": [loss sum, correct, count] of this
rank's share of epoch e's evaluation}. It wraps the trainer's own train_epoch and evaluate from
outside (install), so the trainer carries no test hook; a test in this process calls install
with monkeypatch.setattr instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from torch_agd.train import run as run_module
from torch_agd.train.dist import launch_position


def install(set_attribute, dump: Path, rank: int) -> None:
    """Wrap torch_agd.train.run's train_epoch and evaluate, through ``set_attribute(module, name,
    value)`` (setattr, or monkeypatch.setattr), so that rank ``rank`` saves to ``dump``. For runs
    that start at epoch 0 (no --resume)."""
    train_epoch, evaluate = run_module.train_epoch, run_module.evaluate
    epochs_done = []

    def save(epoch: int, model, test) -> None:
        network = getattr(model, "module", model)  # DistributedDataParallel holds it in .module
        dump.mkdir(parents=True, exist_ok=True)
        torch.save({"model": network.state_dict(), "test": test}, dump / f"rank{rank}-epoch{epoch}.pt")

    def first_epoch_saves_the_start(model, *args, **kwargs):
        if not epochs_done:
            save(0, model, None)
        return train_epoch(model, *args, **kwargs)

    def evaluate_and_save(model, *args, **kwargs):
        totals = evaluate(model, *args, **kwargs)
        epochs_done.append(1)
        # Read now: the trainer then sums the totals over ranks in place.
        save(len(epochs_done), model, totals.tolist())
        return totals

    set_attribute(run_module, "train_epoch", first_epoch_saves_the_start)
    set_attribute(run_module, "evaluate", evaluate_and_save)


if __name__ == "__main__":
    from torch_agd.cli import main

    install(setattr, Path(sys.argv[1]), launch_position()[0])
    sys.exit(main(["train", *sys.argv[2:]]))
