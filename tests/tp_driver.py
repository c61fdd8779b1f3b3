"""AGD on tensor-parallel models (parallelize_module), alone and under FSDP2 on a dp x tp mesh,
against the same model stepped in one process, for tests/test_tp.py.

    python -m torch.distributed.run --nproc_per_node=4 tests/tp_driver.py OUT.json CKPT_DIR   # 2 x 2
    python -m torch.distributed.run --nproc_per_node=2 tests/tp_driver.py OUT.json CKPT_DIR   # TP alone, resume on 1 x 2

The model is a small Megatron-style language model with sequence parallelism: a row-sharded
token embedding, a column-sharded positional embedding, per layer a LayerNorm (replicated,
SequenceParallel), a ColwiseParallel up projection (weight and bias Shard(0)) and a
RowwiseParallel down projection (weight Shard(1), bias replicated), a final LayerNorm and a
ColwiseParallel head. On 4 processes FSDP2 then shards every layer and the root over dp, which
makes the TP tensors 2-D ((_Strided)Shard(0) on dp beside their TP placement) and leaves the
norms on the dp sub-mesh. Every case keeps an unsharded copy as the one-process reference,
steps both on the same global batches (each dp rank its slice), and records per rank: eta at
each step, the reference's, each parameter's relative distance from the reference, the
collectives issued inside every opt.step(), and placements. On 4 processes the "resume" case
also saves a DCP checkpoint (torch_agd.train.fsdp.save_checkpoint) after SAVE_AT steps and keeps
going; on 2 processes it loads that checkpoint on a 1 x 2 mesh and takes the remaining steps.
"""
from __future__ import annotations

import copy
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from fsdp_driver import Collectives, count_paths
from torch_agd import AGD, init_weights_

STEPS = 9
SAVE_AT = 6      # the resume case saves after this many steps, then takes the rest
BATCH, T, VOCAB = 8, 6, 12   # T splits over tp=2 (sequence parallel); 4 samples per dp rank


class Layer(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    # h = 10: the up projection's 10 rows are 5 per tp rank, 3 + 2 over dp (uneven); the
    # positional table's 7 rows split 4 + 3 over dp. ``scaled``: a parameter that TP leaves
    # alone (a per-logit scale, applied where the logits are whole on every tp rank), which
    # FSDP2 puts on the dp sub-mesh: each tp rank holds the same copy of it.
    def __init__(self, d: int = 8, h: int = 10, layers: int = 2, context: int = 7, scaled: bool = False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(context, d)
        self.layers = nn.ModuleList(Layer(d, h) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB, bias=False)
        self.scale = nn.Parameter(torch.ones(VOCAB)) if scaled else None

    def forward(self, idx):
        positions = torch.arange(idx.shape[1]).expand(idx.shape)
        x = self.tok(idx) + self.pos(positions)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.norm(x))
        return logits if self.scale is None else logits * self.scale


def plan(model: TinyLM) -> dict:
    """Megatron's pairing with sequence parallelism: the residual stream is split over the
    sequence (Shard(1)) between the layers' tensor-parallel parts."""
    out = {"tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
           "pos": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
           "norm": SequenceParallel(),
           "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    for i in range(len(model.layers)):
        out |= {f"layers.{i}.norm": SequenceParallel(),
                f"layers.{i}.up": ColwiseParallel(input_layouts=Shard(1)),
                f"layers.{i}.down": RowwiseParallel(output_layouts=Shard(1))}
    return out


def shard(model: TinyLM, mesh, dp: bool) -> None:
    """TP over mesh["tp"] (or the 1-D mesh), then FSDP2 over mesh["dp"] when ``dp``."""
    tp = mesh["tp"] if mesh.ndim == 2 else mesh
    parallelize_module(model, tp, plan(model))
    if dp:
        for layer in model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])


def batch(step: int):
    idx = torch.randint(0, VOCAB, (BATCH, T + 1), generator=torch.Generator().manual_seed(1000 + step))
    return idx[:, :-1], idx[:, 1:]


def loss_of(model, x, y):
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


def built(mesh, dp: bool, options: dict):
    torch.manual_seed(0)
    model = TinyLM(scaled=dp)
    init_weights_(model)
    ref = copy.deepcopy(model)
    shard(model, mesh, dp)
    # FSDP's wrapper classes must not change L; the paper's rule unless a case names a direction
    options = {"direction": "frobenius", "momentum": 0.0, **options, "depth": AGD(ref).depth}
    return model, ref, AGD(model, **options), AGD(ref, **options)


def step_both(model, ref, opt, ref_opt, step: int, dp_rank: int, dp_size: int, record: dict, counts: dict) -> None:
    x, y = batch(step)
    mine = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    opt.zero_grad()
    loss_of(model, x[mine], y[mine]).backward()
    record["grad_placements"] = {n: [str(pl) for pl in p.grad.placements] for n, p in model.named_parameters()}
    before = dict(counts)
    with Collectives() as seen:
        opt.step()
    record["paths"] = {k: record["paths"].get(k, 0) + counts[k] - before[k] for k in counts}
    record["collectives"].append(seen.calls)
    record["etas"].append(opt.eta.item())
    if ref is not None:
        ref_opt.zero_grad()
        for r in range(dp_size):
            s = slice(r * BATCH // dp_size, (r + 1) * BATCH // dp_size)
            (loss_of(ref, x[s], y[s]) / dp_size).backward()
        ref_opt.step()
        record["ref_etas"].append(ref_opt.eta.item())


def compare(model, ref, record: dict) -> dict:
    refs = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        full = p.full_tensor()
        record["errors"][n] = ((full - refs[n]).norm() / refs[n].norm()).item()
        record["shapes"][n] = dict(placements=[str(pl) for pl in p.placements], local=list(p.to_local().shape),
                                   full=list(p.shape), mesh=list(p.device_mesh.mesh_dim_names or ()))
    return record


def new_record() -> dict:
    return dict(etas=[], ref_etas=[], errors={}, shapes={}, collectives=[], paths={})


def run_case(spec: dict, mesh, dp_rank: int, dp_size: int, counts: dict) -> dict:
    model, ref, opt, ref_opt = built(mesh, dp_size > 1, spec["options"])
    record = new_record()
    record["n_blocks"] = ref_opt._structure_of()[1]
    for step in range(STEPS):
        step_both(model, ref, opt, ref_opt, step, dp_rank, dp_size, record, counts)
    return compare(model, ref, record)


def run_resume_save(mesh, rank: int, world: int, dp_rank: int, ckpt: Path, counts: dict) -> dict:
    """2 x 2: SAVE_AT steps, a DCP checkpoint, the remaining steps; records the final weights."""
    from torch_agd.train import fsdp
    from torch_agd.train.dist import DistEnv

    model, ref, opt, ref_opt = built(mesh, True, RESUME_OPTIONS)
    record = new_record()
    for step in range(STEPS):
        if step == SAVE_AT:
            fsdp.save_checkpoint(ckpt, model=model, optimizer=opt, epoch=1, metrics=[], env=DistEnv(rank, world))
        step_both(model, ref, opt, ref_opt, step, dp_rank, 2, record, counts)
    final = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(final, ckpt / "final_2x2.pt")
    return compare(model, ref, record)


def run_resume_load(mesh, rank: int, world: int, ckpt: Path, counts: dict) -> dict:
    """1 x 2 (FSDP2 over a dp dim of 1, TP over 2): load the 2 x 2 checkpoint, take the remaining
    steps, and compare with where the 2 x 2 run ended."""
    from torch_agd.train import fsdp

    mesh12 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    model, _, opt, _ = built(mesh12, True, RESUME_OPTIONS)
    fsdp.load_checkpoint(ckpt / "checkpoint", model=model, optimizer=opt)
    record = new_record()
    record["loaded_steps"] = None if opt.steps is None else int(opt.steps)
    for step in range(SAVE_AT, STEPS):
        step_both(model, None, opt, None, step, 0, 1, record, counts)
    final = torch.load(ckpt / "final_2x2.pt", weights_only=True)
    for n, p in model.named_parameters():
        full = p.full_tensor()
        record["errors"][n] = ((full - final[n]).norm() / final[n].norm()).item()
    return record


RESUME_OPTIONS = dict(momentum=0.9, direction="frobenius")

CASES_2x2 = {
    "frobenius": dict(options={}),
    "frobenius-momentum": dict(options=dict(momentum=0.9)),
    "frobenius-per-tensor": dict(options=dict(foreach=False, momentum=0.9)),
    "orthogonal": dict(options=dict(direction="orthogonal", momentum=0.9)),
}
CASES_TP = {
    "tp-frobenius": dict(options={}),
    "tp-frobenius-momentum-per-tensor": dict(options=dict(momentum=0.9, foreach=False)),
    "tp-orthogonal": dict(options=dict(direction="orthogonal", momentum=0.9)),
}


def main(out: str, ckpt: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a mismatch fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    counts = count_paths()
    ckpt = Path(ckpt)
    results = {}
    if world == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dp_rank = mesh.get_local_rank("dp")
        for name, spec in CASES_2x2.items():
            results[name] = run_case(spec, mesh, dp_rank, 2, counts)
        results["resume-save"] = run_resume_save(mesh, rank, world, dp_rank, ckpt, counts)
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        for name, spec in CASES_TP.items():
            results[name] = run_case(spec, mesh, 0, 1, counts)
        results["resume-load"] = run_resume_load(mesh, rank, world, ckpt, counts)
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if rank == 0:
        merged = {name: [r[name] for r in everyone] for name in results}
        Path(out).write_text(json.dumps({"world_size": world, "cases": merged}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
