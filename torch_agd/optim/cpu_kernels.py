"""CPU-only kernels of the fast path: what eager PyTorch on the host does slowly, done fast.

Two problems, both of conv weights (one norm and one factor per kernel position):
- `vector_norm(g, dim=(0, 1))` runs its inner loop over only K elements, at less than half
  the read rate of `column_sq` (benchmarks/norms.py: 6.5 against 14.5 GB/s on 512x512x3x3);
  `column_sq` instead adds squares of row blocks into an accumulator small enough to stay in
  L2, so it costs one read of g and writes nothing large.
- Broadcasting a (1, 1, k1, k2) factor over a weight has the same short inner loop; a `RowsView`
  of the weight, times the K factors repeated along a row, does the same arithmetic with a
  long inner loop.
GPU kernels and torch.compile have no such trouble, so none of this runs there (foreach_plan.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Below this many elements a conv weight is handled as (d_out, d_in, kernel) directly: views and
# chunking cost more than they save.
ROWS_MIN = 1 << 16
# Bytes of the accumulator for squared gradients: small enough to stay in a core's L2 cache.
ACC_BYTES = 1 << 20


@dataclass(frozen=True)
class RowsView:
    """A conv weight (or gradient) as (rows, cols): ``t.permute(perm).view(rows, cols)``, whose
    column j holds kernel position ``j % k`` (``positions_inner``) or ``j // d_in`` (channels_last)."""
    perm: tuple | None
    rows: int
    cols: int
    positions_inner: bool

    def of(self, t: Tensor) -> Tensor:
        return (t if self.perm is None else t.permute(self.perm)).view(self.rows, self.cols)

    def position(self, j: int, k: int, d_in: int) -> int:
        """The kernel position of column j."""
        return j % k if self.positions_inner else j // d_in


def rows_view(t: Tensor, k: int) -> RowsView | None:
    """How to view a large conv tensor with K = k kernel positions as rows with a long inner
    loop, or None where that does not pay or the layout allows no such view."""
    if t.numel() < ROWS_MIN or k == 1:
        return None
    if t.is_contiguous():  # (d_out, d_in, kernel...): rows of m runs of K, m | d_out * d_in
        m = math.gcd(t.shape[0] * t.shape[1], 64)
        while m > 1 and m * k > 4096:  # long enough already; keeps the factor index small
            m //= 2
        return RowsView(None, t.numel() // (m * k), m * k, True)
    perm = (0, *range(2, t.dim()), 1)
    if t.permute(perm).is_contiguous():  # channels_last: (d_out, kernel..., d_in) in memory
        return RowsView(perm, t.shape[0], t.numel() // t.shape[0], False)
    return None


def fits(rv: RowsView | None, acc: torch.dtype) -> bool:
    """Whether one row of ``rv`` fits the accumulator (kernels of thousands of positions do not)."""
    return rv is not None and rv.cols * acc.itemsize <= ACC_BYTES


def workspace(acc: torch.dtype) -> Tensor:
    """The accumulator for `column_sq`; kept between steps so it is not page-faulted in afresh."""
    return torch.empty(ACC_BYTES // acc.itemsize, dtype=acc)


def column_sq(g: Tensor, rv: RowsView, k: int, ws: Tensor) -> Tensor:
    """Per-kernel-position sums of squares of a large CPU conv gradient, in one read of it."""
    x = rv.of(g)
    first, *rest = x.split(max(1, min(rv.rows, ws.numel() // rv.cols)))
    total = ws[:first.numel()].view(first.shape)
    if g.dtype == ws.dtype:  # the first block's squares start the sum: no zero-fill pass
        torch.mul(first, first, out=total)
    else:  # computed in the workspace's dtype, so half-precision squares do not round
        total.zero_().addcmul_(first, first)
    for part in rest:
        total[:len(part)].addcmul_(part, part)
    sums = total.sum(0)
    return sums.view(-1, k).sum(0) if rv.positions_inner else sums.view(k, -1).sum(1)


def dot_sq(gs: list[Tensor]) -> Tensor:
    """Sums of squares of contiguous tensors by BLAS dot: on the host it reads a float32 vector
    1.3-1.9x faster than the norm kernels, and rounds less (benchmarks/norms.py)."""
    return torch.stack([torch.dot(v, v) for v in (g.view(-1) for g in gs)])
