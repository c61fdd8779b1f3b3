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
from torch.distributed.tensor import Shard
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


# ------------------------------------------------------------------ agd train --tp


def _placements(model) -> dict:
    return {n: ([type(pl).__name__ + str(getattr(pl, "dim", "")) for pl in p.placements],
                list(p.device_mesh.mesh_dim_names)) for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["charlm", "hf:llama"])
def test_tp_splits_each_layer_in_megatrons_pairs_and_leaves_the_rest_to_fsdp2(one_rank, arch):
    """On a 1 x 1 mesh (the plan is what matters): colwise weights Shard(0) over tp, rowwise
    ones Shard(1), a rowwise bias replicated; charlm's packed attention and every norm and
    embedding on the dp mesh alone."""
    from torch_agd.data import DATASETS
    from torch_agd.models import build_model
    from torch_agd.train import tp

    if arch.startswith("hf:"):
        pytest.importorskip("transformers")
    model = build_model(arch, DATASETS["text"], depth=2, width=64)
    tp.shard_model(model, one_rank, 1, arch)
    placed = _placements(model)
    dp = (["Shard0"], ["dp"])
    if arch == "charlm":
        layer = "blocks.layers.1."
        split = {"linear1.weight": ["Shard0", "Shard0"], "linear1.bias": ["Shard0", "Shard0"],
                 "linear2.weight": ["Shard0", "Shard1"], "linear2.bias": ["Shard0", "Replicate"]}
        whole = ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "norm1.weight"]
        assert placed["embed.weight"] == placed["pos"] == placed["head.weight"] == dp
    else:
        layer = "model.model.layers.1."
        split = {f"self_attn.{c}_proj.weight": ["Shard0", "Shard0"] for c in "qkv"}
        split |= {"self_attn.o_proj.weight": ["Shard0", "Shard1"], "mlp.gate_proj.weight": ["Shard0", "Shard0"],
                  "mlp.up_proj.weight": ["Shard0", "Shard0"], "mlp.down_proj.weight": ["Shard0", "Shard1"]}
        whole = ["input_layernorm.weight", "post_attention_layernorm.weight"]
        assert placed["model.model.embed_tokens.weight"] == placed["model.lm_head.weight"] == dp
    for name, placements in split.items():
        assert placed[layer + name] == (placements, ["dp", "tp"]), name
    for name in whole:
        assert placed[layer + name] == dp, name


@pytest.mark.parametrize("layer, placement, message", [
    ("conv", "shard 2", "AGD cannot step weight, placed as (Shard(dim=2),): it is split on a kernel dim, which "
                         "cuts its blocks' kernel positions apart; shard it on its out or in channels"),
    ("linear", "partial", "AGD cannot step weight, placed as (Partial(sum),): Partial(sum) holds summands, not "
                            "entries: AGD steps Shard and Replicate placements"),
])
def test_a_layout_agd_cannot_step_is_refused_in_one_line(one_rank, layer, placement, message):
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    from torch_agd import AGD
    from torch_agd.errors import UsageError

    mesh = init_device_mesh("cpu", (1,))
    model = nn.Conv2d(2, 3, 3, bias=False) if layer == "conv" else nn.Linear(4, 3, bias=False)
    placed = [Shard(2) if placement == "shard 2" else Partial()]
    model.weight = nn.Parameter(DTensor.from_local(model.weight.detach(), mesh, placed))
    model.weight.grad = DTensor.from_local(torch.ones(model.weight.shape), mesh, placed)
    with pytest.raises(UsageError) as caught:
        AGD(model).step()
    assert str(caught.value) == message


@pytest.mark.parametrize("flags, message", [
    (["--fsdp", "--tp", "3"], "--tp 3 does not divide the 4 processes; use a divisor of 4"),
    (["--fsdp", "--tp", "0"], "--tp must be at least 1, got 0"),
    (["--tp", "2"], "--tp shards the data-parallel dim with FSDP2 as well: add --fsdp"),
    (["--fsdp", "--tp", "2", "--arch", "fcn", "--dataset", "fashion-mnist"],
     "--tp splits transformer layers; --arch fcn has none: use charlm, charlm-tied or hf:NAME"),
    (["--fsdp", "--tp", "2", "--arch", "hf:gpt2"],
     "--tp: transformers has no tensor-parallel plan for hf:gpt2; run it without --tp"),
    (["--fsdp", "--tp", "2", "--arch", "hf:llama", "--width", "96"],
     "--tp 2 must divide hf:llama's 3 attention heads (--width / 32): each tp rank computes whole heads"),
])
def test_a_bad_tp_is_refused_in_one_line_before_joining(flags, message, tmp_path, capsys, monkeypatch):
    from test_distributed import LAUNCHER_VARS
    from torch_agd.cli import main

    if "hf:" in " ".join(flags):
        pytest.importorskip("transformers")
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    # Rank 0 of 4 with no other rank anywhere: a check after init_process_group would wait for them.
    for var, value in dict(RANK="0", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                           AGD_DIST_TIMEOUT="5").items():
        monkeypatch.setenv(var, value)
    text = tmp_path / "t.txt"
    text.write_text("abc " * 100)
    out = tmp_path / "run"
    args = ["train", "--cpu", "--arch", "charlm", "--dataset", "text", "--data-dir", str(text), *flags, "--out", str(out)]
    assert main(args) == 2
    assert capsys.readouterr().err == f"agd: error: {message}\n"
    assert not out.exists() and not dist.is_initialized()


WORDS = ["the", "agd", "tensor", "parallel", "shard", "norm", "block", "gradient", "step", "mesh"]
TRAIN = ["--cpu", "--dataset", "text", "--steps", "4", "--train_bs", "8", "--test_bs", "64"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (20_000,), generator=g).tolist()))
    return path


def _train(nproc: int, arch: str, flags: list, text, out) -> dict:
    args = ["-m", "torch_agd", "train", "--arch", arch, *TRAIN, "--data-dir", str(text), "--out", str(out), *flags]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *args]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("arch, nproc, tp", [("charlm", 4, 2), ("hf:llama", 2, 2)])
def test_agd_train_tp_matches_one_process(arch, nproc, tp, text_file, tmp_path):
    """2 x 2 (charlm: dp 2, tp 2) and 1 x 2 (hf:llama: tp alone, FSDP2 over a dp of 1) against
    the same run in one process: same global batches, so the same eta and losses to rounding."""
    if arch.startswith("hf:"):
        pytest.importorskip("transformers")
    sharded = _train(nproc, arch, ["--fsdp", "--tp", str(tp)], text_file, tmp_path / "tp")
    alone = _train(1, arch, [], text_file, tmp_path / "alone")
    for key in ("eta_mean", "eta_min", "eta_max"):
        assert abs(sharded[key] - alone[key]) <= 1e-6, (key, sharded[key], alone[key])
    for key in ("train_loss", "test_loss"):
        assert abs(sharded[key] - alone[key]) <= 1e-5 * abs(alone[key]), (key, sharded[key], alone[key])
    for key in ("train_acc", "test_acc"):  # every sample counted once, not once per tp rank
        assert abs(sharded[key] - alone[key]) <= 1e-3, (key, sharded[key], alone[key])
    assert json.loads((tmp_path / "tp" / "config.json").read_text())["tp"] == tp
