"""`agd train --tp N`: tensor parallelism inside each transformer layer, FSDP2 across them.

The processes form a 2-D mesh, dp = world / N by tp = N (rank = dp_rank * N + tp_rank). Within a
layer, Megatron's pairing splits the weights over tp: a ColwiseParallel Linear holds a slice of
the output features (rows, Shard(0)), the RowwiseParallel Linear after it a slice of the input
features (columns, Shard(1)); the activation between them stays split, and one all-reduce per
pair makes the output whole again. Then FSDP2 shards every unit and the root over dp, exactly as
`--fsdp` does (train/fsdp.py), which also holds what TP leaves whole (embeddings, norms, a
positional parameter) as dp shards. AGD steps all of it with one all-reduce of its block norms
(optim/sharding.py). The tp ranks of one dp group work on the same data: the data and the
evaluation sums are split over dp only (``data_env``).

What is split, per model:
- charlm: each layer's MLP (linear1 colwise, linear2 rowwise). Its attention is
  nn.MultiheadAttention, whose forward reads the packed in_proj_weight and out_proj.weight
  directly rather than calling Linear modules, so parallelize_module cannot split it: attention
  runs replicated on the tp ranks (and is sharded over dp by FSDP2 like everything else).
- hf:NAME: transformers' own plan for the model type (config.base_model_tp_plan: q, k, v and the
  MLP's gate/up colwise, o_proj and down rowwise for Llama), where it uses only colwise and
  rowwise; a model type without one, or with other styles, is refused.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from torch_agd.errors import UsageError
from torch_agd.models.libraries import HEAD_DIM, _load
from torch_agd.train import fsdp
from torch_agd.train.dist import DistEnv

ARCHS = ("charlm", "charlm-tied")  # and hf:NAME
STYLES = ("colwise", "rowwise")  # the styles of transformers' plans that the trainer builds


def check(config, world_size: int) -> None:
    """--tp's one-line refusals, before joining the process group (``config``: a TrainConfig)."""
    tp, arch = config.tp, config.arch
    if tp == 1:
        return
    if tp < 1:
        raise UsageError(f"--tp must be at least 1, got {tp}")
    if world_size % tp:
        raise UsageError(f"--tp {tp} does not divide the {world_size} processes; use a divisor of {world_size}")
    if arch not in ARCHS and not arch.startswith("hf:"):
        raise UsageError(f"--tp splits transformer layers; --arch {arch} has none: use charlm, charlm-tied or hf:NAME")
    if not config.fsdp:
        raise UsageError("--tp shards the data-parallel dim with FSDP2 as well: add --fsdp")
    if arch.startswith("hf:"):
        _check_hf(arch, tp, heads=config.width // HEAD_DIM)


def _check_hf(arch: str, tp: int, heads: int) -> None:
    """transformers' plan for the model type exists and uses only the two styles built here,
    and tp divides the heads (an hf: model has width / HEAD_DIM of them, as many key/value heads)."""
    CONFIG_MAPPING = _load("transformers").CONFIG_MAPPING
    name = arch[len("hf:"):]
    given = getattr(CONFIG_MAPPING[name], "base_model_tp_plan", None) if name in CONFIG_MAPPING else None
    if not given:
        raise UsageError(f"--tp: transformers has no tensor-parallel plan for {arch}; run it without --tp")
    odd = sorted({style for style in given.values() if style not in STYLES})
    if odd:
        raise UsageError(f"--tp: {arch}'s tensor-parallel plan uses {', '.join(odd)}, which the trainer does not "
                         "build (colwise and rowwise only); run it without --tp")
    if heads % tp:
        raise UsageError(f"--tp {tp} must divide {arch}'s {heads} attention heads (--width / {HEAD_DIM}): "
                         "each tp rank computes whole heads")


def plan(model: nn.Module, arch: str) -> dict:
    """parallelize_module's plan for ``model``: module path (with * for any layer) -> style."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if arch in ARCHS:
        return {"blocks.layers.*.linear1": ColwiseParallel(), "blocks.layers.*.linear2": RowwiseParallel()}
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    given = model.model.config.base_model_tp_plan  # checked by _check_hf
    return {f"model.model.{path}": styles[style]() for path, style in given.items()}


def shard_model(model: nn.Module, env: DistEnv, tp: int, arch: str) -> None:
    """Split ``model``'s layers over tp, then FSDP2 over dp as --fsdp does (units, tied groups,
    the root). The model must be on env.device and initialised: its parameters are replaced."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh(env.device.type, (env.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], plan(model, arch))
    for group in fsdp._tied(fsdp.units(model)):
        fully_shard(group if len(group) > 1 else group[0], mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])


@dataclasses.dataclass
class DataParallel(DistEnv):
    """The trainer's view of the job for data and metrics under --tp: one process per dp group
    (rank = dp rank, world size = dp), whose sums run over the dp group: the tp ranks of a group
    hold the same batches, and summing over them too would count every sample tp times."""
    group: object = None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


def data_env(model: nn.Module, env: DistEnv, tp: int) -> DistEnv:
    """``env`` for splitting data and summing metrics: itself without --tp, else the dp view."""
    if tp == 1:
        return env
    mesh = next(model.parameters()).device_mesh
    root = mesh._get_root_mesh()
    dp = root["dp"]
    return DataParallel(dp.get_local_rank(), dp.size(), env.local_rank, env.device, env.sharded, group=dp.get_group())
