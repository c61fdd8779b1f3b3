"""`agd train` on fake Fashion-MNIST files, for tests that launch it under torchrun.

    python tests/fake_data_train.py MD5_JSON [agd train flags]    # once per rank

A test writes the fake IDX files (fakedata.write_mnist_idx) and their MD5s to MD5_JSON; each
process here then makes load_data accept exactly those files (as fakedata.install_fake_idx does
inside one process) and runs the trainer. AGD_TEST_EPOCH_SECONDS=S sleeps S seconds before every
epoch after the first, so that a test can kill the job between its checkpoints: the sleep changes
no number. The trainer carries no test hook; this script wraps it from outside.
"""

from __future__ import annotations

import json
import os
import sys
import time

from torch_agd.data import mnist
from torch_agd.train import run as run_module


def accept_fake_files(md5_json: str, name: str = "fashion-mnist") -> None:
    with open(md5_json) as f:
        mnist.MD5[name] = json.load(f)
    mnist.RAW_MD5[name] = {}
    mnist.SYSTEM_DIRS[name] = []
    mnist.MIRRORS[name] = ["http://127.0.0.1:9/unreachable/"]


def slow_epochs(seconds: float) -> None:
    train_epoch, started = run_module.train_epoch, []

    def sleep_then_train(*args, **kwargs):
        if started:
            time.sleep(seconds)
        started.append(1)
        return train_epoch(*args, **kwargs)

    run_module.train_epoch = sleep_then_train


if __name__ == "__main__":
    from torch_agd.cli import main

    accept_fake_files(sys.argv[1])
    if os.environ.get("AGD_TEST_EPOCH_SECONDS"):
        slow_epochs(float(os.environ["AGD_TEST_EPOCH_SECONDS"]))
    sys.exit(main(["train", *sys.argv[2:]]))
