"""Parameters sharded by FSDP2 (DTensors): which rows this process holds, and one all-reduce.

AGD needs the norm of every whole block. Under `fully_shard` each process holds a slice of rows
(dim 0) of every parameter and of its gradient, so each adds the sums of squares of its own rows
into the flat vector of blocks (foreach_plan.py) and one all-reduce of that vector completes every
norm: nothing else travels, and no parameter or gradient is ever gathered. A tensor replicated
over a mesh dimension is counted by the process at coordinate 0 of that dimension only, so that
the sum counts every entry once; G, and so eta, then come out the same on every process.
"""
from __future__ import annotations

import math
import sys

from torch import Tensor

from ..errors import UsageError


def is_sharded(t: Tensor) -> bool:
    # A DTensor exists only once its module is loaded (never, in a torch built without
    # distributed support); importing it here would cost every unsharded job 0.75 s of
    # start-up (it pulls in sympy and the meta registrations).
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def rows_held(p: Tensor, name: str, row_dims: int) -> tuple[Tensor, int]:
    """(this process's shard of the DTensor ``p``, the first row it holds), rows being the
    parameter's first ``row_dims`` dims flattened; a one-line UsageError for a parameter not
    sharded on dim 0 alone (replicas hold the same rows)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in p.placements:
        if not (isinstance(placement, Replicate) or isinstance(placement, Shard) and placement.dim == 0):
            raise UsageError(f"AGD initialises parameters sharded on dim 0 (FSDP2's default); {name} is placed as "
                             f"{p.placements}: use fully_shard without a shard_placement_fn for it")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if row_dims == 0 or not shape[0]:
        return p.to_local(), 0
    return p.to_local(), offset[0] * math.prod(p.shape[1:row_dims])


def local(p: Tensor, grad: Tensor, name: str, row_dims: int):
    """(local weight, local gradient, first row held, rows held, whether this process counts the
    tensor, the mesh) for a DTensor parameter; rows are the parameter's first ``row_dims`` dims,
    flattened."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, p.placements
    if tuple(grad.placements) != tuple(placements):
        raise UsageError(f"the gradient of {name} is laid out as {grad.placements} but the parameter as "
                         f"{placements}: AGD steps FSDP2's sharded gradients (reshard them alike)")
    contributes = True
    for dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            contributes = contributes and mesh.get_local_rank(dim) == 0
        elif not (isinstance(placement, Shard) and placement.dim == 0):
            raise UsageError(f"AGD steps parameters sharded on dim 0 (FSDP2's default); {name} is placed as "
                             f"{placements}: use fully_shard without a shard_placement_fn for it")
    shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    if row_dims == 0:  # a 0-d parameter cannot be sharded; it is one row
        return p.to_local(), grad.to_local(), 0, 1, contributes, mesh
    per_dim0 = math.prod(p.shape[1:row_dims])
    r0 = offset[0] * per_dim0 if shape[0] else 0
    return p.to_local(), grad.to_local(), r0, shape[0] * per_dim0, contributes, mesh


def reducer(meshes: list):
    """A function that sums a tensor over every process of the meshes (all the same one), or None."""
    if not meshes:
        return None
    import torch.distributed as dist

    mesh = meshes[0]
    if any(m != mesh for m in meshes[1:]):
        raise UsageError("AGD steps parameters sharded over one device mesh; this model uses several: "
                         "give each mesh's parameters their own AGD")
    if mesh.ndim == 1:
        group = mesh.get_group()
    elif mesh.size() == dist.get_world_size():
        group = None  # every process of the job
    else:
        raise UsageError("AGD needs a 1-D device mesh, or one that spans every process of the job")

    def all_reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return all_reduce

