"""Automatic Gradient Descent (Bernstein et al., arXiv:2304.05187).

One step, for parameters cut into blocks B (rules.py: a linear weight is one block, a conv weight
one per kernel position, ...), with gradients g of a mean-reduced loss and depth L:

    G   = (1/L) * sum_B s(B) * ||g(B)||_F
    eta = log((1 + sqrt(1 + 4 G)) / 2)
    B  <- B - lr * gain * (eta / L) * s(B) * g(B) / ||g(B)||_F

With momentum beta > 0 the last line normalises g + beta * m, for a buffer m <- beta * m + g
(Nesterov's form; heavy ball, m itself, with nesterov=False), instead of g; G and eta still come
from g. Two functional implementations follow torch.optim's layout:
`_single_tensor_agd` reads like the formulas; `_multi_tensor_agd` batches the same arithmetic
(one flat vector of block norms, foreach ops, layouts worked out once in layout.py). Neither
reads a GPU value on the host: eta, the step count and the count of skipped (non-finite) steps
stay 0-d tensors on the device. (On the CPU the fast path does look at whether G was finite,
which there is a plain memory load, to skip a masking pass.)
"""
from __future__ import annotations

import functools
import math
import sys
from numbers import Real

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import layout, rules, shard
from .errors import UsageError
from .layout import Entry

# A block whose gradient norm is exactly zero has g(B) == 0, so dividing by this floor instead
# of the norm leaves it unchanged, with no 0/0, and no branch on a device value.
_NORM_FLOOR = 1e-30


def _eta(G: Tensor) -> Tensor:
    return torch.log((1 + torch.sqrt(1 + 4 * G)) / 2)


_acc = layout._acc


def _widest(tensors) -> torch.dtype:
    """G accumulates in the widest of the tensors' accumulation dtypes (a plain loop: older
    torch.compile cannot trace max with a key)."""
    acc = torch.float32
    for t in tensors:
        acc = torch.promote_types(acc, t.dtype)
    return acc


def _complete(reduce, sq_g: Tensor, sq_d: Tensor) -> tuple[Tensor, Tensor]:
    """Sharded parameters: one all-reduce completes every block's sums of squares, of the
    gradients and (with momentum) of the update directions alike."""
    if reduce is None:
        return sq_g, sq_d
    if sq_d is sq_g:
        both = reduce(sq_g)
        return both, both
    both = reduce(torch.cat([sq_g, sq_d]))
    return both[:len(sq_g)], both[len(sq_g):]


# ---------------------------------------------------------------- the readable path


def _block_sq(x: Tensor, e: Entry) -> Tensor:
    """Sums of squares of the blocks of e's range that x's rows (e.r0 ...) fall in, as (rows, k)."""
    b = e.blocks
    k_own = 1 if b.spread else b.k
    per_row = x.to(_acc(x.dtype)).reshape(e.n, b.inner, k_own).square().sum(1)
    row_block = (torch.arange(e.n, device=x.device) + e.r0) // b.rows_per_block
    sums = torch.zeros(b.row_blocks, k_own, dtype=per_row.dtype, device=x.device).index_add_(0, row_block, per_row)
    return sums.expand(-1, b.k)


def _block_factor(f: Tensor, x: Tensor, e: Entry) -> Tensor:
    """Each of x's entries' factor: its row's block factor at its kernel position."""
    b = e.blocks
    row_block = (torch.arange(e.n, device=f.device) + e.r0) // b.rows_per_block
    per_row = f[e.base:e.base + b.count].view(b.row_blocks, b.k)[row_block]  # (rows, k)
    if b.spread:  # a conv's bias moves with all k blocks it joins
        per_row = per_row.sum(1, keepdim=True)
    k_own = per_row.shape[1]
    return per_row.view(e.n, 1, k_own).expand(e.n, b.inner, k_own).reshape(x.shape)


def _single_tensor_agd(weights, grads, dirs, entries, mults, depth, n_blocks, reduce):
    """Reference path, per tensor. Returns (eta before lr and gain, whether G was finite)."""
    main = weights[0].device
    acc = _widest(grads)
    sq_g = torch.zeros(n_blocks, dtype=acc, device=main)
    sq_d = sq_g.clone() if dirs is not grads else sq_g
    for g, d, e in zip(grads, dirs, entries):
        if e.contributes and e.n:
            sq_g[e.base:e.base + e.blocks.count] += _block_sq(g, e).reshape(-1).to(main, acc)
            if dirs is not grads:
                sq_d[e.base:e.base + e.blocks.count] += _block_sq(d, e).reshape(-1).to(main, acc)
    sq_g, sq_d = _complete(reduce, sq_g, sq_d)
    scales = torch.zeros(n_blocks, dtype=acc, device=main)
    for e in entries:
        scales[e.base:e.base + e.blocks.count] = e.blocks.scale
    G = (scales * sq_g.sqrt()).sum() / depth
    finite = torch.isfinite(G)
    eta = torch.where(finite, _eta(G), 0.0)  # a non-finite G must not reach the weights
    f = eta / depth * scales / sq_d.sqrt().clamp_min(_NORM_FLOOR)
    f = torch.where(finite, f, 0.0)
    for w, d, e, mult in zip(weights, dirs, entries, mults):
        if not e.n:
            continue
        step = _block_factor(f.to(w.device), d, e) * mult
        d = torch.where(finite.to(w.device), d, 0)  # an inf gradient times a zero factor is NaN
        w.sub_((d.to(step.dtype) * step).to(w.dtype))
    return eta, finite


# ---------------------------------------------------------------- the batched path


def _multi_tensor_agd(weights, grads, dirs, entries, mults, depth, n_blocks, reduce, plans=None):
    """Same arithmetic with batched ops. ``plans`` caches layouts between steps (layout.py); None
    rebuilds it, as does tracing under torch.compile (the trace keeps what it needs)."""
    main = weights[0].device
    acc = _widest(grads)
    compiling = torch.compiler.is_compiling()
    host = main.type == "cpu" and not compiling
    key = layout.signature(entries, weights, grads, dirs) if plans is not None and not compiling else None
    p = plans.get(key) if key is not None else None
    if p is None:
        p = layout.build(entries, weights, grads, dirs, acc, main, host)
        if key is not None:
            plans[key] = p
    sq_g = layout.sq_contributions(p, grads, acc, main)
    sq_d = layout.sq_contributions(p, dirs, acc, main, direction=True) if dirs is not grads else sq_g
    sq_g, sq_d = _complete(reduce, sq_g, sq_d)
    norms_g = sq_g.sqrt_() if sq_d is not sq_g else sq_g.sqrt()
    G = torch.dot(norms_g, p.scales) / depth
    finite = torch.isfinite(G)
    eta = torch.where(finite, _eta(G), 0.0)
    # On the CPU outside torch.compile, reading `finite` is a memory load, not a device sync:
    # skip the update outright. Elsewhere a skipped step runs with directions masked to zero,
    # because eta = 0 alone would still give 0 * inf = NaN.
    if host and not finite:
        return eta, finite
    norms_d = norms_g if sq_d is sq_g else sq_d.sqrt_()
    f = (eta / depth) * p.scales / norms_d.clamp_min(_NORM_FLOOR)
    if not host:  # a NaN norm makes its factor NaN too
        f = torch.where(finite, f, 0)
    same = all(m is mults[0] for m in mults) or (
        not any(isinstance(m, Tensor) for m in mults) and len(set(mults)) == 1)
    if same:
        f = f * mults[0]
    for bi, (device, _, idx) in enumerate(p.buckets):
        cs = layout.factors(p, f.to(device), bi, idx)
        if not same:
            cs = [c * mults[i] for c, i in zip(cs, idx)]
        ws, ds = [], []
        for i in idx:
            rv = p.tensors[i].rv_update
            ws.append(weights[i] if rv is None else rv.of(weights[i]))
            ds.append(dirs[i] if rv is None else rv.of(dirs[i]))
        if host:
            torch._foreach_addcmul_(ws, ds, cs, value=-1)
        else:  # factors of differing shapes make foreach loop per tensor anyway; this way only
            ok = finite.to(device)  # one masked copy of a direction is alive at a time
            for w, d, c in zip(ws, ds, cs):
                w.addcmul_(torch.where(ok, d, 0), c, value=-1)
    return eta, finite


# ---------------------------------------------------------------- the optimizer


def _check_multiplier(name: str, value, where: str = "") -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise UsageError(f"AGD {name}{where} must be a number or a 1-element float tensor, got shape "
                             f"{tuple(value.shape)} {value.dtype}")
        return
    if isinstance(value, bool) or not (isinstance(value, Real) and math.isfinite(value) and value > 0):
        raise UsageError(f"AGD {name}{where} must be a positive finite number, got {value!r}")


def _check_group(group: dict, where: str) -> None:
    """The rules every param group obeys, in the constructor and in add_param_group alike."""
    _check_multiplier("lr", group["lr"], where)
    _check_multiplier("gain", group["gain"], where)
    beta = group["momentum"]
    if isinstance(beta, bool) or not (isinstance(beta, Real) and 0 <= beta < 1):
        raise UsageError(f"AGD momentum{where} must be in [0, 1), got {beta!r}")
    if not isinstance(group["nesterov"], bool):
        raise UsageError(f"AGD nesterov{where} must be True or False, got {group['nesterov']!r}")
    depth = group["depth"]
    if not (depth is None or depth == "weights" or isinstance(depth, int) and not isinstance(depth, bool) and depth > 0):
        raise UsageError(f"AGD depth{where} must be a positive integer, 'weights' or None, got {depth!r}")


def _clear_if_skipped(buffers: list[Tensor], finite: Tensor) -> None:
    """A skipped step folded a non-finite gradient into the momentum buffers: start them afresh."""
    if buffers[0].device.type == "cpu" and not torch.compiler.is_compiling():
        if not finite:  # a memory load on the CPU, as in the step
            torch._foreach_zero_(buffers)
        return
    skipped = ~finite
    for buf in buffers:  # one pass, no host sync
        buf.masked_fill_(skipped.to(buf.device), 0)


def _eager_unless_tracing(method):
    """torch.optim wraps add_param_group, zero_grad, state_dict and load_state_dict in
    torch._disable_dynamo so that no compiled region traces them, and its first call imports
    torch._dynamo: 1.2 s of a short CPU job's start-up. While torch._dynamo is not imported,
    nothing can be tracing, so the plain method serves; once it is, the guarded one does."""
    plain = method.__wrapped__

    @functools.wraps(plain)
    def call(self, *args, **kwargs):
        return (method if "torch._dynamo" in sys.modules else plain)(self, *args, **kwargs)
    return call


_add_param_group = _eager_unless_tracing(Optimizer.add_param_group)


class AGD(Optimizer):
    """Automatic Gradient Descent: no learning rate to tune.

    Args:
        params: an nn.Module (every parameter, each by the rule for its kind, see
            torch_agd.rules), an iterable of tensors, or of param-group dicts. A group may set its
            own ``lr``, ``gain`` and ``momentum``, and ``kind`` (one of rules.KINDS; default
            "weight": a >= 2-D tensor laid out (out, in, kernel...)), with ``conv_groups`` for a
            grouped conv.
        lr: a multiplier on every update, 1 by default, for learning-rate schedulers (as Prodigy
            and D-Adaptation use ``lr``); a float or a 0-d tensor (a tensor changes without
            recompiling a compiled step).
        gain: the paper's multiplier on every update (it uses 1 and suggests 10 to train faster).
            Each update is scaled by lr * gain; eta does not depend on either.
        depth: L in the paper. None: for a module, the layers in series along its residual
            path (rules.infer_depth), else the number of weight tensors; "weights": the
            number of weight tensors (the paper's count); or a positive integer.
        momentum: beta of a buffer m <- beta * m + g (0, the default, is the paper's rule and
            keeps no state). The blocks of g + beta * m (Nesterov) are normalised in place of g's;
            G and eta still come from g alone.
        nesterov: False normalises m itself (heavy ball) instead of g + beta * m.
        maximize: ascend instead of descend.
        foreach: the batched implementation (default True on every device).

    After a step, ``eta`` is the 0-d tensor eta (before lr and gain) that the step used (0 for a
    step skipped because G was not finite), ``skipped_steps`` counts those skips and ``steps``
    counts steps taken; all live in ``state`` of the first parameter, on its device, and are
    never read on the host here. A skipped step leaves the weights alone and clears the momentum
    buffers (the gradient folded into them was not finite).
    """

    def __init__(self, params, lr: float | Tensor = 1.0, *, gain: float = 1.0, depth: int | str | None = None,
                 momentum: float = 0.0, nesterov: bool = True, maximize: bool = False, foreach: bool | None = None):
        module = params if isinstance(params, nn.Module) else None
        if module is not None:
            params = rules.module_param_groups(module)
        defaults = dict(lr=lr, gain=gain, depth=depth, momentum=momentum, nesterov=nesterov, maximize=maximize,
                        foreach=foreach)
        _check_group(defaults, "")
        self._new_cache()
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        self._set_depth(module)

    # torch.optim's own methods, without importing torch._dynamo in an eager job (see above)
    zero_grad = _eager_unless_tracing(Optimizer.zero_grad)
    state_dict = _eager_unless_tracing(Optimizer.state_dict)
    load_state_dict = _eager_unless_tracing(Optimizer.load_state_dict)

    # -------------------------------------------------------- groups and depth

    def _name(self, group: dict, index: int, group_index: int) -> str:
        names = group.get("param_names")
        return names[index] if names else f"param_groups[{group_index}]['params'][{index}]"

    def add_param_group(self, param_group: dict) -> None:
        gi = len(self.param_groups)
        given_depth = param_group.get("depth", self.defaults["depth"]) if isinstance(param_group, dict) else None
        _add_param_group(self, param_group)
        group = self.param_groups[-1]
        where = f" of param group {gi}" if gi else ""
        if given_depth != self.defaults["depth"]:
            raise UsageError(f"AGD depth is one number for the whole optimizer; param group {gi} sets depth="
                             f"{given_depth!r}: pass depth= to AGD(...) instead")
        _check_group(group, where)
        groups = group.get("conv_groups", 1)
        for i, p in enumerate(group["params"]):
            name = self._name(group, i, gi)
            kind = group.get("kind") or rules.default_kind(p, name)
            rules.check(kind, p, name, groups)
        group["kind"] = group.get("kind") or "weight"
        if groups != 1 and group["kind"] not in ("weight", "weight_t"):
            raise UsageError(f"conv_groups applies to kind 'weight' or 'weight_t', not {group['kind']!r}")
        if not self._constructing:
            self._cache["structure"] = None
            self._set_depth(None, added=group)

    def _layer_tensors(self, groups) -> list[Tensor]:
        return [p for g in groups if g["kind"] in rules.LAYER_KINDS for p in g["params"]]

    def _set_depth(self, module: nn.Module | None, added: dict | None = None) -> None:
        """Resolve L into every group: explicit, counted, inferred from the module, or (for a
        group added later) the old L plus the group's layer tensors."""
        mode = self.defaults["depth"]
        if isinstance(mode, int):
            depth = mode
        elif added is not None:
            depth = self.param_groups[0]["depth"] + len(self._layer_tensors([added]))
        elif mode is None and module is not None:
            depth = rules.infer_depth(module, {id(p) for p in self._layer_tensors(self.param_groups)})
        else:
            depth = len(self._layer_tensors(self.param_groups))
        if depth < 1:
            raise UsageError("AGD has no weight tensor to count as a layer (depth L would be 0): pass depth=")
        for group in self.param_groups:
            group["depth"] = depth

    # -------------------------------------------------------- structure (cached, rebuilt lazily)

    def _structure_of(self) -> tuple[dict, int]:
        """Every parameter's blocks and where they start in the flat vector of block norms:
        biases join their layer's weight by name. Rebuilt after any change to the groups, and
        lazily after a copy (deepcopy and pickle keep only defaults, state and param_groups)."""
        key = tuple((id(p), g["kind"], g.get("conv_groups", 1)) for g in self.param_groups for p in g["params"])
        cached = self._cache["structure"]
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        named = [(self._name(group, i, gi), p, group["kind"], group.get("conv_groups", 1))
                 for gi, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])]
        structure, n = rules.assign_blocks(named)
        self._cache["structure"] = (key, structure, n)
        return structure, n

    # -------------------------------------------------------- state

    def _first_state(self) -> dict:
        return self.state[self.param_groups[0]["params"][0]]

    @property
    def eta(self) -> Tensor | None:
        return self._first_state().get("eta")

    @property
    def steps(self) -> Tensor | None:
        return self._first_state().get("steps")

    @property
    def skipped_steps(self) -> Tensor | None:
        return self._first_state().get("skipped_steps")

    @property
    def depth(self) -> int:
        return self.param_groups[0]["depth"]

    def _new_cache(self) -> None:
        """What the step works out once and keeps: the block structure (rebuilt when the groups
        change) and the fast path's plans. Created here and only mutated in step() (the compiler
        of older torch cannot set an optimizer's attributes); a copy (deepcopy, pickle keep only
        defaults, state and param_groups) starts with a new one."""
        self._cache = {"structure": None, "plans": {}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._new_cache()
        self._constructing = False
        for group in self.param_groups:  # groups saved before a flag existed run as its default did
            group.setdefault("nesterov", True)
        # load_state_dict casts every floating-point state tensor it loads to its parameter's dtype
        # (for momentum buffers) and so turns the counters into floats: they are counts again.
        first = self.state.get(self.param_groups[0]["params"][0]) if self.param_groups else None
        for key in ("steps", "skipped_steps"):
            if first and key in first and first[key].dtype != torch.int64:
                first[key] = first[key].round().to(torch.int64)

    # -------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        structure, n_blocks = self._structure_of()
        weights, grads, dirs, entries, mults, meshes = [], [], [], [], [], []
        foreach = True
        momentum_groups = []
        for gi, group in enumerate(self.param_groups):
            foreach = foreach and group["foreach"] is not False
            mult = group["lr"] * group["gain"]
            if group["maximize"]:
                mult = -mult
            beta = group["momentum"]
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise UsageError(f"AGD cannot use the sparse gradient of {self._name(group, i, gi)}: "
                                     "build the layer with sparse=False")
                d = g
                if beta:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    buf.mul_(beta).add_(g)
                    momentum_groups.append(buf)
                    d = g.add(buf, alpha=beta) if group["nesterov"] else buf
                for b, base, rows in structure[id(p)]:
                    w_, g_, d_ = p, g, d
                    r0, n, contributes = 0, b.rows, True
                    if shard.is_sharded(p):
                        w_, g_, r0, n, contributes, mesh = shard.local(p, g, self._name(group, i, gi), b.lead)
                        d_ = d.to_local() if d is not g else g_
                        meshes.append(mesh)
                    if rows is not None:
                        if w_ is not p:
                            raise UsageError(f"AGD cannot step the sharded {self._name(group, i, gi)}: an "
                                             "in_proj_bias of separate q, k, v weights must not be sharded")
                        w_, g_, d_ = w_[rows], g_[rows], d_[rows]
                    weights.append(w_)
                    grads.append(g_)
                    dirs.append(d_)
                    entries.append(Entry(b, base, r0, n, contributes))
                    mults.append(mult)
        if not weights:
            return loss
        reduce = shard.reducer(meshes)
        if reduce is not None and len(meshes) < len(weights):
            raise UsageError("AGD steps a model sharded by FSDP2 whole: every trained parameter must be a DTensor "
                             "(apply fully_shard to the root module too)")
        use_dirs = dirs if any(d is not g for d, g in zip(dirs, grads)) else grads
        if foreach:
            plans = self._cache["plans"]
            if len(plans) > 8:  # layouts keep changing (grads come and go): do not hoard
                plans.clear()
            eta, finite = _multi_tensor_agd(weights, grads, use_dirs, entries, mults, self.depth, n_blocks, reduce, plans)
        else:
            eta, finite = _single_tensor_agd(weights, grads, use_dirs, entries, mults, self.depth, n_blocks, reduce)
        if momentum_groups:
            _clear_if_skipped(momentum_groups, finite)
        self._record(eta, finite)
        return loss

    def _record(self, eta: Tensor, finite: Tensor) -> None:
        """Keep eta and the counters as device tensors in the first parameter's state, updated in
        place once they exist (so a reference held across steps sees every new value)."""
        state = self._first_state()
        if "eta" not in state or state["eta"].dtype != eta.dtype:
            zero = torch.zeros((), dtype=torch.int64, device=eta.device)
            state["eta"] = eta.clone()
            state.setdefault("steps", zero.clone())
            state.setdefault("skipped_steps", zero.clone())
        else:
            state["eta"].copy_(eta)
        state["steps"].add_(1)
        state["skipped_steps"].add_((~finite).to(torch.int64))
