"""Meta-device init under FSDP2 against the unsharded init, for tests/test_meta_init.py.

    python -m torch.distributed.run --nproc_per_node=2 tests/meta_init_driver.py OUT.json

For every model below each rank builds it on the meta device, shards it as `agd train --fsdp`
does (torch_agd.train.fsdp.shard_model), allocates its shards (to_empty) and initialises them
with init_weights_ after torch.manual_seed(SEED) (and, as the trainer does, with the seed set
before the build instead: torch_agd/train/meta.py keeps the generator in step); then it gathers
every parameter whole (full_tensor), with the buffers, and compares them, bitwise, with
init_weights_ of the same model built on the CPU from the same seed; and it compares the
generator's state after each init (every process draws every number, so the generator must end
where the unsharded init leaves it). Rank 0 writes, per case and per rank, the tensors that
differ and whether the generator states agree.
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from torch_agd import init_weights_
from torch_agd.models.charlm import CharLM
from torch_agd.models.fcn import FCN
from torch_agd.models.resnet import PreActBlock
from torch_agd.train import fsdp, meta
from torch_agd.train.dist import DistEnv

SEED = 3


def convnet() -> nn.Module:
    # kernel positions (9 blocks per conv), 5 and 7 rows split 3 + 2 and 4 + 3, a conv bias,
    # BatchNorm with affine parameters, a wide block (5 x 27 is not tall), a linear head
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(5),
                         nn.Conv2d(5, 7, 3, stride=2, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(7, 3))


# Odd sizes on purpose: rows split unevenly, blocks whose numbers are not a multiple of 16 and of
# odd count (the QR of such a block depends on where it sits in the batch), a 1-row head.
MODELS = {
    "fcn": lambda: FCN(13, 1, depth=4, width=37),
    "conv": convnet,
    # float64 keeps the last bits of the QR, which float32 rounds away: a 7 x 5 block factorised
    # away from its place in the batch differs in them
    "conv-float64": lambda: convnet().double(),
    "resnet": lambda: nn.Sequential(PreActBlock(3, 6, stride=2), PreActBlock(6, 6)),  # BatchNorm buffers
    "charlm": lambda: CharLM(29, dim=24, layers=2, heads=2, context=6),
    "charlm-tied": lambda: CharLM(31, dim=20, layers=1, heads=2, context=5, tied=True),
}


def sharded_init(build, env: DistEnv, seed_before_build: bool) -> nn.Module:
    """As `agd train --fsdp` builds: seeded before the build (the trainer's order: the meta build
    must move the generator as a CPU build does), or right before init_weights_."""
    if seed_before_build:
        torch.manual_seed(SEED)
    model, why = meta.build_on_meta(build)
    assert why is None and meta.why_not(model) is None, why or meta.why_not(model)
    fsdp.shard_model(model, env)
    model.to_empty(device="cpu")
    meta.reset_constants_(model)
    if not seed_before_build:
        torch.manual_seed(SEED)
    init_weights_(model)
    return model


def compare(build, env: DistEnv, seed_before_build: bool) -> dict:
    torch.manual_seed(SEED)  # the unsharded init from the same seed, in this process
    whole = build()
    if not seed_before_build:
        torch.manual_seed(SEED)
    init_weights_(whole)
    expected_state = torch.get_rng_state()
    model = sharded_init(build, env, seed_before_build)
    same_state = torch.equal(torch.get_rng_state(), expected_state)
    reference = {**dict(whole.named_parameters()), **dict(whole.named_buffers())}
    gathered = {name: p.full_tensor() for name, p in model.named_parameters()}
    gathered.update(model.named_buffers())  # FSDP2 leaves buffers whole on every rank
    differ = [name for name, t in gathered.items() if not torch.equal(t, reference[name])]
    return {"names": sorted(gathered), "expected": sorted(reference), "differ": differ, "same_generator": same_state,
            "local_rows": {name: p.to_local().shape[0] if p.dim() else 1 for name, p in model.named_parameters()}}


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    env = DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size())
    results = {f"{name}{'-seeded-before-build' if before else ''}": compare(build, env, before)
               for name, build in MODELS.items() for before in (False, True)}
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, results)
    if env.rank == 0:
        with open(out, "w") as f:
            json.dump({"world_size": env.world_size, "ranks": everyone}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
