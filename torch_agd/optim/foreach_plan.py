"""Where every block's norm and factor lives: the fast path's plan, worked out once per layout.

All block norms of a step live in one flat vector (blocks of blocks.py, numbered tensor by tensor;
a joined bias shares its layer's numbers). Each tensor adds the sums of squares of its local
rows into one contiguous range of that vector, so sharded tensors (FSDP2) contribute partial
sums that one all-reduce completes, and a bias adds into its layer's range. After the step has
turned the vector into one factor per block, each tensor reads its factors back as a view that
broadcasts over it. Four patterns in which a tensor holds its blocks (TensorPlan.pattern):

    single    one block (a linear weight)              one norm; a 0-d factor
    kernel    one block per kernel position (a conv)   norms over (d_out, d_in); (1, 1, k...)
    rows      one block per row (embedding, norm,      norms along each row; one factor a row
              raw)
    grouped   runs of rows per block (grouped conv,    norms per row, summed per run; each row
              attention, a joined bias)                gathers its run's factor

This module is device-generic; the host-only kernels (long inner loops on the CPU) are in
cpu_kernels.py and used only where ``host`` is true.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import cpu_kernels
from .blocks import Blocks, Placement


@dataclass
class TensorPlan:
    pattern: str                  # how its blocks lie in it: single | kernel | rows | grouped
    start: int                    # its range of the flat vector
    length: int
    factor_shape: tuple
    k: int
    inner: int
    in_every_kernel_position: bool
    contributes: bool
    row_ids: Tensor | None = None  # grouped: row block of each local row
    # Host conv tensors: rows views for the norms of the gradient and of the update direction
    # (they differ only with momentum), and for the update itself (weight and direction alike).
    rows_view_grad: cpu_kernels.RowsView | None = None
    rows_view_dir: cpu_kernels.RowsView | None = None
    rows_view_update: cpu_kernels.RowsView | None = None
    dot: bool = False             # host single: norm by BLAS dot


@dataclass
class Plan:
    n: int
    tensors: list[TensorPlan]
    scales: Tensor                 # s(B) per block, flat, on the main device
    index: Tensor | None           # flat index of every contribution; None: they tile [0, n)
    buckets: list[tuple[torch.device, torch.dtype, list[int]]]
    expand: dict = field(default_factory=dict)  # bucket -> (gather index, rows-view positions)
    workspace: Tensor | None = None


def _pattern(b: Blocks) -> str:
    if b.in_every_kernel_position:  # a conv's bias: its one norm joins each of the layer's k blocks
        return "grouped"
    if b.row_blocks == 1:
        return "single" if b.k == 1 else "kernel"
    if b.row_blocks == b.rows and b.k == 1:
        return "rows"
    return "grouped"


def _factor_shape(local_shape: tuple, b: Blocks, pattern: str) -> tuple:
    if pattern == "single":
        return ()
    if pattern == "rows":  # one factor per row: the row dims, then ones
        return tuple(local_shape[:b.row_dims]) + (1,) * (len(local_shape) - b.row_dims)
    kernel = tuple(local_shape[len(local_shape) - b.kernel_dims:]) if b.kernel_dims else ()
    if pattern == "kernel":
        return (1, 1, *kernel)
    rows = tuple(local_shape[:b.row_dims])
    return (*rows, *(1,) * (len(local_shape) - len(rows) - len(kernel)), *kernel)


def signature(entries, ws, gs, ds) -> tuple:
    """What a cached plan depends on; values (and gains, lr, depth) may change freely."""
    return tuple((e, w.shape, w.stride(), g.stride(), d.stride(), w.device, w.dtype, g.dtype)
                 for e, w, g, d in zip(entries, ws, gs, ds))


def build(entries: list[Placement], ws, gs, ds, acc: torch.dtype, main: torch.device, host: bool) -> Plan:
    """The plan for weights ``ws`` with gradients ``gs`` (normed for G) and update directions
    ``ds`` (normed for the factors, and applied; ``ds`` is ``gs`` without momentum).
    ``host``: CPU tensors outside torch.compile, which get row views and one-read norms; elsewhere
    factors are plain slices that broadcast (a GPU kernel or compiled loop handles that at full
    speed, and torch.compile turns a gather into a slow per-element loop)."""
    n = max([0] + [e.base + e.blocks.count for e in entries])
    tensors, ranges = [], []
    scales = torch.zeros(n, dtype=torch.float64)
    for e, w, g, d in zip(entries, ws, gs, ds):
        b, pattern = e.blocks, _pattern(e.blocks)
        scales[e.base:e.base + b.count] = b.scale
        if pattern == "rows":
            start, length = e.base + e.r0, e.n
        else:
            start, length = e.base, (b.count if pattern == "grouped" else b.k)
        t = TensorPlan(pattern, start, length, _factor_shape(tuple(w.shape), b, pattern), b.k, e.inner, b.in_every_kernel_position,
                       e.contributes)
        if pattern == "grouped":
            t.row_ids = ((torch.arange(e.n) + e.r0) // b.rows_per_block).to(w.device)
        on_host = host and w.device.type == "cpu"
        if on_host and pattern == "kernel":
            t.rows_view_grad, t.rows_view_dir = (rv if cpu_kernels.fits(rv := cpu_kernels.rows_view(x, b.k), _acc(x.dtype)) else None
                              for x in (g, d))
            rv_w = cpu_kernels.rows_view(w, b.k)
            t.rows_view_update = rv_w if rv_w is not None and rv_w == cpu_kernels.rows_view(d, b.k) else None
        t.dot = on_host and pattern == "single" and g.is_contiguous() and d.is_contiguous() and g.dtype == _acc(g.dtype)
        tensors.append(t)
        if t.contributes and t.length:
            ranges.append((t.start, t.length))
    flat = [i for s, l in ranges for i in range(s, s + l)]
    index = None if flat == list(range(n)) else torch.tensor(flat, dtype=torch.int64, device=main)
    buckets = {}
    for i, w in enumerate(ws):
        buckets.setdefault((w.device, w.dtype), []).append(i)
    plan = Plan(n, tensors, scales.to(main, acc), index, [(dv, dt, idx) for (dv, dt), idx in buckets.items()])
    for bi, (device, _, idx) in enumerate(plan.buckets):
        gather = []
        for i in idx:
            t, w, b = tensors[i], ws[i], entries[i].blocks
            if t.rows_view_update is not None:
                rv = t.rows_view_update
                gather.append([t.start + rv.position(j, b.k, w.shape[1]) for j in range(rv.cols)])
        if gather:
            plan.expand[bi] = torch.tensor(list(itertools.chain(*gather)), dtype=torch.int64).to(device)
    if any(t.rows_view_grad is not None or t.rows_view_dir is not None for t in tensors):
        plan.workspace = cpu_kernels.workspace(acc)
    return plan


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in float32 for half-precision tensors, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def sq_contributions(plan: Plan, xs: list[Tensor], acc: torch.dtype, main: torch.device,
                     direction: bool = False) -> Tensor:
    """Flat vector of the sums of squares of ``xs`` (the gradients, or with ``direction`` the
    update directions) per block, as held by this process."""
    parts: list[Tensor | None] = [None] * len(xs)
    for device, dtype, idx in plan.buckets:
        bucket_acc = _acc(dtype)
        single = [i for i in idx if plan.tensors[i].pattern == "single" and plan.tensors[i].contributes]
        dots = [i for i in single if plan.tensors[i].dot and xs[i].is_contiguous()]
        rest = [i for i in single if i not in dots]
        if dots:
            parts_dot = cpu_kernels.dot_sq([xs[i] for i in dots])
            for i, v in zip(dots, parts_dot.unbind()):
                parts[i] = v.view(1)
        if rest:
            for i, v in zip(rest, torch._foreach_norm([xs[i] for i in rest], 2, dtype=bucket_acc)):
                parts[i] = v.square().view(1)
        for i in idx:
            t, x = plan.tensors[i], xs[i]
            if not t.contributes or t.pattern == "single":
                continue
            if t.pattern == "kernel":
                rv = t.rows_view_dir if direction else t.rows_view_grad
                if rv is not None and rv == cpu_kernels.rows_view(x, t.k):
                    parts[i] = cpu_kernels.column_sq(x, rv, t.k, plan.workspace)
                else:
                    parts[i] = torch.linalg.vector_norm(x, dim=(0, 1), dtype=bucket_acc).square().reshape(-1)
            elif t.pattern == "rows":
                if t.length:
                    parts[i] = torch.linalg.vector_norm(x.reshape(t.length, t.inner), dim=1,
                                                        dtype=bucket_acc).square()
            else:  # grouped: per-row sums, then per run of rows
                k_own = 1 if t.in_every_kernel_position else t.k
                per_row = torch.linalg.vector_norm(x.reshape(len(t.row_ids), t.inner, k_own), dim=1,
                                                   dtype=bucket_acc).square()
                blocks = torch.zeros(t.length // t.k, k_own, dtype=bucket_acc, device=device)
                blocks.index_add_(0, t.row_ids, per_row)
                parts[i] = blocks.expand(-1, t.k).reshape(-1)
    pieces = [p.to(main, acc) for p, t in zip(parts, plan.tensors) if p is not None]
    if not pieces:
        return torch.zeros(plan.n, dtype=acc, device=main)
    flat = torch.cat(pieces)
    if plan.index is None:
        return flat
    return torch.zeros(plan.n, dtype=acc, device=main).index_add_(0, plan.index, flat)


def factors(plan: Plan, f: Tensor, bucket: int, idx: list[int]) -> list[Tensor]:
    """Each tensor's factors (from the flat per-block factors ``f``), shaped to broadcast over
    the tensor, or over its rows view where the plan has one."""
    out = []
    gathered = plan.expand.get(bucket)
    if gathered is not None:
        lengths = [plan.tensors[i].rows_view_update.cols for i in idx if plan.tensors[i].rows_view_update is not None]
        viewed = iter(f.to(gathered.device).index_select(0, gathered).split(lengths))
    for i in idx:
        t = plan.tensors[i]
        if t.rows_view_update is not None:
            out.append(next(viewed))
            continue
        piece = f[t.start:t.start + t.length]
        if t.pattern == "grouped":
            piece = piece.view(-1, t.k).index_select(0, t.row_ids.to(f.device))
            if t.in_every_kernel_position:  # the constant input's column sits in every one of the k blocks
                piece = piece.sum(1)
        out.append(piece.reshape(t.factor_shape))
    return out
