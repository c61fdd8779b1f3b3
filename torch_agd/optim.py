"""Automatic Gradient Descent (Bernstein et al., arXiv:2304.05187).

One step, for weights W with gradients g(W) of a mean-reduced loss and depth L:

    G   = (1/L) * sum_W s(W) * sum_{submatrices M of W} ||g(M)||_F
    eta = log((1 + sqrt(1 + 4 G)) / 2)
    M  <- M - gain * (eta / L) * s(W) * g(M) / ||g(M)||_F

s(W) and the submatrices are defined in scale.py. AGD keeps no per-parameter state.
Two functional implementations follow torch.optim's layout: `_single_tensor_agd` reads like the
formulas; `_multi_tensor_agd` batches the same arithmetic (one flat vector of norms, foreach
ops, and layouts worked out once per set of shapes in plan.py). Neither reads
a GPU value on the host, so a step never waits for the GPU: eta, the step count and the count
of skipped (non-finite) steps stay 0-d tensors on the device. (On the CPU the fast path does
look at whether G was finite, which there is a plain memory load, to skip a masking pass.)
"""
import math

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .errors import UsageError
from . import plan
from .scale import check_weight, kernel_shape, named_weights, scale

# A submatrix whose gradient norm is exactly zero has g(M) == 0, so dividing by this floor
# instead of the norm leaves it unchanged, with no 0/0, and no branch on a device value.
_NORM_FLOOR = 1e-30


def _eta(G: Tensor) -> Tensor:
    return torch.log((1 + torch.sqrt(1 + 4 * G)) / 2)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Norms and G accumulate in float32 for half-precision gradients, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _single_tensor_agd(weights, grads, gains, depth):
    """Readable reference path. Returns (eta before gain, whether G was finite)."""
    acc = _acc(max(grads, key=lambda g: g.element_size()).dtype)
    norms = [torch.linalg.vector_norm(g, dim=(0, 1), dtype=_acc(g.dtype)) for g in grads]
    G = sum(scale(w.shape) * n.sum().to(weights[0].device, acc) for w, n in zip(weights, norms)) / depth
    eta = _eta(G)
    finite = torch.isfinite(G)
    eta = torch.where(finite, eta, 0.0)  # a non-finite G must not reach the weights
    for w, g, gain, n in zip(weights, grads, gains, norms):
        n = n.to(g.device)
        step = (gain * scale(w.shape) / depth) * eta.to(g.device) / n.clamp_min(_NORM_FLOOR)
        ok = finite.to(g.device)
        step, g = torch.where(ok, step, 0), torch.where(ok, g, 0)  # NaN norms, inf gradients
        w.sub_((g.to(step.dtype) * step.view(kernel_shape(w.shape))).to(w.dtype))
    return eta, finite


def _multi_tensor_agd(weights, grads, gains, depth, plans=None):
    """Same arithmetic with batched ops, per bucket of same-device, same-dtype tensors.

    `plans` caches each bucket's layout (see plan.py) between steps; None rebuilds it, as does
    tracing under torch.compile (the trace keeps what it needs).
    """
    buckets = _group_tensors_by_device_and_dtype([weights, grads], with_indices=True)
    main = weights[0].device
    acc = _acc(max(grads, key=lambda g: g.element_size()).dtype)
    compiling = torch.compiler.is_compiling()
    if compiling:
        plans = None
    partial_G, per_bucket = [], []
    for (device, dtype), ((ws, gs), idx) in buckets.items():
        bucket_acc, bucket_gains = _acc(dtype), [gains[i] for i in idx]
        key = (device, dtype, plan.signature(ws, gs, bucket_gains, depth))
        p = plans.get(key) if plans is not None else None
        if p is None:
            host = device.type == "cpu" and not compiling
            p = plan.build(ws, gs, bucket_gains, depth, bucket_acc, host)
            if plans is not None:
                plans[key] = p
        norms = {}
        if p.dots:
            squares = torch.stack([torch.dot(v, v) for v in (gs[i].view(-1) for i in p.dots)])
            norms.update(zip(p.dots, squares.sqrt_()))
        if p.single:
            norms.update(zip(p.single, torch._foreach_norm([gs[i] for i in p.single], 2, dtype=bucket_acc)))
        for i, rows in p.columns.items():
            if rows is None:
                norms[i] = torch.linalg.vector_norm(gs[i], dim=(0, 1), dtype=bucket_acc)
            else:
                norms[i] = plan.column_norms(gs[i], *rows, p.workspace)
        norms = torch.cat([norms[i].reshape(-1) for i in range(len(gs))])  # one per submatrix
        partial_G.append(torch.dot(norms, p.scales).to(main, acc))
        per_bucket.append((ws, gs, norms, p))
    G = torch.stack(partial_G).sum() / depth
    finite = torch.isfinite(G)
    eta = torch.where(finite, _eta(G), 0.0)
    # On the CPU outside torch.compile, reading `finite` is a memory load, not a device sync:
    # skip the update outright. Elsewhere a skipped step runs with gradients masked to zero,
    # because eta = 0 alone would still give 0 * inf = NaN.
    branch = main.type == "cpu" and not compiling
    if branch and not finite:
        return eta, finite
    for ws, gs, norms, p in per_bucket:
        factors = p.coef * eta.to(norms.device, norms.dtype) / norms.clamp_min(_NORM_FLOOR)
        if not branch:  # a NaN norm makes its factor NaN too
            factors = torch.where(finite.to(norms.device), factors, 0)
        pieces = (factors if p.expand is None else factors.index_select(0, p.expand)).split(p.splits)
        ws = [plan.view(w, perm, rows) for w, (perm, rows, _) in zip(ws, p.views)]
        gs = [plan.view(g, perm, rows) for g, (perm, rows, _) in zip(gs, p.views)]
        cs = [c.view(shape) for c, (_, _, shape) in zip(pieces, p.views)]
        if branch:
            torch._foreach_addcmul_(ws, gs, cs, value=-1)
        else:  # factors of differing shapes make foreach loop per tensor anyway; this way only
            ok = finite.to(norms.device)  # one masked copy of a gradient is alive at a time
            for w, g, c in zip(ws, gs, cs):
                w.addcmul_(torch.where(ok, g, 0), c, value=-1)
    return eta, finite


class AGD(Optimizer):
    """Automatic Gradient Descent: no learning rate; `gain` (default 1) is the only knob.

    Args:
        params: an nn.Module, an iterable of weight tensors, or of param-group dicts (a group may
            set its own ``gain``). Every tensor must be a >=2-D weight laid out (out, in, kernel...).
        gain: multiplies every update; the paper uses 1, and suggests 10 to train faster.
        depth: L in the paper; default the number of weight tensors given to the optimizer.
        foreach: use the batched foreach implementation (default True on every device).

    After a step, ``eta`` is the 0-d tensor eta (before gain) that the step used (0 for a step
    skipped because G was not finite), ``skipped_steps`` counts those skips and ``steps`` counts
    steps taken; all live on the parameters' device and are never read on the host here.
    """

    def __init__(self, params, gain: float = 1.0, depth: int | None = None, foreach: bool | None = None):
        if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
            raise UsageError(f"AGD gain must be a positive finite number, got {gain!r}")
        if isinstance(params, nn.Module):
            params = named_weights(params)
        super().__init__(params, dict(gain=gain, foreach=foreach))
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                check_weight(p, self._name(gi, i))
        n_weights = sum(len(g["params"]) for g in self.param_groups)
        if depth is not None and not (isinstance(depth, int) and depth > 0):
            raise UsageError(f"AGD depth must be a positive integer, got {depth!r}")
        self.depth = n_weights if depth is None else depth
        # eta, steps, skipped_steps: a dict rather than attributes because torch.compile replays
        # mutations of a dict held by the optimizer but drops attribute assignments on it.
        self._agd: dict[str, Tensor] = {}
        # Layouts of the fast path, by signature (plan.py): shape arithmetic done once, not per step.
        self._plans: dict = {}

    @property
    def eta(self) -> Tensor | None:
        return self._agd.get("eta")

    @property
    def steps(self) -> Tensor | None:
        return self._agd.get("steps")

    @property
    def skipped_steps(self) -> Tensor | None:
        return self._agd.get("skipped_steps")

    def _name(self, group_index: int, index: int) -> str:
        names = self.param_groups[group_index].get("param_names")
        return names[index] if names else f"param_groups[{group_index}]['params'][{index}]"

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        gain = param_group["gain"]
        if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
            raise UsageError(f"AGD gain must be a positive finite number, got {gain!r}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weights, grads, gains, foreach = [], [], [], True
        for gi, group in enumerate(self.param_groups):
            foreach = foreach and group["foreach"] is not False
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise UsageError(f"AGD cannot use the sparse gradient of {self._name(gi, i)}: "
                                     "build the layer with sparse=False")
                weights.append(p)
                grads.append(p.grad)
                gains.append(group["gain"])
        if not weights:
            return loss
        if not foreach:
            eta, finite = _single_tensor_agd(weights, grads, gains, self.depth)
        else:
            if len(self._plans) > 8:  # layouts keep changing (grads come and go): do not hoard
                self._plans.clear()
            eta, finite = _multi_tensor_agd(weights, grads, gains, self.depth, self._plans)
        self._record(eta, finite)
        return loss

    def _record(self, eta: Tensor, finite: Tensor) -> None:
        """Keep eta and the counters as device tensors, updated in place once they exist."""
        state = self._agd
        if "eta" not in state:
            zero = torch.zeros((), dtype=torch.int64, device=eta.device)
            state.update(eta=eta.clone(), steps=zero.clone(), skipped_steps=zero.clone())
        else:
            state["eta"].copy_(eta)
        state["steps"].add_(1)
        state["skipped_steps"].add_((~finite).to(torch.int64))

    def state_dict(self):
        sd = super().state_dict()
        sd["agd"] = dict(depth=self.depth, **{k: v.clone() for k, v in self._agd.items()})
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        agd = state_dict.pop("agd", None)
        super().load_state_dict(state_dict)
        if agd is None:
            return
        device = self.param_groups[0]["params"][0].device
        self.depth = agd["depth"]
        self._agd.clear()
        self._agd.update({k: v.clone().to(device) for k, v in agd.items() if k != "depth"})
