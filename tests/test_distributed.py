"""`agd train` on several processes: the same run as one process, bit for bit across ranks.

Real processes on the CPU with gloo, on real Fashion-MNIST, launched the ways users launch them:
torchrun (`python -m torch.distributed.run`), and by hand with the OpenMPI variables that the
published cluster scripts relied on. Failures are real too: SIGKILL for a dead rank or job,
SIGSTOP for a hung rank, with AGD_DIST_TIMEOUT shortening the process-group timeout.

Ranks other than 0 write nothing, so the runs compared rank by rank go through
tests/rank_probe.py, which wraps the trainer from outside: rank r saves DIR/rank{r}-epoch{e}.pt
({"model": state_dict, "test": this rank's [loss sum, correct, count] of that epoch's
evaluation}) after every epoch e, and DIR/rank{r}-epoch0.pt with the weights training starts from.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import rank_probe
from helpers import DEBIAN_DATA, bitwise_equal, metrics_rows, needs_fashion
from torch_agd.cli import main
from torch_agd.train import rundir
from torch_agd.train.config import TIMING_KEYS

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "AGD_DIST_TIMEOUT")

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(sys.platform != "linux", reason="finds torchrun's workers through /proc"),
    # In-process runs get one thread, like each torchrun worker (OMP_NUM_THREADS=1).
    pytest.mark.usefixtures("one_thread"),
]


def end_to_end(test):
    """Real processes training on real data: seconds each."""
    return pytest.mark.slow(needs_fashion(test))


EPOCHS = 2
# A tiny FCN on the whole of Fashion-MNIST: 29 steps of 2048 per epoch (a 1,408-sample tail
# dropped), evaluated in global batches of 768 that leave a partial batch on each rank.
FLAGS = ["--cpu", "--arch", "fcn", "--dataset", "fashion-mnist", "--depth", "3", "--width", "32",
         "--train_bs", "2048", "--test_bs", "768", "--epochs", str(EPOCHS)]
STEPS_PER_EPOCH = 60_000 // 2048
N_TEST = 10_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _torchrun(*args, data_dir, probe: Path | None = None, **extra_env) -> subprocess.Popen:
    """`torchrun --nproc_per_node=2 -m torch_agd train ARGS`, in its own process group; with
    ``probe``, through tests/rank_probe.py, which saves what each rank holds under ``probe``."""
    entry = ["-m", "torch_agd", "train"] if probe is None else [rank_probe.__file__, str(probe)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *entry, *args, "--data_dir", str(data_dir)]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _kill_job(proc: subprocess.Popen) -> dict[int, int]:
    """SIGKILL torchrun and its workers, which it starts in sessions of their own (so killing
    torchrun's process group alone would leave them running); returns the workers' pids."""
    workers = _rank_pids(proc.pid) if proc.poll() is None else {}
    for pid in [proc.pid, *workers.values()]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
    return workers


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_job(proc)
        pytest.fail(f"torchrun still running after {timeout} s")


def _wait_for(path: Path, procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                _kill_job(p)
            pytest.fail(f"{path} never appeared")
        time.sleep(0.005)


def _rank_pids(launcher: int) -> dict[int, int]:
    """torchrun's worker processes, by the RANK in their environment."""
    pids = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().decode()
            except FileNotFoundError:  # exited meanwhile
                continue
            env = dict(kv.split("=", 1) for kv in environ.split("\0") if "=" in kv)
            if "RANK" in env:
                pids[int(env["RANK"])] = int(child)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent to read its status.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _dump(dump: Path, rank: int, epoch: int) -> dict:
    return torch.load(dump / f"rank{rank}-epoch{epoch}.pt", weights_only=True)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _no_agd_traceback(stderr: str) -> None:
    # torchrun prints a traceback of its own when a worker fails; none may come from a worker.
    frames = [line for line in stderr.splitlines() if "torch_agd" in line and line.lstrip().startswith("File ")]
    assert not frames and "[rank" not in stderr, stderr[-3000:]


# ------------------------------------------------------------------ bad launches


def test_collective_failures_are_told_apart_from_bugs(monkeypatch):
    from torch_agd.train.dist import collective_failure

    monkeypatch.setenv("AGD_DIST_TIMEOUT", "7")
    hung = collective_failure(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 7000ms "
                                           "for recv operation to complete"), 0, 4)
    assert hung.startswith("rank 0 of 4: waited AGD_DIST_TIMEOUT=7 s for another process") and "\n" not in hung
    died = collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:1234: "
                                           "Connection reset by peer.\nmore"), 3, 4)
    assert died.startswith("rank 3 of 4: lost contact with another process") and "\n" not in died
    assert collective_failure(dist.DistBackendError("NCCL error"), 1, 2).startswith("rank 1 of 2: ")
    assert collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 0, 2) is None
    assert collective_failure(ValueError("Timed out waiting"), 0, 2) is None



def test_distribute_outside_a_launcher_is_one_line_error(tmp_path, capsys, monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    assert main(["train", *FLAGS, "--distribute", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agd: error: ") and err.count("\n") == 1, err
    assert "torchrun --nproc_per_node=N -m torch_agd train" in err
    assert not out.exists()


def test_test_bs_not_divisible_fails_before_joining_the_process_group(tmp_path, capsys, monkeypatch):
    # Rank 0 of 2 with no rank 1 anywhere: if the check came after init_process_group, this
    # would wait for rank 1 until the (5 s) timeout and fail with a RuntimeError instead.
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("AGD_DIST_TIMEOUT", "5")
    out = tmp_path / "run"
    assert main(["train", *FLAGS[:-6], "--train_bs", "2048", "--test_bs", "1001", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agd: error: --test_bs 1001") and "multiple of 2" in err and err.count("\n") == 1, err
    assert not out.exists() and not dist.is_initialized()


@pytest.mark.parametrize("value", ["ten", "0", "-3", "nan"])
def test_bad_dist_timeout_is_one_line_error(value, tmp_path, capsys, monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AGD_DIST_TIMEOUT", value)
    assert main(["train", *FLAGS, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agd: error: AGD_DIST_TIMEOUT") and value in err and err.count("\n") == 1, err


@end_to_end
def test_train_bs_not_divisible_under_torchrun_is_one_line_error_at_start(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(*FLAGS[:-6], "--train_bs", "1001", "--test_bs", "768", "--out", str(out),
                     data_dir=DEBIAN_DATA)
    stdout, stderr = _finish(proc, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if "agd: error:" in line]
    # Said once (by rank 0), not once per rank; torchrun then prints its own failure summary.
    assert errors == ["agd: error: --train_bs 1001 does not split evenly over 2 processes; use a multiple of 2"], stderr
    _no_agd_traceback(stderr)
    assert stdout == "" and not out.exists()  # at start: before any data, model or file


# ------------------------------------------------------------------ 2 ranks == 1 process


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """The same run on 2 processes under torchrun and in one process (in this one, meanwhile)."""
    tmp = tmp_path_factory.mktemp("runs")
    two, one = tmp / "two", tmp / "one"
    proc = _torchrun(*FLAGS, "--out", str(two), data_dir=DEBIAN_DATA, probe=tmp / "dump2")
    with pytest.MonkeyPatch.context() as mp:
        for var in LAUNCHER_VARS:
            mp.delenv(var, raising=False)
        rank_probe.install(mp.setattr, tmp / "dump1", rank=0)
        assert main(["train", *FLAGS, "--out", str(one), "--data_dir", str(DEBIAN_DATA)]) == 0
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    return dict(two=two, one=one, dump2=tmp / "dump2", dump1=tmp / "dump1", stdout=stdout, stderr=stderr)


@end_to_end
def test_two_ranks_hold_bitwise_identical_weights_from_start_to_end(runs):
    for epoch in range(EPOCHS + 1):
        assert bitwise_equal(_dump(runs["dump2"], 0, epoch)["model"], _dump(runs["dump2"], 1, epoch)["model"]), epoch
    final = torch.load(runs["two"] / rundir.CHECKPOINT, weights_only=True)
    assert final["epoch"] == EPOCHS
    assert bitwise_equal(final["model"], _dump(runs["dump2"], 1, EPOCHS)["model"])
    # and they moved: the check above is not comparing two copies of the initial weights
    assert not bitwise_equal(_dump(runs["dump2"], 1, 0)["model"], _dump(runs["dump2"], 1, 1)["model"])


@end_to_end
def test_two_ranks_match_one_process_weights_eta_and_accuracy(runs):
    # Same seed, same initial weights, bit for bit: drawn once, before DDP wraps the model.
    assert bitwise_equal(_dump(runs["dump2"], 0, 0)["model"], _dump(runs["dump1"], 0, 0)["model"])
    for epoch in range(1, EPOCHS + 1):
        two, one = _dump(runs["dump2"], 0, epoch)["model"], _dump(runs["dump1"], 0, epoch)["model"]
        assert one and two.keys() == one.keys(), epoch
        for name in one:
            err = (two[name] - one[name]).norm() / one[name].norm()
            assert err <= 1e-5, (epoch, name, err.item())
    a, b = torch.load(runs["two"] / rundir.CHECKPOINT, weights_only=True), torch.load(runs["one"] / rundir.CHECKPOINT,
                                                                                      weights_only=True)
    assert a["optimizer"]["state"][0]["steps"].item() == b["optimizer"]["state"][0]["steps"].item() == EPOCHS * STEPS_PER_EPOCH
    assert _rel(a["optimizer"]["state"][0]["eta"].item(), b["optimizer"]["state"][0]["eta"].item()) <= 1e-5  # the last step's

    rows2, rows1 = metrics_rows(runs["two"]), metrics_rows(runs["one"])
    assert [r["epoch"] for r in rows2] == [r["epoch"] for r in rows1] == list(range(1, EPOCHS + 1))
    for r2, r1 in zip(rows2, rows1, strict=True):
        for key in ("eta_mean", "eta_min", "eta_max", "train_loss", "test_loss"):
            assert _rel(r2[key], r1[key]) <= 1e-5, (r2["epoch"], key, r2[key], r1[key])
        assert r2["skipped_steps"] == r1["skipped_steps"] == 0
        # The two runs' weights differ by rounding (a sum over 2 x 1024 samples is not added in
        # the order of one over 2048), which can flip the odd near-tie prediction: a few samples
        # out of 10,000 at most. Exactness of the evaluation itself is checked below.
        assert abs(r2["test_acc"] - r1["test_acc"]) * N_TEST <= 5, (r2, r1)
    assert rows1[-1]["test_acc"] > 0.6  # real data, real learning: chance is 0.1


@end_to_end
def test_momentum_under_ddp_matches_one_process(tmp_path, one_thread):
    # The buffers are built from the averaged gradients, so every rank holds the one-process ones.
    flags = [*FLAGS[:-1], "1", "--momentum", "0.9"]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = _torchrun(*flags, "--out", str(two), data_dir=DEBIAN_DATA)
    with pytest.MonkeyPatch.context() as mp:
        for var in LAUNCHER_VARS:
            mp.delenv(var, raising=False)
        assert main(["train", *flags, "--out", str(one), "--data_dir", str(DEBIAN_DATA)]) == 0
    _, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    a, b = (torch.load(d / rundir.CHECKPOINT, weights_only=True) for d in (two, one))
    assert b["model"] and a["model"].keys() == b["model"].keys()
    for name in b["model"]:
        assert _rel_norm(a["model"][name], b["model"][name]) <= 1e-5, name
    buffers = [(i, s["momentum_buffer"]) for i, s in b["optimizer"]["state"].items() if "momentum_buffer" in s]
    assert len(buffers) == 3  # one per weight of the 3-layer FCN
    for i, buf in buffers:
        assert buf.norm() > 0 and _rel_norm(a["optimizer"]["state"][i]["momentum_buffer"], buf) <= 1e-5, i


def _rel_norm(x, y) -> float:
    return ((x - y).norm() / y.norm()).item()


@end_to_end
def test_two_rank_evaluation_counts_every_test_sample_once(runs):
    from torch_agd.data import load_data
    from torch_agd.models import build_model
    from torch_agd.train.loop import evaluate, mse_loss

    data = load_data("fashion-mnist", DEBIAN_DATA, "cpu")
    model = build_model("fcn", data.info, depth=3, width=32)
    rows = metrics_rows(runs["two"])
    for epoch in range(1, EPOCHS + 1):
        # Each rank evaluated its half, partial last batch included; nothing padded or dropped.
        shares = [_dump(runs["dump2"], rank, epoch)["test"] for rank in (0, 1)]
        assert [s[2] for s in shares] == [N_TEST // 2, N_TEST // 2]
        assert _dump(runs["dump1"], 0, epoch)["test"][2] == N_TEST
        # The same weights evaluated by one process give exactly the 2-rank accuracy.
        model.load_state_dict(_dump(runs["dump2"], 0, epoch)["model"])
        alone = evaluate(model, data.test.batches(768), loss_fn=mse_loss, device=torch.device("cpu")).tolist()
        assert alone[2] == N_TEST and shares[0][1] + shares[1][1] == alone[1]
        assert rows[epoch - 1]["test_acc"] == alone[1] / N_TEST
        assert _rel(rows[epoch - 1]["test_loss"], alone[0] / N_TEST) <= 1e-6


@end_to_end
def test_only_rank_0_reports(runs):
    assert sorted(p.name for p in runs["two"].iterdir()) == sorted(
        [rundir.CONFIG, rundir.METRICS, rundir.CHECKPOINT, rundir.SUMMARY])
    lines = runs["stdout"].splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == EPOCHS, runs["stdout"]
    assert sum(line.startswith("done: ") for line in lines) == 1
    assert sum(line.startswith("data: ") for line in lines) == 1 and lines[0].startswith("data: ")
    assert "2 x cpu" in lines[1]
    config = json.loads((runs["two"] / rundir.CONFIG).read_text())
    assert config["train_bs"] == 2048 and config["test_bs"] == 768  # global sizes, as typed


# ------------------------------------------------------------------ failures


@end_to_end
def test_resume_after_killing_the_torchrun_group_matches_an_uninterrupted_run(runs, tmp_path):
    out = tmp_path / "killed"
    proc = _torchrun(*FLAGS, "--out", str(out), data_dir=DEBIAN_DATA)
    _wait_for(out / rundir.CHECKPOINT, [proc])
    workers = _kill_job(proc)  # the launcher and both ranks at once, as a preemption (scancel) would
    assert sorted(workers) == [0, 1]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers.values())
    state = torch.load(out / rundir.CHECKPOINT, weights_only=True)
    assert state["epoch"] < EPOCHS and not (out / rundir.SUMMARY).exists()

    resumed = _torchrun("--out", str(out), "--resume", data_dir=DEBIAN_DATA)
    stdout, stderr = _finish(resumed)
    assert resumed.returncode == 0, stderr
    assert f"resuming at epoch {state['epoch'] + 1}" in stdout
    a = torch.load(out / rundir.CHECKPOINT, weights_only=True)
    b = torch.load(runs["two"] / rundir.CHECKPOINT, weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert bitwise_equal(a["model"], b["model"])
    assert bitwise_equal(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert untimed(metrics_rows(out)) == untimed(metrics_rows(runs["two"]))


@end_to_end
def test_a_dead_rank_ends_the_torchrun_job(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(*FLAGS, "--out", str(out), data_dir=DEBIAN_DATA)
    _wait_for(out / rundir.CHECKPOINT, [proc])
    workers = _rank_pids(proc.pid)
    os.kill(workers[1], signal.SIGKILL)
    start = time.monotonic()
    _, stderr = _finish(proc, timeout=60)
    assert time.monotonic() - start < 30  # torchrun's monitor, not a process-group timeout
    assert proc.returncode != 0 and not _alive(workers[0])
    assert "Signal 9 (SIGKILL)" in stderr and "local_rank: 1" in stderr, stderr[-3000:]
    assert not (out / rundir.SUMMARY).exists()


@end_to_end
@pytest.mark.parametrize("fate", ["hangs", "dies"])
def test_a_hung_or_dead_rank_ends_rank_0_with_one_line(fate, tmp_path):
    # Launched by hand with OpenMPI's variables, as mpirun would, and no torchrun watching:
    # rank 0 must notice by itself, through the process-group timeout if rank 1 hangs (SIGSTOP:
    # alive, holding its sockets, answering nothing) or at once if it dies. Each rank gets its
    # own working directory and the same relative --out, as on nodes that share no filesystem:
    # rank 1 must write nothing.
    timeout, port = 6, _free_port()
    procs, cwds = [], [tmp_path / "node0", tmp_path / "node1"]
    for rank, cwd in enumerate(cwds):
        cwd.mkdir()
        env = _env(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), AGD_DIST_TIMEOUT=str(timeout))
        procs.append(subprocess.Popen([sys.executable, "-m", "torch_agd", "train", *FLAGS, "--out", "run",
                                       "--data_dir", str(DEBIAN_DATA)], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _wait_for(cwds[0] / "run" / rundir.CHECKPOINT, procs)
        os.kill(procs[1].pid, signal.SIGSTOP if fate == "hangs" else signal.SIGKILL)
        start = time.monotonic()
        try:
            stdout, stderr = procs[0].communicate(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waits {timeout + 60} s after rank 1 hung (AGD_DIST_TIMEOUT={timeout})")
        waited = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, stderr[-3000:]
    assert stderr.count("\n") == 1 and stderr.startswith("agd: error: rank 0 of 2: "), stderr[-3000:]
    assert "--resume" in stderr
    if fate == "hangs":
        assert timeout - 1 <= waited <= timeout + 30, waited
        assert f"waited AGD_DIST_TIMEOUT={timeout} s" in stderr
    else:
        assert waited < timeout + 30 and "lost contact with another process" in stderr, waited
    assert "1 x cpu" not in stdout and "2 x cpu" in stdout  # the OpenMPI variables made it a 2-rank job
    assert not (cwds[1] / "run").exists()  # only rank 0 writes
