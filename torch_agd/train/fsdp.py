"""`agd train --fsdp`: FSDP2 (`fully_shard`) in place of DDP, and its sharded checkpoints.

Under DDP every rank holds the whole model, its gradients and the optimizer state. Under FSDP2
each of N ranks holds 1/N of the rows of every parameter, of its gradient and of the optimizer
state built on it; a unit's parameters are all-gathered for its forward and backward and freed
after, and the gradients are reduce-scattered (averaged) straight into the shards. AGD steps the
shards where they are: one all-reduce of the squared block norms per step (torch_agd/shard.py).

Three things differ from a DDP run (docs/distributed.md, "FSDP2"):

- the model (`shard_model`): with AGD built on the meta device and initialised on the shards
  (train/meta.py), with the other optimizers drawn whole, on the CPU from the seed, as always;
  `fully_shard` wraps every unit (`units`) and the root, which replaces the parameters with
  DTensors, so the trainer builds the optimizer after sharding, on those.
- evaluation (`in_lockstep`): a sharded forward is a collective, so every rank must run as many
  forwards as the rank with the most test batches; the others run the missing ones on an empty
  batch, which counts nothing.
- checkpoints (`save_checkpoint`, `load_checkpoint`): DIR/checkpoint/, a
  torch.distributed.checkpoint directory in which every rank writes its own shards, plus
  train_state.pt (epoch, metrics, RNG state) from rank 0. DCP records each shard's place in the
  whole tensor, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import collections
import io
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from torch_agd.atomic import atomic_write_bytes
from torch_agd.errors import UsageError
from torch_agd.train import checkpoint as ckpt
from torch_agd.train import rundir
from torch_agd.train.dist import DistEnv

# What --fsdp can shard: the optimizers that step DTensor shards as they step whole tensors
# (tested against one process on 2 gloo ranks). agd+adamw checkpoints both its parts.
SHARDABLE = ("agd", "adam", "adamw", "sgd", "agd+adamw", "schedulefree")
# The peers whose packages cannot train FSDP2 shards, and why (measured with prodigyopt 1.1.2,
# dadaptation 3.2 and dog-optimizer 1.0.3 on 2 gloo ranks): Prodigy and D-Adaptation flatten every
# parameter, which DTensor refuses for a shard of unequal length (a dimension 0 that N does not
# divide), and all-reduce their sums only for FSDP1's flat parameters (fsdp_in_use); DoG steps
# shards correctly but cannot be checkpointed by DCP.
UNSHARDABLE_PEERS = {
    "dog": "dog-optimizer puts a flag (_first_step) among its state dict's per-parameter entries, which "
           "torch.distributed.checkpoint cannot name, so a sharded run could not save its checkpoint",
    "prodigy": "prodigyopt flattens each parameter (p.flatten()), which DTensor cannot do for FSDP2's "
               "unequal shards, and all-reduces its sums only for FSDP1's flat parameters",
    "dadapt-adam": "dadaptation flattens each gradient (grad.flatten()), which DTensor cannot do for FSDP2's "
                   "unequal shards, and all-reduces its sums only for FSDP1's flat parameters",
}

# Inside DIR/checkpoint/: what is not a tensor (epoch, metrics, RNG state), from rank 0.
TRAIN_STATE = "train_state.pt"

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _block(module: nn.Module) -> bool:
    """A module made of layers that hold parameters (a leaf layer, such as nn.Linear, is none)."""
    return any(_holds_parameters(child) for child in module.children())


def _stack(module: nn.Module) -> bool:
    """Whether ``module`` holds, in a container, two or more blocks of one class: a transformer's
    encoder (nn.TransformerEncoder, torchvision's ViT Encoder), not an MLP's Sequential of layers.
    Its blocks are the units, so that one block, not the whole stack, is gathered at a time."""
    for child in module.children():
        if isinstance(child, _CONTAINERS):
            kinds = collections.Counter(type(m) for m in child.children() if _block(m))
            if any(n >= 2 for n in kinds.values()):
                return True
    return False


def units(model: nn.Module) -> list[nn.Module]:
    """The modules that `fully_shard` wraps below the root, each one all-gather per forward:
    descending through containers (Sequential, ModuleList, ModuleDict) and stacks of blocks,
    every other module that holds parameters, whole: a layer of the FCN or VGG, a residual
    block of a ResNet, a transformer layer. (A parameter of a stack itself, such as a ViT's
    positional embedding, is left to the root.)"""
    found = []
    for child in model.children():
        if isinstance(child, _CONTAINERS) or _stack(child):
            found += units(child)
        elif _holds_parameters(child):
            found.append(child)
    return found


def _tied(found: list[nn.Module]) -> list[list[nn.Module]]:
    """The units grouped so that units sharing a parameter (tied weights: an embedding and the
    head) are one group: FSDP2 shards a parameter in one group only."""
    groups: list[tuple[list[nn.Module], set[int]]] = []
    for unit in found:
        ids = {id(p) for p in unit.parameters()}
        shared = [g for g in groups if g[1] & ids]
        groups = [g for g in groups if not g[1] & ids]
        groups.append(([m for g in shared for m in g[0]] + [unit], ids.union(*(g[1] for g in shared))))
    return [modules for modules, _ in groups]


def shard_model(model: nn.Module, env: DistEnv) -> None:
    """fully_shard every unit (units with tied weights together), then the root (which takes any
    parameter left), over a 1-D mesh of every rank. The model must be on env.device and
    initialised (or, built on the meta device, still on it: train/meta.py): its parameters are replaced."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for group in _tied(units(model)):
        fully_shard(group if len(group) > 1 else group[0], mesh=mesh)
    fully_shard(model, mesh=mesh)


def in_lockstep(batches, model: nn.Module, split, batch_size: int, env: DistEnv):
    """This rank's test ``batches``, then forwards of an empty batch until it has run as many
    forwards as the rank with the most batches: each forward all-gathers parameters, and a rank
    that stopped early would leave the others waiting. The empty forwards yield nothing, so
    the metrics are those of the real batches alone."""
    counts = [split.num_batches(batch_size, rank=r, world_size=env.world_size) for r in range(env.world_size)]
    x = None
    for x, y in batches:
        yield x, y
    missing = max(counts) - counts[env.rank]
    if missing and x is None:  # no test sample here: empty batches shaped like (and typed as) another rank's
        x = next(iter(split.batches(batch_size, rank=counts.index(max(counts)), world_size=env.world_size)))[0]
    for _ in range(missing):
        model(x[:0])


# ------------------------------------------------------------------------ checkpoints
#
# Written atomically as a directory: every rank writes into DIR/checkpoint.tmp/, rank 0 adds
# train_state.pt last, then renames the last checkpoint to DIR/checkpoint.old/, the new one to
# DIR/checkpoint/, and deletes the old one. A kill at any moment leaves a complete checkpoint:
# DIR/checkpoint/, or, between the two renames, DIR/checkpoint.old/. A .tmp directory is never
# read, and the next save starts it afresh.


def _paths(out: Path) -> tuple[Path, Path, Path]:
    final = out / rundir.CHECKPOINT_DIR
    return final, final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")


def _complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file()


def checkpoint_path(out: Path, *, sharded: bool, resuming: bool = True) -> Path:
    """Where the run's last complete checkpoint is, or goes: DIR/checkpoint.pt, or for --fsdp
    DIR/checkpoint/ (DIR/checkpoint.old/ if a save was killed between its renames). When
    resuming, a run directory holding only the other kind is a UsageError: the run would
    start afresh and overwrite its metrics."""
    final, _, old = _paths(out)
    if not sharded:
        path, other = out / rundir.CHECKPOINT, final
    else:
        path, other = (old if resuming and not final.exists() and _complete(old) else final), out / rundir.CHECKPOINT
    if resuming and other.exists() and not path.exists():
        made, now = ("without", "with") if sharded else ("with", "without")
        raise UsageError(f"{out} holds {other.name}, written {made} --fsdp, but its config.json asks for a run "
                         f"{now} --fsdp: set fsdp back to {str(not sharded).lower()} in config.json to resume it")
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parts(optimizer, model: nn.Module) -> tuple:
    """The torch optimizers inside ``optimizer`` that hold parameters of ``model``: a
    Composite's parts (agd+adamw), whose states DCP keys by parameter name into one, or the
    optimizer itself. (agd+adamw on a model without biases or norms gives AdamW a stand-in
    tensor of its own, which has no name in the model and no state.)"""
    ours = {id(p) for p in model.parameters()}
    parts = getattr(optimizer, "parts", {"": optimizer}).values()
    return tuple(o for o in parts if any(id(p) in ours for g in o.param_groups for p in g["params"]))


def save_checkpoint(out: Path, *, model: nn.Module, optimizer, epoch: int, metrics: list[dict], env: DistEnv,
                    scheduler=None) -> None:
    """Every rank writes its shards of the model and optimizer state (a collective); see above."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp, old = _paths(out)
    if env.is_master:
        shutil.rmtree(tmp, ignore_errors=True)  # what a save killed half-way left
    env.barrier()
    model_state, optim_state = get_state_dict(model, _parts(optimizer, model))
    # Returns on every rank once rank 0 has written .metadata, after every rank's shards.
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if env.is_master:
        buffer = io.BytesIO()
        train_state = {"epoch": epoch, "metrics": metrics, "rng": ckpt.rng_state()}
        if scheduler is not None:  # the same on every rank: rank 0's is the run's
            train_state["scheduler"] = scheduler.state_dict()
        torch.save(train_state, buffer)
        atomic_write_bytes(tmp / TRAIN_STATE, buffer.getvalue())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # left by a save killed while deleting it
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(out)
        shutil.rmtree(old, ignore_errors=True)  # a leftover is deleted by the next save
    env.barrier()  # no rank reads or writes the directory before it is in place


def load_checkpoint(path: Path, *, model: nn.Module, optimizer) -> dict:
    """Load the shards this rank holds now (on any number of ranks) into ``model`` and
    ``optimizer`` (a collective); returns train_state.pt: epoch, metrics, rng (and scheduler)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    # The templates DCP loads into; for a fresh optimizer get_state_dict first creates its state
    # with a step of zero gradients at lr 0, which moves no weight.
    model_state, optim_state = get_state_dict(model, _parts(optimizer, model))
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    # Not strict: AGD without momentum keeps no state per parameter (its counters live in the
    # first parameter's), which the strict check takes for missing state.
    set_optimizer_state_dict(model, _parts(optimizer, model), state["optimizer"], options=StateDictOptions(strict=False))
    return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
