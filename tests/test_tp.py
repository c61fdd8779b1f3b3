"""Tensor parallelism: AGD on parameters sharded by parallelize_module, alone (a 1-D mesh of 2)
and under FSDP2 on a 2 x 2 (dp x tp) mesh, against one process (docs/distributed.md, "Tensor
parallelism"); and a DCP checkpoint saved on 2 x 2 that resumes on 1 x 2 and on one process.

tests/tp_driver.py runs the cases (see its docstring): once on 4 gloo processes, then on 2,
which also resume the 4-process run's checkpoint.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import tp_driver
from test_distributed import REPO, _env, _free_port

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with gloo"),
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.slow,
]

# Placements the 2 x 2 model must show (tp_driver.TinyLM): FSDP2's dp shard beside each TP one.
PLACEMENTS_2x2 = {"layers.0.up.weight": ["_S(0, 2)", "S(0)"],   # ColwiseParallel, then dp: strided rows
                  "layers.0.down.weight": ["S(0)", "S(1)"],     # RowwiseParallel: columns over tp
                  "layers.0.down.bias": ["S(0)", "R"],          # replicated over tp
                  "pos.weight": ["S(0)", "S(1)"],               # a column-sharded embedding: rows are blocks
                  "layers.0.norm.weight": ["S(0)", "R"],        # SequenceParallel
                  "scale": ["S(0)"]}                            # left alone by TP: on the dp sub-mesh


def _launch(nproc: int, out, ckpt) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", tp_driver.__file__, str(out), str(ckpt)]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads(out.read_text())
    assert results["world_size"] == nproc
    assert all(len(ranks) == nproc for ranks in results["cases"].values())
    return results["cases"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tmp_path_factory.mktemp("tp_ckpt")


@pytest.fixture(scope="module")
def on_2x2(tmp_path_factory, ckpt) -> dict:
    cases = _launch(4, tmp_path_factory.mktemp("tp4") / "results.json", ckpt)
    assert sorted(cases) == sorted([*tp_driver.CASES_2x2, "resume-save"])
    return cases


@pytest.fixture(scope="module")
def on_tp(tmp_path_factory, ckpt, on_2x2) -> dict:  # after the 2 x 2 run, whose checkpoint it resumes
    cases = _launch(2, tmp_path_factory.mktemp("tp2") / "results.json", ckpt)
    assert sorted(cases) == sorted([*tp_driver.CASES_TP, "resume-load"])
    return cases


def _check_against_one_process(ranks: list, names: set) -> None:
    for rank, seen in enumerate(ranks):
        assert set(seen["errors"]) == names, rank
        for name, err in seen["errors"].items():
            assert err <= 1e-5, (rank, name, err)
        assert len(seen["etas"]) == tp_driver.STEPS
        assert seen["etas"] == ranks[0]["etas"], rank  # bit for bit: one all-reduce completes every norm alike
        for eta, ref in zip(seen["etas"], seen["ref_etas"], strict=True):
            assert eta > 0.01 and abs(eta - ref) <= 1e-6, (eta, ref)


def _names(scaled: bool) -> set:
    return {n for n, _ in tp_driver.TinyLM(scaled=scaled).named_parameters()}


@pytest.mark.parametrize("case", [*tp_driver.CASES_2x2, "resume-save"])
def test_fsdp2_x_tp_on_2x2_matches_one_process(on_2x2, case):
    _check_against_one_process(on_2x2[case], _names(scaled=True))


@pytest.mark.parametrize("case", list(tp_driver.CASES_TP))
def test_tp_alone_on_2_matches_one_process(on_tp, case):
    _check_against_one_process(on_tp[case], _names(scaled=False))


def test_the_2x2_model_is_sharded_on_rows_columns_strided_and_sub_meshes(on_2x2):
    for rank, seen in enumerate(on_2x2["frobenius"]):
        shapes = seen["shapes"]
        for name, placements in PLACEMENTS_2x2.items():
            assert shapes[name]["placements"] == placements, (rank, name, shapes[name])
        assert shapes["scale"]["mesh"] == ["dp"] and shapes["head.weight"]["mesh"] == ["dp", "tp"]
        assert shapes["layers.0.up.weight"]["local"] == [3 if rank in (0, 1) else 2, 8]  # 10 rows: 5 per tp, 3 + 2 over dp
    local = [seen["shapes"]["pos.weight"]["local"] for seen in on_2x2["frobenius"]]
    assert sorted(map(tuple, local)) == [(3, 4), (3, 4), (4, 4), (4, 4)]  # 7 rows over dp, 8 columns over tp


def _agd_collectives(calls: list) -> tuple[list, int, int]:
    """(the c10d all-reduces, the gathers, the functional all-reduces) of one step."""
    plain = [c for c in calls if not c[0].startswith("_c10d_functional.")]
    gathers = sum(c[0] == "_c10d_functional.all_gather_into_tensor.default" for c in calls)
    reduces = sum(c[0] == "_c10d_functional.all_reduce.default" for c in calls)
    return plain, gathers, reduces


@pytest.mark.parametrize("cases, case", [("on_2x2", c) for c in tp_driver.CASES_2x2] +
                         [("on_tp", c) for c in tp_driver.CASES_TP])
def test_a_step_sends_one_all_reduce_of_the_squared_block_norms(request, cases, case):
    """One all-reduce of the flat vector of block norms, over the whole mesh, whatever the
    placements; the orthogonal direction adds the gathers of the matrices' directions. TP alone
    also completes the gradients that DTensor's backward leaves Partial (the SequenceParallel
    norms' and the RowwiseParallel biases'): one all-reduce each, as any optimizer needs."""
    spec = (tp_driver.CASES_2x2 | tp_driver.CASES_TP)[case]
    ranks = request.getfixturevalue(cases)[case]
    for seen in ranks:
        entries = seen["n_blocks"] * (2 if spec["options"].get("momentum") else 1)
        partial = sum(any(pl.startswith("P") for pl in p) for p in seen["grad_placements"].values())
        assert (partial > 0) == (cases == "on_tp"), seen["grad_placements"]  # FSDP2 reduce-scatters them
        for step, calls in enumerate(seen["collectives"]):
            plain, gathers, reduces = _agd_collectives(calls)
            assert plain == [["c10d.allreduce_.default", [[[entries], "torch.float32"]]]], (step, calls)
            assert reduces == partial, (step, calls)
            assert (gathers > 0) == (spec["options"].get("direction") == "orthogonal"), (step, calls)


def test_a_2x2_checkpoint_resumes_on_1x2(on_tp):
    for rank, seen in enumerate(on_tp["resume-load"]):
        assert seen["loaded_steps"] == tp_driver.SAVE_AT, rank
        assert len(seen["etas"]) == tp_driver.STEPS - tp_driver.SAVE_AT
        assert set(seen["errors"]) == _names(scaled=True)
        for name, err in seen["errors"].items():  # against where the 2 x 2 run ended
            assert err <= 1e-5, (rank, name, err)


def test_a_2x2_checkpoint_resumes_on_one_process(on_2x2, ckpt):
    from torch_agd import AGD
    from torch_agd.train import fsdp

    model = tp_driver.TinyLM(scaled=True)
    opt = AGD(model, **tp_driver.RESUME_OPTIONS)
    fsdp.load_checkpoint(ckpt / "checkpoint", model=model, optimizer=opt)
    assert int(opt.steps) == tp_driver.SAVE_AT
    for step in range(tp_driver.SAVE_AT, tp_driver.STEPS):
        x, y = tp_driver.batch(step)
        opt.zero_grad()
        tp_driver.loss_of(model, x, y).backward()
        opt.step()
    final = torch.load(ckpt / "final_2x2.pt", weights_only=True)
    for name, p in model.named_parameters():
        err = ((p.detach() - final[name]).norm() / final[name].norm()).item()
        assert err <= 1e-5, (name, err)
