"""AGD on models sharded by FSDP2 against the same models stepped in one process, for tests/test_fsdp.py.

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_driver.py OUT.json

Every case draws a model's weights (init_weights_), keeps a copy as the one-process reference,
applies fully_shard to each child that holds parameters and then to the root, and steps AGD
STEPS times on both: the sharded model on each rank's slice of a global batch, the reference on
the gradient the ranks compute together, the mean over the global batch as the mean of each
slice's mean (with BatchNorm, each slice normalised by its own statistics, as on the ranks).
During every opt.step() of the sharded model a TorchDispatchMode records every collective
that any code issues (c10d and functional collectives, DTensor's included). Rank 0 writes, per
case, what every rank saw: its eta at each step, the reference's, each parameter's relative
distance from the reference after the last step and how far it moved (relative; absolute for
one that started at zero), the collectives of each
step, which implementation (foreach or per tensor) stepped, and the local and global shapes.
The driver carries the test harness; torch_agd carries none.
"""

from __future__ import annotations

import copy
import datetime
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils._python_dispatch import TorchDispatchMode

import torch_agd.optim.functional as optim_module
from torch_agd import AGD, init_weights_

STEPS = 15
BATCH = 12  # global: 6 samples per rank on 2 ranks
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_dtensor")


def mlp() -> nn.Module:
    # Biases, LayerNorm, odd row counts (13 and 7 rows split 7 + 6 and 4 + 3) and a 1-row head
    # that leaves rank 1 of 2 an empty shard. Blocks: 1 + 1 (the LayerNorm) + 1 + 1.
    return nn.Sequential(nn.Linear(10, 13), nn.LayerNorm(13), nn.ReLU(), nn.Linear(13, 7), nn.ReLU(),
                         nn.Linear(7, 1, bias=False))


def convnet() -> nn.Module:
    # Conv weights sharded on dim 0 (out channels, 5 rows split 3 + 2), a conv bias (before the
    # ReLU: a bias that BatchNorm follows gets no gradient), BatchNorm with affine parameters.
    # Blocks: 9 (one per kernel position) + 5 + 9 + 1.
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(5),
                         nn.Conv2d(5, 7, 3, stride=2, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(7, 3))


def tied_lm() -> nn.Module:
    # A transformer layer (packed q, k, v), an embedding whose weight is the head's (tied: the
    # trainer's policy shards the two as one group), a positional parameter of one row (dim 0
    # has size 1: rank 1 of 2 holds none of it).
    from torch_agd.models.charlm import CharLM

    return CharLM(VOCAB, dim=8, layers=1, heads=2, context=6, tied=True)


VOCAB = 20


def floats(in_shape: tuple, outputs: int):
    return lambda g: (torch.randn(BATCH, *in_shape, generator=g), torch.randn(BATCH, outputs, generator=g))


def tokens(g):
    idx = torch.randint(0, VOCAB, (BATCH, 7), generator=g)
    return idx[:, :-1], idx[:, 1:]


def mse(out, target):
    return (out.float() - target).square().mean()


def xent(out, target):
    return nn.functional.cross_entropy(out.float().flatten(0, 1), target.flatten())


MODELS = {"mlp": (mlp, floats((10,), 1), mse), "conv": (convnet, floats((3, 6, 6), 3), mse),
          "tied-lm": (tied_lm, tokens, xent)}  # builder, a global batch from a generator, loss

CASES = {
    "mlp": dict(model="mlp"),                        # AGD's defaults: the foreach path
    "mlp-per-tensor": dict(model="mlp", foreach=False),
    "mlp-momentum": dict(model="mlp", momentum=0.9),
    "conv": dict(model="conv"),
    "conv-per-tensor": dict(model="conv", foreach=False),
    "mlp-bf16": dict(model="mlp", bf16=True),        # MixedPrecisionPolicy(bf16 params, fp32 reduce)
    "mlp-hsdp": dict(model="mlp", hsdp=True),        # a (replicate, shard) mesh of (2, 1): HSDP
    # Sharded by torch_agd.train.fsdp.shard_model as the trainer shards it, with the L of the
    # unsharded model given explicitly (the sharded model must infer the same).
    "tied-lm": dict(model="tied-lm", trainer_policy=True, depth_of_the_unsharded_model=True),
    # direction="orthogonal": each matrix's direction is all-gathered and orthogonalised whole
    "mlp-orthogonal": dict(model="mlp", momentum=0.9, direction="orthogonal"),
    "conv-orthogonal-per-tensor": dict(model="conv", foreach=False, direction="orthogonal"),
    "tied-lm-orthogonal": dict(model="tied-lm", trainer_policy=True, depth_of_the_unsharded_model=True,
                               direction="orthogonal"),
    "mlp-hsdp-orthogonal": dict(model="mlp", hsdp=True, direction="orthogonal"),
    # each conv group's filters gathered and orthogonalised whole, as one flattened matrix
    "conv-orthogonal-flattened": dict(model="conv", direction="orthogonal-flattened"),
}


class Collectives(TorchDispatchMode):
    """Every collective op dispatched while active: (op, [(shape, dtype) of each tensor argument])."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in COLLECTIVE_NAMESPACES:
            flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
            self.calls.append((str(func), [(list(t.shape), str(t.dtype)) for t in flat if isinstance(t, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def count_paths() -> dict:
    """Count the calls of AGD's two implementations (wrapped in this process only)."""
    counts = {"foreach": 0, "per_tensor": 0}
    for name, key in (("_multi_tensor_agd", "foreach"), ("_single_tensor_agd", "per_tensor")):
        inner = getattr(optim_module, name)

        def counted(*args, _inner=inner, _key=key, **kwargs):
            counts[_key] += 1
            return _inner(*args, **kwargs)

        setattr(optim_module, name, counted)
    return counts


def run_case(name: str, spec: dict, rank: int, world: int, meshes: dict, counts: dict) -> dict:
    build, batch, loss = MODELS[spec["model"]]
    torch.manual_seed(0)
    model = build()
    init_weights_(model)
    ref = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if spec.get("bf16") else None
    mesh = meshes["hsdp" if spec.get("hsdp") else "fsdp"]
    kwargs = dict(mesh=mesh) if policy is None else dict(mesh=mesh, mp_policy=policy)
    if spec.get("trainer_policy"):
        from torch_agd.train import fsdp
        from torch_agd.train.dist import DistEnv

        fsdp.shard_model(model, DistEnv(rank=rank, world_size=world))
    else:
        for child in model.children():
            if next(child.parameters(), None) is not None:
                fully_shard(child, **kwargs)
        fully_shard(model, **kwargs)
    # the paper's rule, momentum 0, unless a case says otherwise (AGD's defaults are the orthogonal
    # direction with momentum 0.9)
    options = {"direction": "frobenius", "momentum": 0.0,
               **{k: spec[k] for k in ("foreach", "momentum", "direction") if k in spec}}
    if spec.get("depth_of_the_unsharded_model"):
        options["depth"] = AGD(ref).depth
    opt, ref_opt = AGD(model, **options), AGD(ref, **options)
    paths = {"foreach": 0, "per_tensor": 0}

    etas, ref_etas, collectives, grad_dtypes = [], [], [], set()
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 + step)
        x, t = batch(g)
        slices = [slice(r * BATCH // world, (r + 1) * BATCH // world) for r in range(world)]

        opt.zero_grad()
        loss(model(x[slices[rank]]), t[slices[rank]]).backward()
        grad_dtypes |= {str(p.grad.dtype) for p in model.parameters()}
        before = dict(counts)
        with Collectives() as seen:
            opt.step()
        paths = {k: paths[k] + counts[k] - before[k] for k in paths}
        collectives.append(seen.calls)
        etas.append(opt.eta.item())

        ref_opt.zero_grad()
        if policy is None:
            for s in slices:
                (loss(ref(x[s]), t[s]) / world).backward()
        else:  # what each rank computes: bf16 copies of the weights and activations, fp32 sums
            low = copy.deepcopy(ref).to(torch.bfloat16)
            for s in slices:
                low.zero_grad()
                loss(low(x[s].to(torch.bfloat16)), t[s]).backward()
                for p, q in zip(ref.parameters(), low.parameters(), strict=True):
                    p.grad = q.grad.float() / world if p.grad is None else p.grad + q.grad.float() / world
        ref_opt.step()
        ref_etas.append(ref_opt.eta.item())

    errors, moved, shapes = {}, {}, {}
    refs = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        full = p.full_tensor()  # after the last step, outside the recorded steps
        errors[n] = ((full - refs[n]).norm() / refs[n].norm()).item()
        moved[n] = ((full - start[n]).norm() / (start[n].norm() if start[n].any() else 1)).item()
        shapes[n] = dict(type=type(p).__name__, dtype=str(p.dtype), local_dtype=str(p.to_local().dtype),
                         placements=[f"{type(pl).__name__}({getattr(pl, 'dim', '')})" for pl in p.placements], local=list(p.to_local().shape),
                         full=list(p.shape))
    return dict(etas=etas, ref_etas=ref_etas, errors=errors, moved=moved, shapes=shapes, collectives=collectives,
                paths=paths, grad_dtypes=sorted(grad_dtypes))


class UnevenSplit:
    """A stand-in test split whose ranks hold different numbers of batches: what the trainer's
    evaluation must survive under FSDP. ``bounds``: rank -> its batches' [start, end) samples."""

    def __init__(self, x, y, bounds):
        self.x, self.y, self.bounds = x, y, bounds.get

    def num_batches(self, batch_size, *, rank=0, world_size=1):
        return len(self.bounds(rank))

    def batches(self, batch_size, *, rank=0, world_size=1):
        return ((self.x[a:b], self.y[a:b]) for a, b in self.bounds(rank))


# Rank 0 holds 3 batches and rank 1 holds 2; or rank 1 holds none (fewer samples than ranks).
LOCKSTEP = {"lockstep": {0: [(0, 4), (4, 8), (8, 9)], 1: [(9, 13), (13, 17)]},
            "lockstep-empty-rank": {0: [(0, 9), (9, 17)], 1: []}}


def run_lockstep(rank: int, world: int, mesh, bounds: dict) -> dict:
    """The trainer's evaluation (evaluate over fsdp.in_lockstep) on uneven shards: the summed
    totals against one process evaluating every sample."""
    from torch_agd.train import fsdp
    from torch_agd.train.dist import DistEnv
    from torch_agd.train.loop import evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 13), nn.ReLU(), nn.Linear(13, 3))
    ref = copy.deepcopy(model)
    for child in model.children():
        if next(child.parameters(), None) is not None:
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(17, 10, generator=g), torch.randint(0, 3, (17,), generator=g)
    split = UnevenSplit(x, y, bounds)
    env = DistEnv(rank=rank, world_size=world)
    batches = fsdp.in_lockstep(split.batches(0, rank=rank), model, split, 0, env)
    totals = evaluate(model, batches, loss_fn=nn.functional.cross_entropy, device=torch.device("cpu"))
    dist.all_reduce(totals)
    alone = evaluate(ref, [(x, y)], loss_fn=nn.functional.cross_entropy, device=torch.device("cpu"))
    return dict(totals=totals.tolist(), alone=alone.tolist())


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a mismatch fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    meshes = {"fsdp": init_device_mesh("cpu", (world,)),
              "hsdp": init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))}
    counts = count_paths()
    results = {name: run_case(name, spec, rank, world, meshes, counts) for name, spec in CASES.items()}
    for name, bounds in LOCKSTEP.items():
        results[name] = run_lockstep(rank, world, meshes["fsdp"], bounds)
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if rank == 0:
        merged = {name: [r[name] for r in everyone] for name in results}
        with open(out, "w") as f:
            json.dump({"world_size": world, "cases": merged}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
