"""The AGD optimizer: torch.optim's contract (param groups, state, hooks, state_dict) around
the functional step in functional.py, whose docstring has the formulas.

A step gathers one ParamStep per parameter from each group (`_group_steps`), then makes one call
for all of them: G and eta sum over every block of every group, so AGD, unlike SGD, cannot step
its groups one at a time.
"""
from __future__ import annotations

import functools
import math
import sys
from numbers import Real

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..errors import UsageError
from .blocks import assign_blocks
from . import sharding
from .depth import infer_depth
from .orthogonalize import check_direction, orthogonal_kind
from .functional import ParamStep, clear_if_skipped, momentum_direction, param_steps, step_blocks
from .rules import default_kind, group_rule, module_param_groups, rule_for


def _check_multiplier(name: str, value, where: str = "") -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise UsageError(f"AGD {name}{where} must be a number or a 1-element float tensor, got shape "
                             f"{tuple(value.shape)} {value.dtype}")
        return
    if isinstance(value, bool) or not (isinstance(value, Real) and math.isfinite(value) and value > 0):
        raise UsageError(f"AGD {name}{where} must be a positive finite number, got {value!r}")


# The defaults are the configuration measured best (docs/results-compare.md: the orthogonal
# direction with Nesterov momentum 0.9, ahead of the paper's rule on every model there).
# direction="frobenius" alone is the paper's rule: a group's momentum, when not given, is 0.9
# under the orthogonal directions and the paper's 0 under "frobenius".
DEFAULT_DIRECTION = "orthogonal"


def default_momentum(direction: str) -> float:
    """The momentum of a group that gives none: the paper's 0 for its rule, else 0.9."""
    return 0.0 if direction == "frobenius" else 0.9


def _check_group(group: dict, where: str, resolve: bool = True) -> None:
    """The rules every param group obeys, in the constructor and in add_param_group alike; a
    group's momentum None (not given) becomes default_momentum of its direction; the
    constructor's defaults (``resolve=False``) keep None, so each group resolves it by its own
    direction."""
    _check_multiplier("lr", group["lr"], where)
    _check_multiplier("gain", group["gain"], where)
    check_direction(group["direction"], where)
    if group["momentum"] is None and resolve:
        group["momentum"] = default_momentum(group["direction"])
    beta = 0.0 if group["momentum"] is None else group["momentum"]
    if isinstance(beta, bool) or not (isinstance(beta, Real) and 0 <= beta < 1):
        raise UsageError(f"AGD momentum{where} must be in [0, 1), got {beta!r}")
    if not isinstance(group["nesterov"], bool):
        raise UsageError(f"AGD nesterov{where} must be True or False, got {group['nesterov']!r}")
    depth = group["depth"]
    if not (depth is None or depth == "weights" or isinstance(depth, int) and not isinstance(depth, bool) and depth > 0):
        raise UsageError(f"AGD depth{where} must be a positive integer, 'weights' or None, got {depth!r}")


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
        params: an nn.Module (every parameter, each by the rule for its module's type, see
            torch_agd.optim.rules), an iterable of tensors, or of param-group dicts. A group may set
            its own ``lr``, ``gain`` and ``momentum``, and ``kind`` (a rule's name; default
            "weight": a >= 2-D tensor laid out (out, in, kernel...)), with ``conv_groups`` for a
            grouped conv.
        lr: a multiplier on every update, 1 by default, for learning-rate schedulers (as Prodigy
            and D-Adaptation use ``lr``); a float or a 0-d tensor (a tensor changes without
            recompiling a compiled step).
        gain: the paper's multiplier on every update (it uses 1 and suggests 10 to train faster).
            Each update is scaled by lr * gain; eta does not depend on either.
        depth: L in the paper. None: for a module, the layers in series along its residual
            path (depth.infer_depth), else the number of weight tensors; "weights": the
            number of weight tensors (the paper's count); or a positive integer.
        momentum: beta of a buffer m <- beta * m + g. The blocks of g + beta * m (Nesterov) are
            moved along in place of g's; G and eta still come from g alone. None (the default):
            0.9 under the orthogonal directions, 0 under "frobenius" (the paper's rule, which
            keeps no state), per param group by its direction.
        nesterov: False normalises m itself (heavy ball) instead of g + beta * m.
        maximize: ascend instead of descend.
        foreach: the batched implementation (default True on every device).
        direction: "orthogonal" (the default, with momentum 0.9: the learning-rate-free Muon,
            the best configuration measured, docs/results-compare.md) or "frobenius" (the paper's
            rule, exactly, with momentum 0: every block moves along D(B) / ||D(B)||_F).
            "orthogonal": each block of a matrix kind (linear and conv weights per kernel position
            and conv group, q, k, v, each stacked expert, with a joined bias as its last column)
            moves along O(D(B)) ~ U Vᵀ by Newton–Schulz, spending its whole spectral-norm budget
            (eta / L) * s(B); embeddings, norms, raw parameters keep the Frobenius rule, and G
            and eta are computed as before. A joined bias moves with its layer's direction.
            "orthogonal-normalised" is a control for measurements: O(D(B)) / ||O(D(B))||_F, the
            orthogonal direction at the paper's Frobenius step size. "orthogonal-flattened"
            orthogonalises each conv group's filters whole, [B_1 | ... | B_K] by sqrt(K) s(B)
            O([D(B_1) | ... | D(B_K)]), as Muon flattens them; "orthogonal-nuclear" takes eta
            from the matrix blocks' <g, O(D)> (docs/rules.md).

    After a step, ``eta`` is the 0-d tensor eta (before lr and gain) that the step used (0 for a
    step skipped because G was not finite), ``skipped_steps`` counts those skips and ``steps``
    counts steps taken; all live in ``state`` of the first parameter, on its device, and are
    never read on the host here. A skipped step leaves the weights alone and clears the momentum
    buffers (the gradient folded into them was not finite).
    """

    def __init__(self, params, lr: float | Tensor = 1.0, *, gain: float = 1.0, depth: int | str | None = None,
                 momentum: float | None = None, nesterov: bool = True, maximize: bool = False,
                 foreach: bool | None = None, direction: str = DEFAULT_DIRECTION):
        module = params if isinstance(params, nn.Module) else None
        if module is not None:
            params = module_param_groups(module)
        defaults = dict(lr=lr, gain=gain, depth=depth, momentum=momentum, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, direction=direction)
        _check_group(defaults, "", resolve=False)
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
        """torch.optim's, then AGD's checks of the new group (each parameter against its rule);
        a group refused leaves the optimizer as it was."""
        gi = len(self.param_groups)
        given_depth = param_group.get("depth", self.defaults["depth"]) if isinstance(param_group, dict) else None
        _add_param_group(self, param_group)
        try:
            self._check_new_group(self.param_groups[-1], gi, given_depth)
        except Exception:
            if len(self.param_groups) > gi:
                del self.param_groups[gi:]
            raise
        if not self._constructing:
            self._cache["structure"] = None
            self._set_depth(None, added=self.param_groups[-1])

    def _check_new_group(self, group: dict, gi: int, given_depth) -> None:
        where = f" of param group {gi}" if gi else ""
        if given_depth != self.defaults["depth"]:
            raise UsageError(f"AGD depth is one number for the whole optimizer; param group {gi} sets depth="
                             f"{given_depth!r}: pass depth= to AGD(...) instead")
        _check_group(group, where)
        groups = group.get("conv_groups", 1)
        for i, p in enumerate(group["params"]):
            name = self._name(group, i, gi)
            rule_for(group.get("kind") or default_kind(p, name), groups, name).check(p, name)
        group["kind"] = group.get("kind") or "weight"

    def _layer_tensors(self, groups) -> list[Tensor]:
        return [p for g in groups if group_rule(g).layer for p in g["params"]]

    def _set_depth(self, module: nn.Module | None, added: dict | None = None) -> None:
        """Resolve L into every group: explicit, counted, inferred from the module, or (for a
        group added later) the old L plus the group's layer tensors."""
        mode = self.defaults["depth"]
        if isinstance(mode, int):
            depth = mode
        elif added is not None:
            depth = self.param_groups[0]["depth"] + len(self._layer_tensors([added]))
        elif mode is None and module is not None:
            depth = infer_depth(module, {id(p) for p in self._layer_tensors(self.param_groups)})
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
        named = [(self._name(group, i, gi), p, group_rule(group))
                 for gi, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])]
        structure, n = assign_blocks(named)
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
            group.setdefault("direction", "frobenius")
        # load_state_dict casts every floating-point state tensor it loads to its parameter's dtype
        # (for momentum buffers) and so turns the counters into floats: they are counts again.
        first = self.state.get(self.param_groups[0]["params"][0]) if self.param_groups else None
        for key in ("steps", "skipped_steps"):
            if first and key in first and first[key].dtype != torch.int64:
                first[key] = first[key].round().to(torch.int64)

    # -------------------------------------------------------- the step

    def _group_steps(self, group: dict, gi: int, structure: dict) -> tuple[list[ParamStep], list[Tensor]]:
        """The ParamSteps of ``group``'s parameters that have gradients, and its momentum buffers
        (folding this step's gradients into them). torch.optim's _init_group in role, not in name:
        torch.compile runs any optimizer method called _init_group eagerly, by torch's own
        conventions, and then cannot trace this step in one graph."""
        mult = group["lr"] * group["gain"]
        if group["maximize"]:
            mult = -mult
        beta = group["momentum"]
        orthogonal = orthogonal_kind(group["direction"], group_rule(group).matrix)
        steps, buffers = [], []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            name = self._name(group, i, gi)
            if g.is_sparse:
                raise UsageError(f"AGD cannot use the sparse gradient of {name}: build the layer with sparse=False")
            if type(g) is not Tensor:  # a DTensor's gradient (TP) may be laid out unlike its parameter
                g = sharding.laid_out_as(p, g)
            d = g
            if beta:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
                d = momentum_direction(g, state["momentum_buffer"], beta, group["nesterov"])
            steps.extend(param_steps(p, g, d, structure[id(p)], name, mult, orthogonal))
        return steps, buffers

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        structure, n_blocks = self._structure_of()
        steps, buffers = [], []
        for gi, group in enumerate(self.param_groups):
            group_steps, group_buffers = self._group_steps(group, gi, structure)
            steps += group_steps
            buffers += group_buffers
        if not steps:
            return loss
        foreach = all(group["foreach"] is not False for group in self.param_groups)
        eta, finite = step_blocks(steps, depth=self.depth, n_blocks=n_blocks, foreach=foreach,
                                  plans=self._cache["plans"])
        if buffers:
            clear_if_skipped(buffers, finite)
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
