"""FSDP2: AGD on sharded parameters, and `agd train --fsdp` (docs/distributed.md, "FSDP2").

The optimizer: tests/fsdp_driver.py, launched once on 2 gloo ranks, steps AGD on models that
fully_shard has sharded and on the same models in one process, and reports what each rank saw
(see its docstring). The trainer: real torchrun jobs on real Fashion-MNIST, launched and killed
with tests/test_distributed.py's helpers, with the same flags, so the runs compare with its.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fsdp_driver
from helpers import DEBIAN_DATA, bitwise_equal, metrics_rows
from test_distributed import (EPOCHS, FLAGS, LAUNCHER_VARS, N_TEST, REPO, STEPS_PER_EPOCH, _alive, _env, _finish,
                              _free_port, _kill_job, _no_agd_traceback, _rel, _torchrun, _wait_for, end_to_end)
from torch_agd.cli import main
from torch_agd.train import fsdp, rundir
from torch_agd.train.config import TIMING_KEYS

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(sys.platform != "linux", reason="finds torchrun's workers through /proc"),
    pytest.mark.usefixtures("one_thread"),
]

# Blocks of the driver's models, counted by hand from rules.py: a linear weight (its bias joins
# it) is one block, a conv weight one per kernel position (3x3: 9), a norm layer one.
BLOCKS = {"mlp": 1 + 1 + 1 + 1, "conv": 9 + 1 + 9 + 1,
          # positions (one per slot), embedding rows (the head shares them), q k v, 3 linears,
          # 3 LayerNorms
          "tied-lm": 6 + 20 + 3 + 3 + 3}
CASES = [name for name in fsdp_driver.CASES]
# direction="orthogonal": each sharded matrix's direction, and its joined bias's, is all-gathered
# once per step (mlp: 3 weights, 2 biases; conv: 2 convs, 1 conv bias, the linear and its bias;
# tied-lm: in_proj, out_proj, linear1, linear2, each with its bias; the tied table is not a matrix).
GATHERS = {"mlp": 5, "conv": 5, "tied-lm": 8}


# ------------------------------------------------------------------ the optimizer on 2 ranks


@pytest.fixture(scope="module")
def stepped(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("driver") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", fsdp_driver.__file__, str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads(out.read_text())
    assert results["world_size"] == 2
    # every case, from both ranks: the tests below loop over these and must never loop over nothing
    assert sorted(results["cases"]) == sorted([*CASES, *fsdp_driver.LOCKSTEP])
    assert all(len(ranks) == 2 for ranks in results["cases"].values())
    return results["cases"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_sharded_weights_match_one_process_after_15_steps(stepped, case):
    hsdp = fsdp_driver.CASES[case].get("hsdp")
    names = {name for name, _ in fsdp_driver.MODELS[fsdp_driver.CASES[case]["model"]][0]().named_parameters()}
    for rank, seen in enumerate(stepped[case]):
        assert names and set(seen["errors"]) == set(seen["moved"]) == set(seen["shapes"]) == names, rank
        # Newton–Schulz lifts small singular values by up to a**5 ~ 490 (orthogonalize.py), so
        # the float32 rounding in which the sharded and one-process gradients differ grows more.
        tol = 1e-4 if fsdp_driver.CASES[case].get("direction", "").startswith("orthogonal") else 1e-5
        for name, err in seen["errors"].items():
            assert err <= tol, (rank, name, err)
            assert seen["moved"][name] > 1e-3, (rank, name)  # trained, not two copies of the start
        for name, shape in seen["shapes"].items():
            assert shape["type"] == "DTensor", (name, shape)
            assert shape["placements"] == (["Replicate()", "Shard(0)"] if hsdp else ["Shard(0)"]), (name, shape)
    local = {name: [seen["shapes"][name]["local"][0] for seen in stepped[case]] for name in stepped[case][0]["shapes"]}
    full = {name: shape["full"][0] for name, shape in stepped[case][0]["shapes"].items()}
    if hsdp:  # every rank a whole replica: each entry must be counted once, not twice
        assert all(rows == [full[name]] * 2 for name, rows in local.items()), local
        return
    # Shards of unequal length, and one rank holding no row of the 1-row head.
    assert all(sum(rows) == full[name] for name, rows in local.items()), local
    assert any(rows[0] != rows[1] for rows in local.values())
    if stepped[case][0]["shapes"].get("5.weight"):
        assert local["5.weight"] == [1, 0]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_eta_is_the_same_on_every_rank_and_matches_one_process(stepped, case):
    first, second = stepped[case]
    assert len(first["etas"]) == fsdp_driver.STEPS
    assert first["etas"] == second["etas"]  # bit for bit: one all-reduce completes every norm alike
    for eta, ref in zip(first["etas"], first["ref_etas"], strict=True):
        assert eta > 0.01 and abs(eta - ref) <= 1e-6, (eta, ref)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_step_sends_one_all_reduce_of_the_squared_block_norms_and_gathers_only_orthogonal_directions(stepped, case):
    spec = fsdp_driver.CASES[case]
    # With momentum the norms of the buffers travel too, in the same call.
    entries = BLOCKS[spec["model"]] * (2 if spec.get("momentum") else 1)
    # the orthogonal direction gathers each matrix's direction (none on a shard group of one: HSDP's)
    gathers = GATHERS[spec["model"]] if spec.get("direction", "").startswith("orthogonal") and not spec.get("hsdp") else 0
    for seen in stepped[case]:
        assert len(seen["collectives"]) == fsdp_driver.STEPS
        for step, calls in enumerate(seen["collectives"]):
            gathered = [c for c in calls if c[0] == "_c10d_functional.all_gather_into_tensor.default"]
            assert len(gathered) == gathers, (step, calls)
            others = [c for c in calls if not c[0].startswith("_c10d_functional.")]  # a gather's wait and wrap
            assert others == [["c10d.allreduce_.default", [[[entries], "torch.float32"]]]], (step, calls)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_the_foreach_path_is_the_default_and_steps_the_shards(stepped, case):
    per_tensor = fsdp_driver.CASES[case].get("foreach") is False
    for seen in stepped[case]:
        assert seen["paths"] == ({"foreach": 0, "per_tensor": fsdp_driver.STEPS} if per_tensor
                                 else {"foreach": fsdp_driver.STEPS, "per_tensor": 0})


@pytest.mark.slow
def test_mixed_precision_computes_in_bf16_and_agd_updates_the_float32_shards(stepped):
    # The reference computed each slice's gradient with bf16 copies of the weights and summed
    # them in float32, as MixedPrecisionPolicy(bf16, reduce float32) does, and AGD stepped its
    # float32 weights: agreement to 1e-5 (test above) rules out bf16 weights (AGD's relative
    # updates, ~1e-3, would round away) and float32 compute (its eta differs, below).
    for seen in stepped["mlp-bf16"]:
        assert seen["grad_dtypes"] == ["torch.float32"]
        shapes = seen["shapes"].values()
        assert shapes and all(s["dtype"] == s["local_dtype"] == "torch.float32" for s in shapes)
    bf16, fp32 = stepped["mlp-bf16"][0]["etas"], stepped["mlp"][0]["etas"]
    assert max(abs(a - b) for a, b in zip(bf16, fp32, strict=True)) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("case", list(fsdp_driver.LOCKSTEP))
def test_evaluation_runs_the_ranks_in_lockstep_and_counts_every_sample_once(stepped, case):
    # Rank 0 holds 3 test batches and rank 1 holds 2, or none: without the lockstep the ranks'
    # forwards (all-gathers) pair up wrongly and the job fails or hangs.
    for seen in stepped[case]:
        totals, alone = seen["totals"], seen["alone"]
        assert totals[1:] == alone[1:] == [alone[1], 17.0]
        assert _rel(totals[0], alone[0]) <= 1e-6


# ------------------------------------------------------------------ the policy and the checkpoints, in-process


def test_units_are_layers_residual_blocks_and_transformer_layers():
    from torch_agd.data import DATASETS
    from torch_agd.models import build_model
    from torch_agd.models.charlm import CharLM

    fcn = build_model("fcn", DATASETS["fashion-mnist"], depth=3, width=8)
    assert fsdp.units(fcn) == [m for m in fcn if isinstance(m, nn.Linear)]
    resnet = build_model("resnet18", DATASETS["cifar10"])
    kinds = [type(m).__name__ for m in fsdp.units(resnet)]
    assert kinds == ["Conv2d"] + ["PreActBlock"] * 8 + ["Linear"], kinds
    # together they hold every parameter: the root is left none of its own
    assert sum(p.numel() for u in fsdp.units(resnet) for p in u.parameters()) == sum(
        p.numel() for p in resnet.parameters())
    lm = CharLM(50, dim=16, layers=3, heads=2, context=8)
    kinds = [type(m).__name__ for m in fsdp.units(lm)]
    assert kinds == ["Embedding"] + ["TransformerEncoderLayer"] * 3 + ["LayerNorm", "Linear"], kinds
    vit = build_model("tv-vit", DATASETS["cifar10"])  # the encoder holds its blocks in a Sequential
    kinds = [type(m).__name__ for m in fsdp.units(vit)]
    assert kinds == ["Conv2d"] + ["EncoderBlock"] * 4 + ["LayerNorm", "Linear"], kinds
    # a block's own Sequential (torchvision's downsample: a conv and a BatchNorm) is not a stack
    tv = build_model("tv-resnet18", DATASETS["cifar10"])
    assert [type(m).__name__ for m in fsdp.units(tv)] == ["Conv2d", "BatchNorm2d"] + ["BasicBlock"] * 8 + ["Linear"]


def _sharded(env, seed: int):
    from torch_agd import AGD, init_weights_

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=False))
    init_weights_(model)
    fsdp.shard_model(model, env)
    return model, AGD(model, momentum=0.5)


def _train_a_step(model, opt):
    opt.zero_grad()
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()


class Killed(Exception):
    """What the kill interrupts the save with."""


def _killed_at_call(number: int, real, before=None, counts=lambda *args: True):
    """``real``, except that the ``number``-th of its calls that ``counts`` runs ``before`` (if
    any) instead, then raises Killed."""
    calls = []

    def wrapper(*args, **kwargs):
        if counts(*args):
            calls.append(args)
        if len(calls) == number and counts(*args):
            if before is not None:
                before(*args, **kwargs)
            raise Killed()
        return real(*args, **kwargs)

    return wrapper


def _delete_metadata(path, **kwargs):
    (Path(path) / ".metadata").unlink()  # deleted a first file, then killed


@pytest.mark.parametrize("kill", ["after dcp.save", "before renaming the last checkpoint",
                                  "between the renames", "while deleting the last checkpoint"])
def test_a_save_killed_at_any_point_leaves_a_complete_checkpoint(kill, one_rank, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model, opt = _sharded(one_rank, seed=0)
    saved = {}
    for epoch in (1, 2):
        _train_a_step(model, opt)
        fsdp.save_checkpoint(tmp_path, model=model, optimizer=opt, epoch=epoch, metrics=[{"epoch": epoch}], env=one_rank)
        saved[epoch] = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    _train_a_step(model, opt)

    with monkeypatch.context() as m:
        if kill == "after dcp.save":  # every shard and .metadata written, train_state.pt not yet
            m.setattr(dcp, "save", _killed_at_call(1, dcp.save, before=dcp.save))
        elif kill == "while deleting the last checkpoint":
            # shutil.rmtree's calls in a save: the old .tmp, a stale .old, then the .old just made
            m.setattr(shutil, "rmtree", _killed_at_call(3, shutil.rmtree, before=_delete_metadata))
        else:
            # the save's own renames, in the run directory (DCP renames files inside checkpoint.tmp)
            m.setattr(Path, "rename", _killed_at_call(1 if kill.startswith("before") else 2, Path.rename,
                                                      counts=lambda path, target: path.parent == tmp_path))
        with pytest.raises(Killed):
            fsdp.save_checkpoint(tmp_path, model=model, optimizer=opt, epoch=3, metrics=[], env=one_rank)

    expected = 3 if kill == "while deleting the last checkpoint" else 2
    path = fsdp.checkpoint_path(tmp_path, sharded=True)
    assert path.name == ("checkpoint.old" if kill == "between the renames" else "checkpoint")
    fresh, fresh_opt = _sharded(one_rank, seed=1)
    state = fsdp.load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert state["epoch"] == expected and state["metrics"] == ([] if expected == 3 else [{"epoch": 2}])
    if expected == 2:
        assert bitwise_equal({n: p.full_tensor() for n, p in fresh.named_parameters()}, saved[2])
    assert fresh_opt.steps.item() == expected

    # The next save completes and leaves nothing behind.
    fsdp.save_checkpoint(tmp_path, model=model, optimizer=opt, epoch=4, metrics=[], env=one_rank)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_agd_infers_the_same_depth_on_a_sharded_model(one_rank):
    from torch_agd import AGD

    model = _lone_block_net()
    unsharded = AGD(model).depth
    fsdp.shard_model(model, one_rank)
    assert AGD(model).depth == unsharded


def test_a_checkpoint_of_the_other_kind_is_a_one_line_error(tmp_path):
    from torch_agd.errors import UsageError

    (tmp_path / rundir.CHECKPOINT).write_bytes(b"")
    with pytest.raises(UsageError, match="holds checkpoint.pt, written without --fsdp"):
        fsdp.checkpoint_path(tmp_path, sharded=True)
    assert fsdp.checkpoint_path(tmp_path, sharded=True, resuming=False).name == "checkpoint"


def _clean_launch(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("flags, message", [
    (["--compile"], "--fsdp does not combine with --compile yet; drop --compile"),
    (["--optimizer", "prodigy"], "--fsdp cannot train with --optimizer prodigy: " + fsdp.UNSHARDABLE_PEERS["prodigy"]
     + "; run it without --fsdp"),
    (["--optimizer", "dadapt-adam"], "--fsdp cannot train with --optimizer dadapt-adam: "
     + fsdp.UNSHARDABLE_PEERS["dadapt-adam"] + "; run it without --fsdp"),
    (["--optimizer", "dog"], "--fsdp cannot train with --optimizer dog: " + fsdp.UNSHARDABLE_PEERS["dog"]
     + "; run it without --fsdp"),
    (["--optimizer", "muon"], "--fsdp trains with --optimizer agd, adam, adamw, sgd, agd+adamw or schedulefree; "
                              "run --optimizer muon without --fsdp"),
])
def test_what_fsdp_does_not_combine_with_is_refused_before_joining(flags, message, tmp_path, capsys, monkeypatch):
    # Rank 0 of 2 with no rank 1 anywhere: a check after init_process_group would wait for it.
    _clean_launch(monkeypatch)
    for var, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                           AGD_DIST_TIMEOUT="5").items():
        monkeypatch.setenv(var, value)
    out = tmp_path / "run"
    assert main(["train", *FLAGS, "--fsdp", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"agd: error: {message}\n"
    assert not out.exists() and not dist.is_initialized()


# ------------------------------------------------------------------ agd train --fsdp under torchrun


def _consolidated(checkpoint: Path, tmp: Path) -> dict:
    """A DCP checkpoint directory as one dict of whole tensors (what the ranks hold, joined)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = tmp / f"{checkpoint.parent.name}-whole.pt"
    dcp_to_torch_save(checkpoint, path)
    return torch.load(path, weights_only=False)


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, one_thread):
    """The same run on 2 ranks under torchrun with --fsdp, and in one process without; and, started
    with them to share their start-up time, a third, killed whole (SIGKILL to torchrun and both
    ranks) as soon as it has written its first checkpoint."""
    tmp = tmp_path_factory.mktemp("fsdp-runs")
    two, one, killed = tmp / "two", tmp / "one", tmp / "killed"
    proc = _torchrun(*FLAGS, "--fsdp", "--out", str(two), data_dir=DEBIAN_DATA)
    doomed = _torchrun(*FLAGS, "--fsdp", "--out", str(killed), data_dir=DEBIAN_DATA)
    _wait_for(killed / rundir.CHECKPOINT_DIR, [doomed])
    workers = _kill_job(doomed)
    with pytest.MonkeyPatch.context() as mp:
        _clean_launch(mp)
        assert main(["train", *FLAGS, "--out", str(one), "--data_dir", str(DEBIAN_DATA)]) == 0
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    return dict(tmp=tmp, two=two, one=one, stdout=stdout, whole=_consolidated(two / rundir.CHECKPOINT_DIR, tmp),
                killed=killed, workers=workers)


@end_to_end
def test_fsdp_training_matches_one_process(fsdp_runs):
    sharded = fsdp_runs["whole"]
    alone = torch.load(fsdp_runs["one"] / rundir.CHECKPOINT, weights_only=True)
    assert alone["model"] and sharded["model"].keys() == alone["model"].keys()
    for name, weight in alone["model"].items():
        assert (sharded["model"][name] - weight).norm() / weight.norm() <= 1e-5, name
    state = next(iter(sharded["optimizer"]["state"].values()))
    assert state["steps"].item() == alone["optimizer"]["state"][0]["steps"].item() == EPOCHS * STEPS_PER_EPOCH
    assert _rel(state["eta"].item(), alone["optimizer"]["state"][0]["eta"].item()) <= 1e-5
    rows2, rows1 = metrics_rows(fsdp_runs["two"]), metrics_rows(fsdp_runs["one"])
    assert [r["epoch"] for r in rows2] == list(range(1, EPOCHS + 1))
    for r2, r1 in zip(rows2, rows1, strict=True):
        for key in ("eta_mean", "eta_min", "eta_max", "train_loss", "test_loss"):
            assert _rel(r2[key], r1[key]) <= 1e-5, (r2["epoch"], key, r2[key], r1[key])
        assert abs(r2["test_acc"] - r1["test_acc"]) * N_TEST <= 5  # near-ties may flip (test_distributed.py)
    # Only rank 0 reports; the checkpoint is one complete directory, nothing half-written beside it.
    assert sorted(p.name for p in fsdp_runs["two"].iterdir()) == sorted(
        [rundir.CONFIG, rundir.METRICS, rundir.CHECKPOINT_DIR, rundir.SUMMARY])
    assert sum(line.startswith("epoch ") for line in fsdp_runs["stdout"].splitlines()) == EPOCHS
    assert "2 x cpu, FSDP" in fsdp_runs["stdout"].splitlines()[1]  # after the data line


@end_to_end
def test_fsdp_evaluation_is_the_one_process_evaluation_of_the_same_weights(fsdp_runs):
    from torch_agd.data import load_data
    from torch_agd.models import build_model
    from torch_agd.train.loop import evaluate, mse_loss

    data = load_data("fashion-mnist", DEBIAN_DATA, "cpu")
    model = build_model("fcn", data.info, depth=3, width=32)
    model.load_state_dict(fsdp_runs["whole"]["model"])
    alone = evaluate(model, data.test.batches(768), loss_fn=mse_loss, device=torch.device("cpu")).tolist()
    last = metrics_rows(fsdp_runs["two"])[-1]
    assert alone[2] == N_TEST and last["test_acc"] == alone[1] / N_TEST
    assert _rel(last["test_loss"], alone[0] / N_TEST) <= 1e-6


@pytest.fixture(scope="module")
def resumed(fsdp_runs, tmp_path_factory):
    """The killed --fsdp job resumed on 2 ranks under torchrun and, from a copy, on 1 process in
    this one (meanwhile)."""
    tmp = tmp_path_factory.mktemp("fsdp-resumed")
    killed, workers, onto_one = fsdp_runs["killed"], fsdp_runs["workers"], tmp / "onto-one"
    assert sorted(workers) == [0, 1]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers.values())
    epoch = torch.load(fsdp.checkpoint_path(killed, sharded=True) / fsdp.TRAIN_STATE, weights_only=True)["epoch"]
    assert epoch < EPOCHS and not (killed / rundir.SUMMARY).exists()
    shutil.copytree(killed, onto_one)

    proc = _torchrun("--out", str(killed), "--resume", data_dir=DEBIAN_DATA)
    one_process = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(one_process):
        _clean_launch(mp)
        assert main(["train", "--out", str(onto_one), "--resume", "--data_dir", str(DEBIAN_DATA)]) == 0
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    return dict(epoch=epoch, killed=killed, onto_one=onto_one, stdout=stdout, stdout_one=one_process.getvalue(), tmp=tmp)


@end_to_end
def test_resume_after_killing_the_fsdp_job_matches_an_uninterrupted_run_bitwise(fsdp_runs, resumed):
    assert f"resuming at epoch {resumed['epoch'] + 1}" in resumed["stdout"]
    a = _consolidated(resumed["killed"] / rundir.CHECKPOINT_DIR, resumed["tmp"])
    b = fsdp_runs["whole"]
    assert bitwise_equal(a["model"], b["model"])
    assert bitwise_equal(a["optimizer"]["state"], b["optimizer"]["state"])
    assert _untimed(metrics_rows(resumed["killed"])) == _untimed(metrics_rows(fsdp_runs["two"]))


@end_to_end
def test_an_fsdp_run_from_2_ranks_resumes_on_1(fsdp_runs, resumed):
    # No launcher: a 1-rank FSDP job, which reshards the 2 ranks' checkpoint as it loads it.
    assert f"resuming at epoch {resumed['epoch'] + 1}" in resumed["stdout_one"]
    assert "1 x cpu, FSDP" in resumed["stdout_one"]
    a = _consolidated(resumed["onto_one"] / rundir.CHECKPOINT_DIR, resumed["tmp"])
    b = fsdp_runs["whole"]
    assert b["model"] and a["model"].keys() == b["model"].keys()
    for name, weight in b["model"].items():
        assert (a["model"][name] - weight).norm() / weight.norm() <= 1e-5, name
    rows1, rows2 = metrics_rows(resumed["onto_one"]), metrics_rows(fsdp_runs["two"])
    assert _untimed(rows1[:resumed["epoch"]]) == _untimed(rows2[:resumed["epoch"]])  # from the checkpoint
    for r1, r2 in zip(rows1, rows2, strict=True):
        for key in ("eta_mean", "train_loss", "test_loss"):
            assert _rel(r1[key], r2[key]) <= 1e-5, (r1["epoch"], key)


@end_to_end
def test_a_bad_fsdp_launch_under_torchrun_is_one_line_from_rank_0(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(*FLAGS, "--fsdp", "--optimizer", "prodigy", "--out", str(out), data_dir=DEBIAN_DATA)
    stdout, stderr = _finish(proc, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if "agd: error:" in line]
    assert errors == [f"agd: error: --fsdp cannot train with --optimizer prodigy: {fsdp.UNSHARDABLE_PEERS['prodigy']}; "
                      "run it without --fsdp"], stderr
    _no_agd_traceback(stderr)
    assert stdout == "" and not out.exists()


@end_to_end
def test_fsdp_on_a_run_without_it_is_a_one_line_error(fsdp_runs, tmp_path, capsys, monkeypatch):
    _clean_launch(monkeypatch)
    assert main(["train", "--out", str(fsdp_runs["one"]), "--resume", "--fsdp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agd: error: --resume: flags differ") and "--fsdp True (the run has False)" in err
    assert err.count("\n") == 1
    # config.json edited to ask for FSDP, over a checkpoint.pt: refused, not restarted from scratch
    run = tmp_path / "edited"
    shutil.copytree(fsdp_runs["one"], run)
    (run / rundir.SUMMARY).unlink()
    config = json.loads((run / rundir.CONFIG).read_text())
    (run / rundir.CONFIG).write_text(json.dumps({**config, "fsdp": True}))
    before = (run / rundir.METRICS).read_bytes()
    assert main(["train", "--out", str(run), "--resume", "--data_dir", str(DEBIAN_DATA)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"agd: error: {run} holds checkpoint.pt, written without --fsdp") and err.count("\n") == 1
    assert (run / rundir.METRICS).read_bytes() == before and not dist.is_initialized()


def test_fsdp_with_amp_on_one_process_trains_as_amp_without_it(tmp_path, monkeypatch):
    # --amp under --fsdp is the same bf16 autocast around the forward; the float32 shards stay
    # float32. One process: a 1-rank FSDP job, whose gathered weights are the whole weights.
    from fakedata import install_fake_idx

    _clean_launch(monkeypatch)
    install_fake_idx(monkeypatch, tmp_path / "data", "fashion-mnist", n_train=192, n_test=40)
    argv = ["train", "--arch", "fcn", "--dataset", "fashion-mnist", "--depth", "3", "--width", "16", "--train-bs",
            "32", "--test_bs", "16", "--epochs", "1", "--cpu", "--amp", "--data-dir", str(tmp_path / "data")]
    assert main([*argv, "--out", str(tmp_path / "amp")]) == 0
    assert main([*argv, "--fsdp", "--out", str(tmp_path / "fsdp")]) == 0
    assert not dist.is_initialized()
    sharded = _consolidated(tmp_path / "fsdp" / rundir.CHECKPOINT_DIR, tmp_path)["model"]
    alone = torch.load(tmp_path / "amp" / rundir.CHECKPOINT, weights_only=True)["model"]
    assert alone and sharded.keys() == alone.keys()
    for name, weight in alone.items():
        assert sharded[name].dtype == torch.float32
        assert (sharded[name] - weight).norm() / weight.norm() <= 1e-5, name
    a, b = metrics_rows(tmp_path / "fsdp")[0], metrics_rows(tmp_path / "amp")[0]
    for key in ("train_loss", "test_loss", "eta_mean"):
        assert _rel(a[key], b[key]) <= 1e-5, key


def _lone_block_net(in_channels: int = 1, classes: int = 10) -> nn.Module:
    """A residual block between two layers, alone in its Sequential: AGD counts it as one layer
    in series (L = 3) on the model as built, and fully_shard makes the block a unit of its own."""
    from torch_agd.models.resnet import PreActBlock

    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), PreActBlock(8, 8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes, bias=False))


def test_fsdp_keeps_the_depth_agd_infers_on_the_unsharded_model(tmp_path, monkeypatch):
    # --agd-depth auto: L inferred on the model as built; the same run with and without --fsdp
    # (one process) steps with one eta. (The trainer's own networks hold their residual blocks
    # side by side, which the inference also finds after sharding.)
    from fakedata import install_fake_idx
    from torch_agd.train import run as run_module

    _clean_launch(monkeypatch)
    install_fake_idx(monkeypatch, tmp_path / "data", "fashion-mnist", n_train=192, n_test=40)
    monkeypatch.setattr(run_module, "build_model", lambda arch, info, **kwargs: _lone_block_net())
    argv = ["train", "--arch", "fcn", "--dataset", "fashion-mnist", "--agd-depth", "auto", "--train-bs", "32",
            "--test_bs", "16", "--epochs", "1", "--cpu", "--data-dir", str(tmp_path / "data")]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert main([*argv, "--fsdp", "--out", str(tmp_path / "fsdp")]) == 0
    a, b = metrics_rows(tmp_path / "fsdp")[0], metrics_rows(tmp_path / "plain")[0]
    for key in ("eta_mean", "eta_min", "eta_max", "train_loss", "test_loss"):
        assert _rel(a[key], b[key]) <= 1e-5, (key, a[key], b[key])
