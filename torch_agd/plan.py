"""How the fast path lays out one bucket of same-device, same-dtype weights.

A step needs one norm per submatrix and then one factor per submatrix applied to the gradient.
Working that out (which tensors are single submatrices, which views give the CPU a long inner
loop, where each factor goes) is pure shape arithmetic, so it is done once per layout and cached:
the step itself then runs a fixed, short list of tensor ops.

All norms of a bucket live in one flat vector, tensor by tensor. `expand` maps that vector (once
it holds factors) to the concatenation of every tensor's factor view, so one index_select and
one split hand each tensor its factors.
"""
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .scale import kernel_shape, num_submatrices, scale

# Below this many elements a conv weight is handled as (d_out, d_in, kernel) directly: views and
# chunking cost more than they save.
_ROWS_MIN = 1 << 16
# Bytes of the CPU accumulator for squared gradients: small enough to stay in a core's L2 cache,
# so squaring costs one read of the gradient and no write to memory.
_ACC_BYTES = 1 << 20


@dataclass
class Plan:
    single: list       # positions (in the bucket) of single-submatrix tensors, normed by foreach
    dots: list         # the others of them: host, contiguous, accumulate in their own dtype
    columns: dict      # position -> rows_view of the other tensors: CPU one-read norms if not None
    scales: Tensor     # s(W) per submatrix, flat (bucket) order
    coef: Tensor       # gain * s(W) / L per submatrix, flat order
    expand: Tensor     # flat factor index of every element of every factor view (None where
                       # that is the flat vector itself: no row views)
    splits: list       # length of each tensor's factor view
    views: list        # per tensor: (perm, weight rows shape or None, factor view shape)
    workspace: Tensor | None  # CPU accumulator of _ACC_BYTES for column_norms, kept between steps
                              # so that it is not page-faulted in afresh every step


def signature(ws, gs, gains, depth):
    """What a cached plan depends on; anything else about the tensors may change freely."""
    return depth, tuple((w.shape, w.stride(), g.stride(), gain) for w, g, gain in zip(ws, gs, gains))


def rows_view(t):
    """How to view a large conv weight or gradient as (rows, cols) with a long inner loop, as
    (perm, rows, cols, positions_inner): t.permute(perm).view(rows, cols) holds kernel position
    j % K (positions_inner) or j // d_in (channels_last) in column j. None where that does not pay.

    Broadcasting a (1, 1, k1, k2) factor over a conv weight runs about 7x slower on the CPU than
    a plain multiply, since the inner loop is only k2 long; rows of whole runs of the K positions,
    times the K factors repeated along the row, do the same arithmetic with a long inner loop.
    """
    k = num_submatrices(t.shape)
    if t.numel() < _ROWS_MIN or k == 1:
        return None
    if t.is_contiguous():  # (d_out, d_in, kernel...): rows of m runs of K, m | d_out * d_in
        m = math.gcd(t.shape[0] * t.shape[1], 64)
        while m > 1 and m * k > 4096:  # long enough already; keeps the factor index small
            m //= 2
        return None, t.numel() // (m * k), m * k, True
    perm = (0, *range(2, t.dim()), 1)
    if t.permute(perm).is_contiguous():  # channels_last: (d_out, kernel..., d_in) in memory
        return perm, t.shape[0], t.numel() // t.shape[0], False
    return None


def build(ws, gs, gains, depth, acc, host=True) -> Plan:
    """The plan for one bucket. `host`: CPU tensors outside torch.compile, which get row views
    and one-read norms. Elsewhere every factor is a plain slice of the flat vector, broadcast over
    its weight: a GPU kernel or a compiled loop handles that at full speed, an extra index_select
    would only add a launch, and torch.compile turns it into a slow gather."""
    device = ws[0].device
    assert not host or device.type == "cpu"
    ks = [num_submatrices(w.shape) for w in ws]
    offsets = [0, *itertools.accumulate(ks)][:-1]
    rvs = [rows_view(g) if host else None for g in gs]  # host only: see the docstring
    scales = [scale(w.shape) for w, k in zip(ws, ks) for _ in range(k)]
    coef = [gain * scale(w.shape) / depth for w, k, gain in zip(ws, ks, gains) for _ in range(k)]
    # BLAS dot reads a contiguous float32 vector 1.3-1.9x faster than the norm kernels on the CPU
    # and rounds less: 8x closer to float64 at 50M elements (benchmarks/norms.py).
    dots = [i for i, (g, k) in enumerate(zip(gs, ks)) if host and k == 1 and g.is_contiguous() and g.dtype == acc]
    single = [i for i, k in enumerate(ks) if k == 1 and i not in dots]
    # CPU one-read norms where a row fits the workspace (kernels of thousands of positions do not)
    fits = lambda rv: rv if rv is not None and rv[2] * acc.itemsize <= _ACC_BYTES else None
    columns = {i: fits(rv) for i, (rv, k) in enumerate(zip(rvs, ks)) if k > 1}
    expand, splits, views = [], [], []
    for w, rv, k, off in zip(ws, rvs, ks, offsets):
        if k == 1:
            idx, view = [off], (None, None, ())  # a 0-d factor is a scalar to the kernels
        elif rv is not None and rv == rows_view(w):
            perm, rows, cols, inner = rv
            idx = [off + (j % k if inner else j // w.shape[1]) for j in range(cols)]
            view = (perm, (rows, cols), (cols,))
        else:  # small, or a layout that cannot be viewed as rows
            idx, view = list(range(off, off + k)), (None, None, kernel_shape(w.shape))
        expand += idx
        splits.append(len(idx))
        views.append(view)
    as_tensor = lambda x, dtype: torch.tensor(x, dtype=dtype).to(device, non_blocking=True)
    expand = None if expand == list(range(len(expand))) else as_tensor(expand, torch.int64)
    workspace = torch.empty(_ACC_BYTES // acc.itemsize, dtype=acc) if any(columns.values()) else None
    return Plan(single, dots, columns, as_tensor(scales, acc), as_tensor(coef, acc), expand, splits, views,
                workspace)


def view(t: Tensor, perm, shape) -> Tensor:
    """t as the plan's rows (a view, never a copy), or t itself."""
    if shape is None:
        return t
    return (t if perm is None else t.permute(perm)).view(shape)


def column_norms(g: Tensor, perm, rows: int, cols: int, positions_inner: bool, workspace: Tensor) -> Tensor:
    """Per-kernel-position norms of a large CPU conv gradient (see rows_view), in one read of it.

    Squares of successive row blocks are added into an accumulator (the workspace) that fits in
    L2, so nothing the size of g is written; PyTorch's own vector_norm over dims (0, 1) runs
    about 3x slower here, its inner loop being only K long (benchmarks/norms.py).
    """
    x = view(g, perm, (rows, cols))
    first, *rest = x.split(max(1, min(rows, workspace.numel() // cols)))
    total = workspace[:first.numel()].view(first.shape)
    if g.dtype == workspace.dtype:  # the first block's squares start the sum: no zero-fill pass
        torch.mul(first, first, out=total)
    else:  # computed in the workspace's dtype, so half-precision squares do not round
        total.zero_().addcmul_(first, first)
    for part in rest:
        total[:len(part)].addcmul_(part, part)
    sums, k = total.sum(0), num_submatrices(g.shape)
    return (sums.view(-1, k).sum(0) if positions_inner else sums.view(k, -1).sum(1)).sqrt_()
