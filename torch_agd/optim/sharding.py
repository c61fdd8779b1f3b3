"""Parameters sharded as DTensors (FSDP2, tensor parallelism, both): what this process holds of
each block, and one all-reduce.

AGD needs the norm of every whole block, and a block's squared norm is the sum of the squares of
its entries wherever they lie. So each process adds the sums of squares of the entries it holds
into the flat vector of blocks (foreach_plan.py) and one all-reduce of that vector, over every
process of the mesh, completes every norm: nothing else travels, and no parameter or gradient
is ever gathered. A tensor may be split on any dim over any mesh dims (Shard, and the
_StridedShard that FSDP2 puts on a tensor-parallel one):

- on a row dim (dim 0 under FSDP2, a ColwiseParallel Linear's out features, a RowwiseParallel
  embedding's rows) each process holds some rows, which fall in some of the blocks;
- on an inner dim (a RowwiseParallel Linear's in features, a ColwiseParallel embedding's
  columns) each process holds part of every row: partial sums, completed by the same all-reduce;
- on a kernel dim (a conv's k1, k2...) it would hold some blocks' kernel positions: refused.

A tensor replicated over a mesh dimension (Replicate, or a mesh dimension its sub-mesh does not
span: a norm that FSDP2 shards over dp only, beside a dp x tp model) is counted by the process at
coordinate 0 of that dimension only, so that the sum counts every entry once; G, and so eta,
then come out the same on every process.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UsageError


def is_sharded(t: Tensor) -> bool:
    # A DTensor exists only once its module is loaded (never, in a torch built without
    # distributed support); importing it here would cost every unsharded job 0.75 s of
    # start-up (it pulls in sympy and the meta registrations).
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


@dataclass(frozen=True)
class Held:
    """What this process holds of a DTensor parameter, in its blocks' terms."""
    r0: int             # first (flattened) row held
    n: int              # rows held (a contiguous run)
    inner: int          # entries of each row held per kernel position (all, unless an inner dim is split)
    contributes: bool   # False for a replica whose copy another process counts
    index: tuple        # per dim: the global indices held (a LongTensor), or None for all of them


def laid_out_as(p: Tensor, grad: Tensor) -> Tensor:
    """``grad`` with ``p``'s placements. FSDP2 reduce-scatters gradients into the parameters'
    layout, but tensor parallelism leaves each gradient as DTensor's backward made it (a
    RowwiseParallel embedding's comes out replicated, a SequenceParallel norm's Partial): taking
    its shard of a replicated gradient is a local slice, and only a Partial one costs a
    collective (an all-reduce, or a reduce-scatter into a shard) that completes it."""
    if not (is_sharded(p) and is_sharded(grad)) or tuple(grad.placements) == tuple(p.placements):
        return grad
    return grad.redistribute(p.device_mesh, p.placements)


def local(p: Tensor, grad: Tensor, name: str, row_dims: int, kernel_dims: int):
    """(local weight, local gradient, Held, mesh) for a DTensor parameter whose blocks read its
    first ``row_dims`` dims as rows and its last ``kernel_dims`` as kernel positions."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    if tuple(grad.placements) != placements:
        raise UsageError(f"the gradient of {name} is laid out as {grad.placements} but the parameter as "
                         f"{placements}: AGD steps sharded gradients laid out as their parameters")
    try:
        held = _held(tuple(p.shape), mesh, placements, row_dims, kernel_dims)
    except ValueError as e:
        raise UsageError(f"AGD cannot step {name}, placed as {placements}: {e}") from None
    return p.to_local(), grad.to_local(), held, mesh


def rows_held(p: Tensor, name: str, row_dims: int, kernel_dims: int) -> tuple[Tensor, int]:
    """(this process's part of the DTensor ``p``, the first of the rows it holds) for init_weights_,
    which writes whole rows: a one-line UsageError for a parameter split on an inner or kernel dim
    (tensor parallelism's RowwiseParallel) or holding rows that are not one run."""
    try:
        held = _held(tuple(p.shape), p.device_mesh, tuple(p.placements), row_dims, kernel_dims)
    except ValueError as e:
        raise UsageError(f"AGD cannot initialise {name}, placed as {tuple(p.placements)}: {e}") from None
    if any(index is not None for index in held.index[row_dims:]):
        raise UsageError(f"AGD initialises parameters split on their rows only (FSDP2's dim 0); {name} is placed as "
                         f"{tuple(p.placements)}, which splits it on an inner dim: initialise it before "
                         "parallelize_module")
    return p.to_local(), held.r0


@functools.lru_cache(maxsize=4096)
def _held(shape: tuple, mesh, placements: tuple, row_dims: int, kernel_dims: int) -> Held:
    """Worked out once per layout (a step asks every step): the indices come from DTensor's own
    arithmetic, so uneven and strided shards land where DTensor puts them."""
    index = _indices(shape, mesh, placements)
    ndim = len(shape)
    if any(index[d] is not None for d in range(ndim - kernel_dims, ndim)):
        raise ValueError("it is split on a kernel dim, which cuts its blocks' kernel positions apart; "
                         "shard it on its out or in channels")
    rows = torch.zeros(1, dtype=torch.int64)
    for d in range(row_dims):  # the flattened numbers of the rows held, in local order
        dim = torch.arange(shape[d]) if index[d] is None else index[d]
        rows = (rows[:, None] * shape[d] + dim[None, :]).reshape(-1)
    n = len(rows)
    r0 = int(rows[0]) if n else 0
    if n and not torch.equal(rows, torch.arange(r0, r0 + n)):
        split = [d for d in range(row_dims) if index[d] is not None]
        raise ValueError(f"it holds rows that are not one run of its {math.prod(shape[:row_dims])} rows "
                         f"(its blocks' rows are dims 0 to {row_dims - 1}, and it is split on {split}); "
                         "shard it on dim 0 or on an inner dim")
    inner = math.prod(len(index[d]) if index[d] is not None else shape[d] for d in range(row_dims, ndim - kernel_dims))
    return Held(r0, n, inner, _counts(mesh, placements), index)


def _indices(shape: tuple, mesh, placements: tuple) -> list:
    """Per dim of a tensor of ``shape``, the global indices this process holds, or None for all,
    applying the placements left to right as DTensor does."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets
    from torch.distributed.tensor.placement_types import _StridedShard

    coordinate = mesh.get_coordinate()
    local, index = list(shape), [None] * len(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, (Shard, _StridedShard)):
            raise ValueError(f"{placement!r} holds summands, not entries: AGD steps Shard and Replicate placements")
        d = placement.dim % len(shape)
        size, held = _get_shard_size_and_offsets(local[d], mesh.size(mesh_dim), coordinate[mesh_dim], placement,
                                                 index[d], shape[d], False)
        local[d] = size
        index[d] = held[:size].to(torch.int64)  # an empty shard's offset is a one-element marker
    return index


def _counts(mesh, placements: tuple) -> bool:
    """Whether this process counts its copy: it is at coordinate 0 of every mesh dim over which
    the tensor is replicated, and of every dim of the root mesh that its sub-mesh does not span
    (FSDP2 puts a tensor that tensor parallelism left whole on the dp sub-mesh of a dp x tp mesh:
    each tp rank holds the same copy)."""
    from torch.distributed.tensor import Replicate

    coordinate = mesh.get_coordinate()
    if any(isinstance(pl, Replicate) and coordinate[i] for i, pl in enumerate(placements)):
        return False
    root = _root(mesh)
    if root is mesh or root == mesh:
        return True
    here = _root_coordinate(root, mesh.get_rank())
    spanned = {i for r in mesh.mesh.flatten().tolist() for i, c in enumerate(_root_coordinate(root, r)) if c != here[i]}
    return all(c == 0 for i, c in enumerate(here) if i not in spanned)


def _root(mesh):
    return mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh


def _root_coordinate(root, rank: int) -> list[int]:
    return [int(c) for c in (root.mesh == rank).nonzero()[0]]


def reducer(meshes: list):
    """A function that sums a tensor over every process of the meshes (all of one root mesh,
    such as the dp x tp mesh and its dp sub-mesh), or None."""
    if not meshes:
        return None
    import torch.distributed as dist

    root = _root(meshes[0])
    if any(_root(m) != root for m in meshes[1:]):
        raise UsageError("AGD steps parameters sharded over one device mesh (and its sub-meshes); this model "
                         "uses several: give each mesh's parameters their own AGD")
    if root.size() == dist.get_world_size():
        group = None  # every process of the job
    elif root.ndim == 1:
        group = root.get_group()
    else:
        raise UsageError("AGD needs a 1-D device mesh, or one that spans every process of the job")

    def all_reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return all_reduce
