"""Building on the meta device (docs/distributed.md, "Building on the meta device"): init_weights_
on FSDP2 shards gives every rank bitwise its rows of the unsharded init, and `agd train --fsdp`
builds so without changing a bit of the weights.

On 2 gloo ranks: tests/meta_init_driver.py (see its docstring). In this process: the pieces that
result rests on (the streamed draw, the QR of one block as in a batch, the meta build's
generator), and the trainer's build on a 1-rank FSDP job against its whole build.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import meta_init_driver
from test_distributed import REPO, _env, _free_port
from torch_agd import init_weights_
from torch_agd.data import DATASETS
from torch_agd.models import build_model
from torch_agd.optim.orthogonal import Reader, _qr_as_in_a_batch, normal_stream
from torch_agd.train import meta

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
TEXT = next(name for name, info in DATASETS.items() if len(info.in_shape) == 1)


# ------------------------------------------------------------------ 2 gloo ranks


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("meta") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", meta_init_driver.__file__, str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads(out.read_text())
    assert results["world_size"] == 2 and len(results["ranks"]) == 2
    return results


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("model", list(meta_init_driver.MODELS))
@pytest.mark.parametrize("seeded", ["", "-seeded-before-build"])
def test_every_rank_gathers_bitwise_the_unsharded_init(two_ranks, model, seeded):
    for rank, seen in enumerate(two_ranks["ranks"]):
        case = seen[model + seeded]
        assert case["names"] and case["names"] == case["expected"], rank  # every parameter and buffer
        assert case["differ"] == [], (rank, case["differ"])
        assert case["same_generator"], rank


@needs_gloo
@pytest.mark.slow
def test_the_two_ranks_hold_different_rows(two_ranks):
    # the comparison means something only if the rows were really split
    rows = [seen["fcn"]["local_rows"] for seen in two_ranks["ranks"]]
    assert rows[0]["1.weight"] + rows[1]["1.weight"] == 37 and rows[1]["7.weight"] == 0


# ------------------------------------------------------------------ the pieces, in this process


@pytest.mark.parametrize("total", [1, 15, 16, 17, 31, 48, 1000, 4099, 3 * (1 << 16) + 5])
def test_the_streamed_draw_is_torch_randn_and_draws_as_much(total):
    torch.manual_seed(7)
    whole = torch.randn(total, dtype=torch.float64)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    draws = Reader(normal_stream(total))
    parts, sizes = [], itertools.cycle([5, 16, 333, 1 << 16])  # runs that straddle the pieces
    while sum(p.numel() for p in parts) < total:
        parts.append(draws.take(min(next(sizes), total - sum(p.numel() for p in parts))))
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(torch.get_rng_state(), after)


def test_one_block_factorises_as_it_does_in_its_batch():
    torch.manual_seed(0)
    for k, rows, cols in [(9, 7, 5), (4, 33, 33), (3, 20, 10), (2, 257, 255)]:
        batch = torch.randn(k, rows, cols, dtype=torch.float64)
        q, r = torch.linalg.qr(batch)
        for i in range(k):
            qi, ri = _qr_as_in_a_batch(batch[i], i)
            assert torch.equal(qi, q[i]) and torch.equal(ri, r[i]), (k, rows, cols, i)


@pytest.mark.parametrize("arch, dataset", [("fcn", "fashion-mnist"), ("cnn", "cifar10"), ("resnet18", "cifar10"),
                                           ("tv-resnet18", "cifar10"), ("charlm", TEXT), ("charlm-tied", TEXT)])
def test_the_meta_build_moves_the_generator_as_the_cpu_build(arch, dataset):
    def build():
        return build_model(arch, DATASETS[dataset], depth=4, width=32)

    torch.manual_seed(0)
    build()
    expected = torch.get_rng_state()
    torch.manual_seed(0)
    model, why = meta.build_on_meta(build)
    assert why is None and meta.why_not(model) is None
    assert torch.equal(torch.get_rng_state(), expected)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("size", [5, 16, 29 * 24, 1 << 20, (1 << 20) + 7])
def test_the_meta_build_draws_as_much_for_any_size_of_table(size):
    # nn.Embedding draws normal_, nn.Linear uniform_: both in chunks, with normal_'s odd tail
    from torch import nn

    def build():
        return nn.Sequential(nn.Embedding(size, 1), nn.Linear(size, 1), nn.Embedding(3, 3))

    torch.manual_seed(1)
    build()
    expected = torch.get_rng_state()
    torch.manual_seed(1)
    meta.build_on_meta(build)
    assert torch.equal(torch.get_rng_state(), expected)


def test_what_cannot_be_built_on_meta_says_why_in_one_line():
    model, why = meta.build_on_meta(lambda: build_model("tv-vit", DATASETS["cifar10"]))
    assert "trunc_normal_" in why and "\n" not in why
    assert "class_token" in meta.why_not(model)
    from torch import nn

    with torch.device("meta"):
        table = nn.Sequential(nn.Linear(3, 3))
    table.register_buffer("freqs", torch.zeros(3))
    assert meta.why_not(table) == "the model (Sequential) holds the buffer 'freqs', which its constructor sets"


# ------------------------------------------------------------------ the trainer, on a 1-rank FSDP job


@needs_gloo
@pytest.mark.parametrize("arch, dataset", [("fcn", "fashion-mnist"), ("cnn", "cifar10"), ("charlm-tied", TEXT)])
def test_the_trainer_builds_on_meta_the_weights_of_its_whole_build(arch, dataset, one_rank):
    from torch_agd.train import run

    config = SimpleNamespace(seed=5, arch=arch, depth=3, width=24, optimizer="agd")
    torch.manual_seed(config.seed)
    whole = build_model(arch, DATASETS[dataset], depth=3, width=24)
    init_weights_(whole)
    expected = torch.get_rng_state()
    model = run._sharded_from_meta(config, DATASETS[dataset], one_rank)
    assert model is not None and torch.equal(torch.get_rng_state(), expected)
    tensors = {n: p.full_tensor() for n, p in model.named_parameters()} | dict(model.named_buffers())
    assert tensors.keys() == (dict(whole.named_parameters()) | dict(whole.named_buffers())).keys()
    for name, t in (dict(whole.named_parameters()) | dict(whole.named_buffers())).items():
        assert torch.equal(tensors[name], t), name


@needs_gloo
@pytest.mark.parametrize("arch", ["tv-vit", "hf:gpt2"])
def test_the_trainer_builds_whole_what_meta_cannot(arch, one_rank, capsys):
    from torch_agd.train import run

    config = SimpleNamespace(seed=5, arch=arch, depth=3, width=24, optimizer="agd")
    assert run._sharded_from_meta(config, DATASETS["cifar10"], one_rank) is None
    out = capsys.readouterr().out
    assert out.startswith(f"--fsdp: building {arch} whole on every rank") and out.count("\n") == 1


@needs_gloo
def test_a_parameter_split_on_an_inner_dim_is_refused_in_one_line(one_rank):
    # init_weights_ writes whole rows: a RowwiseParallel weight (Shard(1)) is initialised before
    # parallelize_module, not after
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from torch_agd.errors import UsageError

    mesh = init_device_mesh("cpu", (1,))
    weight = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(1)]))
    with pytest.raises(UsageError, match=r"params\[0\] is placed as \(Shard\(dim=1\),\), which splits it on an inner dim"):
        init_weights_([weight])
