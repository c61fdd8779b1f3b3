"""AGD's step as functions over lists of tensors, as torch.optim's functional forms.

One step, for parameters cut into blocks B (rules.py: a linear weight is one block, a conv weight
one per kernel position, ...), with gradients g of a mean-reduced loss and depth L:

    G   = (1/L) * sum_B s(B) * ||g(B)||_F
    eta = log((1 + sqrt(1 + 4 G)) / 2)
    B  <- B - lr * gain * (eta / L) * s(B) * d(B) / ||d(B)||_F

where the direction d is g itself, or with momentum beta > 0, g + beta * m for a buffer
m <- beta * m + g (Nesterov's form; heavy ball, m itself, with nesterov=False); G and eta come
from g alone. With direction="orthogonal" a block of a matrix kind (rules.Rule.matrix) moves by
lr * gain * (eta / L) * s(B) * O(d(B)) instead, O(X) ~ U Vᵀ of X = U S Vᵀ (orthogonalize.py).
Two implementations: `_single_tensor_agd` reads like the formulas;
`_multi_tensor_agd` batches the same arithmetic (one flat vector of block norms, foreach ops,
layouts worked out once in foreach_plan.py). Neither reads a GPU value on the host: eta and
whether G was finite stay 0-d tensors on the device. (On the CPU the batched path does look at
whether G was finite, which there is a plain memory load, to skip a masking pass.)

`agd(...)` is the public form; the optimizer class (optimizer.py) gathers the same `ParamStep`s
from its param groups and calls `step_blocks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import foreach_plan, orthogonalize, sharding
from ..errors import UsageError
from .blocks import Assigned, Placement
from .rules import Rule, Weight, rule_for

# A block whose gradient norm is exactly zero has g(B) == 0, so dividing by this floor instead
# of the norm leaves it unchanged, with no 0/0, and no branch on a device value.
_NORM_FLOOR = 1e-30
_acc = foreach_plan._acc


@dataclass
class ParamStep:
    """What the step needs of one parameter (or of one piece of it: a third of a split
    in_proj_bias): the local tensors, where its blocks sit, and its multiplier lr * gain (negative
    to maximize)."""
    weight: Tensor
    grad: Tensor
    direction: Tensor            # grad, or the momentum direction
    placement: Placement
    mult: float | Tensor
    mesh: object | None = None   # the device mesh of a sharded (DTensor) parameter
    orthogonal: str | None = None  # None: D(B)/||D(B)||; else its direction's name, whose matrix
                                   # blocks move by O(D(B)) (orthogonalize.py)
    sharded_direction: Tensor | None = None  # a sharded parameter's whole direction (a DTensor)
    held: tuple | None = None    # its global indices held here per dim, None for all (sharding.Held.index)


def _eta(G: Tensor) -> Tensor:
    return torch.log((1 + torch.sqrt(1 + 4 * G)) / 2)


def _widest(tensors) -> torch.dtype:
    """G accumulates in the widest of the tensors' accumulation dtypes (a plain loop: older
    torch.compile cannot trace max with a key)."""
    acc = torch.float32
    for t in tensors:
        acc = torch.promote_types(acc, t.dtype)
    return acc


def _complete(all_reduce, sq_g: Tensor, sq_d: Tensor) -> tuple[Tensor, Tensor]:
    """Sharded parameters: one all-reduce completes every block's sums of squares, of the
    gradients and (with momentum) of the update directions alike."""
    if all_reduce is None:
        return sq_g, sq_d
    if sq_d is sq_g:
        both = all_reduce(sq_g)
        return both, both
    both = all_reduce(torch.cat([sq_g, sq_d]))
    return both[:len(sq_g)], both[len(sq_g):]


def _lists(steps: list[ParamStep]):
    """Weights, gradients, directions (the gradients list itself when no direction differs, so
    the kernels norm them once), placements and multipliers."""
    grads = [s.grad for s in steps]
    dirs = [s.direction for s in steps]
    if all(d is g for d, g in zip(dirs, grads)):
        dirs = grads
    return [s.weight for s in steps], grads, dirs, [s.placement for s in steps], [s.mult for s in steps]


# ---------------------------------------------------------------- the readable path


def _block_sq(x: Tensor, e: Placement) -> Tensor:
    """Sums of squares of the blocks of e's range that x's rows (e.r0 ...) fall in, as (rows, k)."""
    b = e.blocks
    k_own = 1 if b.in_every_kernel_position else b.k
    per_row = x.to(_acc(x.dtype)).reshape(e.n, e.inner, k_own).square().sum(1)
    row_block = (torch.arange(e.n, device=x.device) + e.r0) // b.rows_per_block
    sums = torch.zeros(b.row_blocks, k_own, dtype=per_row.dtype, device=x.device).index_add_(0, row_block, per_row)
    return sums.expand(-1, b.k)


def _block_factor(f: Tensor, x: Tensor, e: Placement) -> Tensor:
    """Each of x's entries' factor: its row's block factor at its kernel position."""
    b = e.blocks
    row_block = (torch.arange(e.n, device=f.device) + e.r0) // b.rows_per_block
    per_row = f[e.base:e.base + b.count].view(b.row_blocks, b.k)[row_block]  # (rows, k)
    if b.in_every_kernel_position:  # a conv's bias moves with all k blocks it joins
        per_row = per_row.sum(1, keepdim=True)
    k_own = per_row.shape[1]
    return per_row.view(e.n, 1, k_own).expand(e.n, e.inner, k_own).reshape(x.shape)


def _unit_norms(norms_d: Tensor, unit: Tensor | None) -> Tensor:
    """The direction norms the factors divide by: 1 for the blocks whose update is already
    O(D(B)) (the orthogonal direction), whose size is set by s(B) alone."""
    return norms_d if unit is None else norms_d.masked_fill(unit, 1.0)


def _single_tensor_agd(steps: list[ParamStep], depth: int, n_blocks: int, all_reduce,
                       moves: list[Tensor] | None = None, unit: Tensor | None = None,
                       nuclear=None) -> tuple[Tensor, Tensor]:
    """Reference path, per tensor. Returns (eta before lr and gain, whether G was finite).
    ``moves``: what each tensor moves along (default its direction), ``unit``: the blocks whose
    move is not normalised (see step_blocks)."""
    weights, grads, dirs, placements, mults = _lists(steps)
    moves = dirs if moves is None else moves
    main = weights[0].device
    acc = _widest(grads)
    sq_g = torch.zeros(n_blocks, dtype=acc, device=main)
    sq_d = sq_g.clone() if dirs is not grads else sq_g
    for g, d, e in zip(grads, dirs, placements):
        if e.contributes and e.n:
            sq_g[e.base:e.base + e.blocks.count] += _block_sq(g, e).reshape(-1).to(main, acc)
            if dirs is not grads:
                sq_d[e.base:e.base + e.blocks.count] += _block_sq(d, e).reshape(-1).to(main, acc)
    sq_g, sq_d = _complete(all_reduce, sq_g, sq_d)
    scales = torch.zeros(n_blocks, dtype=acc, device=main)
    for e in placements:
        scales[e.base:e.base + e.blocks.count] = e.blocks.scale
    G = (scales * _G_norms(sq_g.sqrt(), nuclear)).sum() / depth
    finite = torch.isfinite(G)
    eta = torch.where(finite, _eta(G), 0.0)  # a non-finite G must not reach the weights
    f = eta / depth * scales / _unit_norms(sq_d.sqrt(), unit).clamp_min(_NORM_FLOOR)
    f = torch.where(finite, f, 0.0)
    for w, d, e, mult in zip(weights, moves, placements, mults):
        if not e.n:
            continue
        step = _block_factor(f.to(w.device), d, e) * mult
        d = torch.where(finite.to(w.device), d, 0)  # an inf gradient times a zero factor is NaN
        w.sub_((d.to(step.dtype) * step).to(w.dtype))
    return eta, finite


# ---------------------------------------------------------------- the batched path


def _multi_tensor_agd(steps: list[ParamStep], depth: int, n_blocks: int, all_reduce,
                      plans: dict | None = None, moves: list[Tensor] | None = None,
                      unit: Tensor | None = None, nuclear=None) -> tuple[Tensor, Tensor]:
    """Same arithmetic with batched ops. ``plans`` caches layouts between steps (foreach_plan.py);
    None rebuilds it, as does tracing under torch.compile (the trace keeps what it needs).
    ``moves`` and ``unit`` as in _single_tensor_agd (a move is laid out like its direction, so
    the plan's views of the directions fit it)."""
    weights, grads, dirs, placements, mults = _lists(steps)
    moves = dirs if moves is None else moves
    main = weights[0].device
    acc = _widest(grads)
    compiling = torch.compiler.is_compiling()
    host = main.type == "cpu" and not compiling
    key = foreach_plan.signature(placements, weights, grads, dirs) if plans is not None and not compiling else None
    p = plans.get(key) if key is not None else None
    if p is None:
        p = foreach_plan.build(placements, weights, grads, dirs, acc, main, host)
        if key is not None:
            plans[key] = p
    sq_g = foreach_plan.sq_contributions(p, grads, acc, main)
    sq_d = foreach_plan.sq_contributions(p, dirs, acc, main, direction=True) if dirs is not grads else sq_g
    sq_g, sq_d = _complete(all_reduce, sq_g, sq_d)
    norms_g = sq_g.sqrt_() if sq_d is not sq_g else sq_g.sqrt()
    G = torch.dot(_G_norms(norms_g, nuclear), p.scales) / depth
    finite = torch.isfinite(G)
    eta = torch.where(finite, _eta(G), 0.0)
    # On the CPU outside torch.compile, reading `finite` is a memory load, not a device sync:
    # skip the update outright. Elsewhere a skipped step runs with directions masked to zero,
    # because eta = 0 alone would still give 0 * inf = NaN.
    if host and not finite:
        return eta, finite
    norms_d = norms_g if sq_d is sq_g else sq_d.sqrt_()
    f = (eta / depth) * p.scales / _unit_norms(norms_d, unit).clamp_min(_NORM_FLOOR)
    if not host:  # a NaN norm makes its factor NaN too
        f = torch.where(finite, f, 0)
    same = all(m is mults[0] for m in mults) or (
        not any(isinstance(m, Tensor) for m in mults) and len(set(mults)) == 1)
    if same:
        f = f * mults[0]
    for bi, (device, _, idx) in enumerate(p.buckets):
        cs = foreach_plan.factors(p, f.to(device), bi, idx)
        if not same:
            cs = [c * mults[i] for c, i in zip(cs, idx, strict=True)]
        ws, ds = [], []
        for i in idx:
            rows = p.tensors[i].rows_view_update
            ws.append(weights[i] if rows is None else rows.of(weights[i]))
            ds.append(moves[i] if rows is None else rows.of(moves[i]))
        if host:
            torch._foreach_addcmul_(ws, ds, cs, value=-1)
        else:  # factors of differing shapes make foreach loop per tensor anyway; this way only
            ok = finite.to(device)  # one masked copy of a direction is alive at a time
            for w, d, c in zip(ws, ds, cs):
                w.addcmul_(torch.where(ok, d, 0), c, value=-1)
    return eta, finite


# ---------------------------------------------------------------- shared by the class and agd()


def step_blocks(steps: list[ParamStep], *, depth: int, n_blocks: int, foreach: bool = True,
                plans: dict | None = None) -> tuple[Tensor, Tensor]:
    """One AGD step over ``steps`` whose placements number ``n_blocks`` blocks in all. Returns
    (eta before lr and gain, whether G was finite), both 0-d device tensors."""
    meshes = [s.mesh for s in steps if s.mesh is not None]
    all_reduce = sharding.reducer(meshes)
    if all_reduce is not None and len(meshes) < len(steps):
        raise UsageError("AGD steps a model sharded by FSDP2 whole: every trained parameter must be a DTensor "
                         "(apply fully_shard to the root module too)")
    moves, unit, nuclear = _orthogonal_moves(steps, n_blocks)
    if foreach:
        if plans is not None and len(plans) > 8:  # layouts keep changing (grads come and go): do not hoard
            plans.clear()
        return _multi_tensor_agd(steps, depth, n_blocks, all_reduce, plans, moves, unit, nuclear)
    return _single_tensor_agd(steps, depth, n_blocks, all_reduce, moves, unit, nuclear)


def _orthogonal_moves(steps: list[ParamStep], n_blocks: int) -> tuple[list[Tensor] | None, Tensor | None]:
    """Under the orthogonal direction: what every tensor moves along (O(D(B)) for the matrix
    blocks, computed once here for both paths, the direction elsewhere) and the mask of the blocks
    that moves so are not normalised again. (None, None) when no step asks for it: the paper's
    rule runs exactly as without this function."""
    if not any(s.orthogonal for s in steps):
        return None, None, None
    updates, ranges, nuclear = orthogonalize.orthogonal_updates(steps)
    unit = torch.zeros(n_blocks, dtype=torch.bool, device=steps[0].weight.device)
    for base, count in ranges:
        unit[base:base + count] = True  # a fill on the device: nothing read back
    moves = [u if u is not None else s.direction for u, s in zip(updates, steps, strict=True)]
    if not nuclear:
        return moves, unit, None
    vals = torch.zeros(n_blocks, dtype=torch.float64, device=unit.device)
    mask = torch.zeros_like(unit)
    for base, inner in nuclear:
        vals[base:base + len(inner)] = inner.to(vals.dtype)
        mask[base:base + len(inner)] = True
    return moves, unit, (mask, vals)


def _G_norms(norms_g: Tensor, nuclear) -> Tensor:
    """The per-block norms G sums: the gradients' Frobenius norms, or under "orthogonal-nuclear"
    <g(B), O(D(B))> for its matrix blocks (orthogonalize.DIRECTIONS)."""
    if nuclear is None:
        return norms_g
    mask, vals = nuclear
    return torch.where(mask, vals.to(norms_g.dtype), norms_g)


def param_steps(p: Tensor, grad: Tensor, direction: Tensor, assigned, name: str, mult,
                orthogonal: str | None = None) -> list[ParamStep]:
    """``p``'s ParamSteps, one per piece of its blocks (blocks.Assigned): local shards of a
    DTensor, and a third of a split in_proj_bias each. ``orthogonal``: what its matrix blocks
    move by (orthogonalize.orthogonal_kind), None for the Frobenius rule."""
    out = []
    for a in assigned:
        w_, g_, d_, r0, n, contributes, mesh = p, grad, direction, 0, a.blocks.rows, True, None
        whole = inner = index = None
        if sharding.is_sharded(p):
            whole = direction
            w_, g_, held, mesh = sharding.local(p, grad, name, a.blocks.row_dims, a.blocks.kernel_dims)
            r0, n, contributes, index = held.r0, held.n, held.contributes, held.index
            inner = None if held.inner == a.blocks.inner else held.inner
            d_ = direction.to_local() if direction is not grad else g_
        if a.rows is not None:
            if w_ is not p:
                raise UsageError(f"AGD cannot step the sharded {name}: an in_proj_bias of separate q, k, v "
                                 "weights must not be sharded")
            w_, g_, d_ = w_[a.rows], g_[a.rows], d_[a.rows]
        out.append(ParamStep(w_, g_, d_, Placement(a.blocks, a.base, r0, n, contributes, inner), mult, mesh,
                             orthogonal, whole, index))
    return out


def momentum_direction(grad: Tensor, buf: Tensor, beta: float, nesterov: bool) -> Tensor:
    """Fold ``grad`` into the buffer (m <- beta * m + g) and return the direction to normalise."""
    buf.mul_(beta).add_(grad)
    return grad.add(buf, alpha=beta) if nesterov else buf


def clear_if_skipped(buffers: list[Tensor], finite: Tensor) -> None:
    """A skipped step folded a non-finite gradient into the momentum buffers: start them afresh."""
    if buffers[0].device.type == "cpu" and not torch.compiler.is_compiling():
        if not finite:  # a memory load on the CPU, as in the step
            torch._foreach_zero_(buffers)
        return
    skipped = ~finite
    for buf in buffers:  # one pass, no host sync
        buf.masked_fill_(skipped.to(buf.device), 0)


# ---------------------------------------------------------------- the public functional form


@torch.no_grad()
def agd(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: list[Tensor | None] | None = None, *,
        rules: Sequence[Rule | str] | None = None, depth: int | None = None, lr: float | Tensor = 1.0,
        gain: float = 1.0, momentum: float = 0.0, nesterov: bool = True, maximize: bool = False,
        foreach: bool | None = None, direction: str = "frobenius") -> tuple[Tensor, Tensor]:
    """One AGD step on ``params`` in place, given their ``grads``; see the module docstring.

    Each tensor is cut into blocks by its rule (``rules``: a Rule or kind name per tensor;
    default the paper's rule, "weight", for every tensor), on its own: unlike ``AGD(model)`` no
    bias joins a weight here (that needs names). ``depth`` is L (default: the number of tensors
    whose rule is a layer, the paper's count). With ``momentum`` > 0, ``momentum_buffers`` holds
    one buffer (or None, filled in with a new one) per tensor, updated in place. Returns (eta
    before lr and gain, whether the step was taken: False when G was not finite, which leaves
    the weights alone and zeroes the momentum buffers), both 0-d tensors on the device.
    ``direction="orthogonal"`` moves the matrix blocks of tensors whose rule is a matrix kind by
    O(d(B)) (orthogonalize.py) rather than d(B) / ||d(B)||_F.
    """
    params, grads = list(params), list(grads)
    if len(params) != len(grads):
        raise UsageError(f"agd needs one gradient per parameter, got {len(params)} parameters and {len(grads)} gradients")
    if not params:
        raise UsageError("agd needs at least one parameter")
    rules = [Weight() for _ in params] if rules is None else list(rules)
    if len(rules) != len(params):
        raise UsageError(f"agd needs one rule per parameter, got {len(rules)} for {len(params)} parameters")
    rules = [r if isinstance(r, Rule) else rule_for(r, name=f"params[{i}]") for i, r in enumerate(rules)]
    if momentum and (momentum_buffers is None or len(momentum_buffers) != len(params)):
        raise UsageError("agd with momentum > 0 needs momentum_buffers: one tensor or None per parameter")
    if depth is None:
        depth = sum(r.layer for r in rules)
    if not (isinstance(depth, int) and depth >= 1):
        raise UsageError(f"agd needs depth L >= 1 (no layer to count, or depth={depth!r} given): pass depth=")
    orthogonalize.check_direction(direction)
    mult = -lr * gain if maximize else lr * gain
    steps, buffers, base = [], [], 0
    for i, (p, g, rule) in enumerate(zip(params, grads, rules, strict=True)):
        name = f"params[{i}]"
        rule.check(p, name)
        if type(g) is not Tensor:  # a DTensor's gradient (TP) may be laid out unlike its parameter
            g = sharding.laid_out_as(p, g)
        d = g
        if momentum:
            if momentum_buffers[i] is None:
                momentum_buffers[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(momentum_buffers[i])
            d = momentum_direction(g, momentum_buffers[i], momentum, nesterov)
        b = rule.blocks(p.shape)
        steps.extend(param_steps(p, g, d, [Assigned(b, base)], name, mult,
                                 orthogonal=orthogonalize.orthogonal_kind(direction, rule.matrix)))
        base += b.count
    eta, finite = step_blocks(steps, depth=depth, n_blocks=base, foreach=foreach is not False)
    if buffers:
        clear_if_skipped(buffers, finite)
    return eta, finite
