"""`agd train --fsdp` with the optimizers beyond AGD and the baselines: agd+adamw (two optimizers,
one sharded checkpoint) and Schedule-Free AdamW, each on 2 gloo ranks under torchrun against
one process without --fsdp; and a 2-rank --fsdp job killed with SIGKILL after a checkpoint, which
resumes to the uninterrupted job's weights bit for bit. On fake Fashion-MNIST files
(tests/fake_data_train.py), so these run wherever gloo does. Prodigy, D-Adaptation and DoG are
refused under --fsdp (test_fsdp.py checks the lines).
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fake_data_train
from fakedata import install_fake_idx, write_mnist_idx
from helpers import bitwise_equal, metrics_rows
from test_distributed import REPO, _alive, _env, _finish, _free_port, _kill_job, _wait_for
from test_fsdp import _clean_launch, _consolidated, _untimed
from torch_agd.cli import main
from torch_agd.train import fsdp, rundir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
    pytest.mark.skipif(sys.platform != "linux", reason="finds torchrun's workers through /proc"),
    pytest.mark.usefixtures("one_thread"),
]

N_TRAIN, N_TEST = 256, 64
FLAGS = ["--cpu", "--arch", "fcn", "--dataset", "fashion-mnist", "--depth", "3", "--width", "16",
         "--train_bs", "64", "--test_bs", "32"]


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> tuple[Path, Path]:
    """The fake files and the JSON of their MD5s, for the processes torchrun starts."""
    data = tmp_path_factory.mktemp("data")
    written = write_mnist_idx(data / "fashion-mnist", N_TRAIN, N_TEST)
    md5 = data / "md5.json"
    md5.write_text(json.dumps(written.md5))
    return data, md5


def _torchrun(fake, *args, **env) -> subprocess.Popen:
    data, md5 = fake
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", fake_data_train.__file__, str(md5), *args, "--data_dir", str(data)]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.mark.parametrize("optimizer", ["agd+adamw", "schedulefree"])
def test_fsdp_trains_as_one_process(optimizer, fake, tmp_path, monkeypatch):
    if optimizer == "schedulefree":
        pytest.importorskip("schedulefree", reason='needs pip install "torch-agd[peers]"')
    flags = [*FLAGS, "--epochs", "2", "--optimizer", optimizer]
    proc = _torchrun(fake, *flags, "--fsdp", "--out", str(tmp_path / "two"))
    _clean_launch(monkeypatch)
    install_fake_idx(monkeypatch, tmp_path / "data", "fashion-mnist", n_train=N_TRAIN, n_test=N_TEST)
    assert main(["train", *flags, "--out", str(tmp_path / "one"), "--data_dir", str(tmp_path / "data")]) == 0
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    sharded = _consolidated(tmp_path / "two" / rundir.CHECKPOINT_DIR, tmp_path)["model"]
    alone = torch.load(tmp_path / "one" / rundir.CHECKPOINT, weights_only=True)["model"]
    assert alone and sharded.keys() == alone.keys()
    for name, weight in alone.items():
        assert (sharded[name] - weight).norm() <= 1e-5 * weight.norm(), name
    for r2, r1 in zip(metrics_rows(tmp_path / "two"), metrics_rows(tmp_path / "one"), strict=True):
        assert abs(r2["train_loss"] - r1["train_loss"]) <= 1e-5 * abs(r1["train_loss"]), r2["epoch"]


@pytest.mark.parametrize("optimizer", ["agd", "agd+adamw"])
def test_an_fsdp_job_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights_bitwise(optimizer, fake, tmp_path):
    """SIGKILL to torchrun and both ranks once the first checkpoint is in place (each later epoch
    waits 2 s first, so the job is still running), then --resume on 2 ranks: the same shards on
    the same ranks, and the same collectives in the same order, so the same bits."""
    epochs = 3
    flags = [*FLAGS, "--epochs", str(epochs), "--optimizer", optimizer, "--fsdp"]
    whole = _torchrun(fake, *flags, "--out", str(tmp_path / "whole"))
    doomed = _torchrun(fake, *flags, "--out", str(tmp_path / "killed"), AGD_TEST_EPOCH_SECONDS="2")
    _wait_for(tmp_path / "killed" / rundir.CHECKPOINT_DIR, [doomed])
    workers = _kill_job(doomed)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(workers) == [0, 1] and not any(_alive(pid) for pid in workers.values())
    epoch = torch.load(fsdp.checkpoint_path(tmp_path / "killed", sharded=True) / fsdp.TRAIN_STATE,
                       weights_only=True)["epoch"]
    assert epoch < epochs and not (tmp_path / "killed" / rundir.SUMMARY).exists()

    resumed = _torchrun(fake, "--out", str(tmp_path / "killed"), "--resume")
    for proc in (whole, resumed):
        stdout, stderr = _finish(proc)
        assert proc.returncode == 0, stderr[-3000:]
    assert f"resuming at epoch {epoch + 1}" in stdout
    a = _consolidated(tmp_path / "killed" / rundir.CHECKPOINT_DIR, tmp_path)
    b = _consolidated(tmp_path / "whole" / rundir.CHECKPOINT_DIR, tmp_path)
    assert bitwise_equal(a["model"], b["model"])
    assert bitwise_equal(a["optimizer"]["state"], b["optimizer"]["state"])
    assert _untimed(metrics_rows(tmp_path / "killed")) == _untimed(metrics_rows(tmp_path / "whole"))
