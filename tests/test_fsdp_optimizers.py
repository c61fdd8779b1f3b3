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


def _peer_on_uneven_shards(rank: int, port: int, name: str, out: str) -> None:
    """Rank ``rank`` of 2: one step of peer ``name`` on a Linear of 3 rows (shards of 2 and 1);
    rank 0 writes what happened."""
    import os

    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from torch_agd.train.optimizers import build_peer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    opt = build_peer(name, model.parameters())
    model(torch.randn(2, 4)).square().mean().backward()
    try:
        opt.step()
        what = "stepped"
    except RuntimeError as error:
        what = str(error).splitlines()[0]
    if rank == 0:
        Path(out).write_text(what)
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["prodigy", "dadapt-adam"])
def test_the_peers_refused_for_flattening_still_cannot_step_unequal_shards(name, tmp_path):
    """The reason --fsdp gives for refusing them, measured: when a package's release lifts it,
    this fails, and the refusal should go."""
    import torch.multiprocessing as mp

    pytest.importorskip({"prodigy": "prodigyopt", "dadapt-adam": "dadaptation"}[name],
                        reason='needs pip install "torch-agd[peers]"')
    out = tmp_path / "what.txt"
    mp.start_processes(_peer_on_uneven_shards, args=(_free_port(), name, str(out)), nprocs=2, start_method="spawn")
    assert out.read_text().startswith("Cannot flatten unevenly sharded tensor"), out.read_text()


def test_dogs_state_dict_still_holds_a_flag_among_the_parameters_state():
    """DoG's reason (fsdp.UNSHARDABLE_PEERS): DCP's get_state_dict cannot name this entry."""
    pytest.importorskip("dog", reason='needs pip install "torch-agd[peers]"')
    from torch_agd.train.optimizers import build_peer

    assert "_first_step" in build_peer("dog", [torch.zeros(2, requires_grad=True)]).state_dict()["state"]
