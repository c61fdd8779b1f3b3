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
from torch_agd.train import fsdp
from torch_agd.train.dist import DistEnv

ARCHS = ("charlm", "charlm-tied")  # and hf:NAME


def check(tp: int, arch: str, fsdp_on: bool, world_size: int) -> None:
    """--tp's one-line refusals, before joining the process group."""
    if tp == 1:
        return
    if tp < 1:
        raise UsageError(f"--tp must be at least 1, got {tp}")
    if world_size % tp:
        raise UsageError(f"--tp {tp} does not divide the {world_size} processes; use a divisor of {world_size}")
    if arch not in ARCHS and not arch.startswith("hf:"):
        raise UsageError(f"--tp splits transformer layers; --arch {arch} has none: use charlm, charlm-tied or hf:NAME")
    if not fsdp_on:
        raise UsageError("--tp shards the data-parallel dim with FSDP2 as well: add --fsdp")


def plan(model: nn.Module, arch: str, tp: int) -> dict:
    """parallelize_module's plan for ``model``: module path (with * for any layer) -> style."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if arch in ARCHS:
        return {"blocks.layers.*.linear1": ColwiseParallel(), "blocks.layers.*.linear2": RowwiseParallel()}
    config = model.model.config
    given = getattr(config, "base_model_tp_plan", None) or {}
    if not given:
        raise UsageError(f"--tp: transformers has no tensor-parallel plan for {arch}; run it without --tp")
    odd = sorted({style for style in given.values() if style not in ("colwise", "rowwise")})
    if odd:
        raise UsageError(f"--tp: {arch}'s tensor-parallel plan uses {', '.join(odd)}, which the trainer does not "
                         "build (colwise and rowwise only); run it without --tp")
    heads = {getattr(config, k, None) for k in ("num_attention_heads", "num_key_value_heads")} - {None}
    if any(h % tp for h in heads):
        raise UsageError(f"--tp {tp} must divide {arch}'s attention heads ({', '.join(map(str, sorted(heads)))}): "
                         "each tp rank computes whole heads")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    return {f"model.model.{path}": styles[style]() for path, style in given.items()}


def shard_model(model: nn.Module, env: DistEnv, tp: int, arch: str) -> None:
    """Split ``model``'s layers over tp, then FSDP2 over dp as --fsdp does (units, tied groups,
    the root). The model must be on env.device and initialised: its parameters are replaced."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh(env.device.type, (env.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], plan(model, arch, tp))
    # nn.TransformerEncoderLayer's fused inference kernel takes plain tensors, not the DTensor
    # weights of a split layer: evaluation takes the layer's ordinary path instead.
    torch.backends.mha.set_fastpath_enabled(False)
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
