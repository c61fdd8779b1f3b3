"""Automatic Gradient Descent (Bernstein et al., arXiv:2304.05187).

One step, for weights W with gradients g(W) of a mean-reduced loss and depth L:

    G   = (1/L) * sum_W s(W) * sum_{submatrices M of W} ||g(M)||_F
    eta = log((1 + sqrt(1 + 4 G)) / 2)
    M  <- M - gain * (eta / L) * s(W) * g(M) / ||g(M)||_F

s(W) and the submatrices are defined in scale.py. AGD keeps no per-parameter state.
Two functional implementations follow torch.optim's layout: `_single_tensor_agd` reads like the
formulas; `_multi_tensor_agd` batches the same arithmetic with torch._foreach_* ops. Neither reads
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
from .scale import check_weight, kernel_shape, named_weights, num_submatrices, scale

# A submatrix whose gradient norm is exactly zero has g(M) == 0, so dividing by this floor
# instead of the norm leaves it unchanged, with no 0/0, and no branch on a device value.
_NORM_FLOOR = 1e-30
# Below this many elements a conv update is cheaper broadcast than through _wide's views.
_WIDE_MIN = 1 << 16


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


def _submatrix_norms(gs, acc):
    """||g(M)||_F for every submatrix: a 0-d tensor for a single submatrix, else shape (k1, ...)."""
    norms = [None] * len(gs)
    single = [i for i, g in enumerate(gs) if num_submatrices(g.shape) == 1]
    if single:
        for i, n in zip(single, torch._foreach_norm([gs[i] for i in single], 2, dtype=acc)):
            norms[i] = n
    many = [i for i in range(len(gs)) if norms[i] is None]
    if many and gs[many[0]].device.type == "cpu":
        # On the CPU, vector_norm over dims (0, 1) runs about 5x slower than a plain sum of
        # squares; a sum over fresh temporaries pays page faults instead. So the squares go
        # into one scratch buffer, allocated once per step and reused for every tensor.
        scratch = torch.empty(max(gs[i].numel() for i in many), dtype=acc)
        for i in many:
            squares = scratch[:gs[i].numel()].view(gs[i].shape)
            if gs[i].dtype == acc:
                torch.square(gs[i], out=squares)
            else:  # square after the upcast, so half-precision squares do not round
                squares.copy_(gs[i]).square_()
            cols = _wide_columns(squares)
            if cols:  # same sum, with a long inner loop (see _wide)
                norms[i] = squares.view(-1, cols).sum(0).view(-1, *gs[i].shape[2:]).sum(0).sqrt_()
            else:
                norms[i] = squares.sum(dim=(0, 1)).sqrt_()
    else:
        for i in many:
            norms[i] = torch.linalg.vector_norm(gs[i], dim=(0, 1), dtype=acc)
    return norms


def _wide_columns(w):
    """For a large contiguous conv weight, a row length m*K (K kernel positions, m | d_out*d_in)
    whose rows each hold m whole runs of the K positions; None where that does not pay."""
    if w.numel() < _WIDE_MIN or not w.is_contiguous():
        return None
    k = num_submatrices(w.shape)
    return math.gcd(w.shape[0] * w.shape[1], 64) * k


def _wide(w, g, c):
    """Views that apply one factor per kernel position with a long contiguous inner dimension.

    Broadcasting a (1, 1, k1, k2) factor over a conv weight runs about 7x slower on the CPU than
    a plain multiply, since the inner loop is only k2 long. Viewing the weight as rows of m*K
    elements and repeating the K factors m times keeps the arithmetic and gives a long inner loop.
    """
    if c.numel() == 1:  # a 0-d factor is a scalar to the CPU kernels; a (1, 1) one is a slow broadcast
        return w, g, c.reshape(())
    cols = _wide_columns(w) if g.is_contiguous() else None
    if cols is None:  # small, or a layout (channels_last) that cannot be viewed this way
        return w, g, c.view(kernel_shape(w.shape))
    return w.view(-1, cols), g.view(-1, cols), c.reshape(-1).repeat(cols // c.numel())


def _multi_tensor_agd(weights, grads, gains, depth):
    """Same arithmetic with foreach ops, grouped by device and dtype."""
    buckets = _group_tensors_by_device_and_dtype([weights, grads], with_indices=True)
    main = weights[0].device
    acc = _acc(max(grads, key=lambda g: g.element_size()).dtype)
    partial_G, per_bucket = [], []
    for (device, dtype), ((ws, gs), idx) in buckets.items():
        norms = _submatrix_norms(gs, _acc(dtype))
        scales = [scale(w.shape) for w in ws]
        weighted = torch._foreach_mul(norms, scales)
        partial_G.append(torch.cat([x.reshape(-1) for x in weighted]).sum().to(main, acc))
        per_bucket.append((device, ws, gs, norms, [gains[i] * s for i, s in zip(idx, scales)]))
    G = torch.stack(partial_G).sum() / depth
    finite = torch.isfinite(G)
    eta = torch.where(finite, _eta(G), 0.0)
    # On the CPU outside torch.compile, reading `finite` is a memory load, not a device sync:
    # skip the update outright. Elsewhere a skipped step runs with gradients masked to zero,
    # because eta = 0 alone would still give 0 * inf = NaN.
    branch = main.type == "cpu" and not torch.compiler.is_compiling()
    if branch and not finite:
        return eta, finite
    for device, ws, gs, norms, gain_scales in per_bucket:
        step = torch._foreach_clamp_min(norms, _NORM_FLOOR)
        torch._foreach_reciprocal_(step)
        torch._foreach_mul_(step, gain_scales)
        torch._foreach_mul_(step, eta.to(device) / depth)
        if not branch:  # a NaN norm makes its factor NaN too
            ok = finite.to(device)
            step = [torch.where(ok, c, 0) for c in step]
            gs = [torch.where(ok, g, 0) for g in gs]
        ws, gs, step = zip(*[_wide(w, g, c) for w, g, c in zip(ws, gs, step)])
        torch._foreach_addcmul_(list(ws), list(gs), list(step), value=-1)
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
        impl = _multi_tensor_agd if foreach else _single_tensor_agd
        eta, finite = impl(weights, grads, gains, self.depth)
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
