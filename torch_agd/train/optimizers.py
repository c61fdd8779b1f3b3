"""``--optimizer NAME`` -> a torch.optim.Optimizer for a model: AGD, its baselines and its peers.

AGD comes with its own initialisation (orthogonal, scaled by s(W)), applied here before the
optimizer is built; the baselines Adam and SGD keep PyTorch's default initialisation, as in the
paper.

The learning-rate-free peers that users compare AGD with run at their published defaults:
``lr=None`` keeps the package's own default, which for Prodigy, D-Adaptation and DoG is a
multiplier of 1.0 on the step size they estimate and for Schedule-Free AdamW a base learning rate
of 0.0025. Nothing else is changed, so a comparison measures each method as its authors ship it.
The packages are an optional extra (``pip install "torch-agd[peers]"``), imported only when a peer
is built; a missing one is a one-line UsageError naming that command.

Schedule-Free AdamW keeps two sequences of weights and must be told which one the model holds:
``optimizer.train()`` before training steps and ``optimizer.eval()`` before evaluation or saving.
The trainer calls those methods whenever the optimizer has them (see docs/architecture.md).

DoG's authors recommend evaluating an averaged copy of the weights (their
PolynomialDecayAverager); the trainer evaluates the raw weights for every optimizer alike, so DoG is
compared here without averaging, which is how ``DoG(params)`` behaves on its own.

Muon (``--optimizer muon``) is a baseline as its authors run it: torch.optim.Muon on the hidden
weight matrices, AdamW on the rest (MuonWithAdamW; the split and the conv filters in muon.py).
It and agd+adamw are Composite optimizers: several torch optimizers as one torch Optimizer.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from torch_agd.errors import UsageError

PIP_HINT = 'pip install "torch-agd[peers]"'

# The paper's baselines at PyTorch's usual defaults (SGD has none; 0.1 is the paper's), and
# AdamW with weight decay 0.01, the baseline for models with biases, norms and embeddings.
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1, "adamw": 1e-3}
ADAMW_WEIGHT_DECAY = 0.01

# Peer name -> (module, class, default lr). The default lr is the package's own constructor
# default (a test checks that), so "published defaults" stays true if a package changes it.
PEER_CLASSES: dict[str, tuple[str, str, float]] = {
    "prodigy": ("prodigyopt", "Prodigy", 1.0),
    "dadapt-adam": ("dadaptation", "DAdaptAdam", 1.0),
    "dog": ("dog", "DoG", 1.0),
    "schedulefree": ("schedulefree", "AdamWScheduleFree", 0.0025),
}

Builder = Callable[..., Optimizer]


def check_lr(name: str, lr: float | None, flag: str = "--lr") -> None:
    """The one rule for a given learning rate, whatever the optimizer: positive and finite."""
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"{flag} must be positive and finite, got {lr}; omit it for {name}'s default")


def _load(name: str, module: str, cls: str):
    """Import ``module.cls`` or explain, in one line, how to get it."""
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise UsageError(
            f"optimizer '{name}' needs the {module} package ({exc.name or module} is missing): "
            f"{PIP_HINT}"
        ) from None


def _peer(name: str, module: str, cls: str, default_lr: float) -> Builder:
    def build(params: Iterable, lr: float | None = None) -> Optimizer:
        check_lr(name, lr)
        return _load(name, module, cls)(params, lr=default_lr if lr is None else lr)

    build.__name__ = f"build_{name.replace('-', '_')}"
    build.__doc__ = f"{module}.{cls}(params, lr={default_lr} unless given): published defaults."
    return build


# Peer name -> builder(params, lr=None). Only names: each package loads when its peer is built.
PEERS: dict[str, Builder] = {name: _peer(name, *spec) for name, spec in PEER_CLASSES.items()}
# The optimizers that step with AGD, which take --gain and --agd-depth instead of --lr.
AGD_OPTIMIZERS = ("agd", "agd+adamw")
AGD_HEADS = ("same", "frobenius")  # --agd-head: under an orthogonal direction, how the output head moves
OPTIMIZERS = ("agd", "adam", "sgd", "adamw", "agd+adamw", "muon", *PEERS)


def default_lr(name: str, muon_adjust_lr: str | None = None) -> float | None:
    """The learning rate ``--optimizer name`` runs at without --lr: a baseline's, from DEFAULT_LR;
    Muon's at its lr adjustment (muon.DEFAULT_MUON_LR: 0.02 at torch's default, "original");
    None for AGD (no lr) and for a peer (its package's own default, applied when it is built)."""
    if name == "muon":
        from torch_agd.train.muon import DEFAULT_MUON_LR

        return DEFAULT_MUON_LR.get(muon_adjust_lr or "original")
    return DEFAULT_LR.get(name)


def build_peer(name: str, params: Iterable, lr: float | None = None) -> Optimizer:
    """Build the peer called ``name``; an unknown name is a UsageError listing the known ones."""
    try:
        builder = PEERS[name]
    except KeyError:
        raise UsageError(
            f"unknown peer optimizer '{name}'; choose one of {', '.join(PEERS)}"
        ) from None
    return builder(params, lr=lr)


class Composite(Optimizer):
    """Optimizers over disjoint parameters as one torch Optimizer: ``param_groups`` is every part's
    groups (the parts' own dicts, so an lr scheduler's changes reach them, and an
    ``isinstance(opt, Optimizer)`` check such as torch's LRScheduler's passes), ``state_dict`` is
    ``{part name: its state_dict}``, and ``step``, ``zero_grad`` and ``load_state_dict`` go to every
    part. ``parts``: name -> optimizer, in the order they step."""

    def __init__(self, parts: dict[str, Optimizer]):
        params = [p for part in parts.values() for group in part.param_groups for p in group["params"]]
        super().__init__(params, {})
        self.parts = parts

    # Read from the parts at every access: a part's load_state_dict replaces its group dicts, and a
    # list taken once would leave a scheduler changing groups that no part steps with any more.
    @property
    def param_groups(self) -> list[dict]:
        parts = self.__dict__.get("parts")
        if parts is None:  # inside Optimizer.__init__: its placeholder group
            return self.__dict__["_placeholder_groups"]
        return [group for part in parts.values() for group in part.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.__dict__["_placeholder_groups"] = groups

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "parts", None) is None:  # Optimizer.__init__ adding the placeholder group
            return super().add_param_group(param_group)
        raise TypeError(f"{type(self).__name__} splits a model's parameters itself: add groups to one of its parts")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none)

    def step(self, closure=None):
        first, *others = self.parts.values()
        loss = first.step(closure)  # a closure runs once, in the first part
        for part in others:
            part.step()
        return loss

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.parts):
            raise ValueError(f"{type(self).__name__} has parts {', '.join(self.parts)}, but the state has "
                             f"{', '.join(state)}")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


class AGDWithAdamW(Composite):
    """The fallback users have without AGD's rules for every kind: AGD (the paper's rule and L) on
    the weight matrices of linear, conv and attention layers, AdamW (lr 1e-3, weight decay 0.01)
    on everything else, each model parameter keeping its module's own initialisation. ``depth``
    is AGD's (parse_agd_depth): None counts the matrices in series along the model's residual
    path, "weights" one per matrix (the paper's count), or a number."""

    def __init__(self, model: nn.Module, gain: float = 1.0, depth: int | str | None = "weights"):
        from torch_agd import AGD
        from torch_agd.optim.depth import infer_depth
        from torch_agd.optim.rules import group_rule, module_param_groups

        groups = module_param_groups(model)
        matrices = [g for g in groups if group_rule(g).matrix]
        taken = {id(p) for g in matrices for _, p in g["params"]}
        if depth is None:  # AGD gets groups, not the model, so it cannot see the residual path itself
            depth = infer_depth(model, taken)
        self.agd = AGD(matrices, gain=gain, depth=depth, direction="frobenius")  # the paper's rule, as measured
        rest = [p for p in model.parameters() if id(p) not in taken]
        self.adamw = torch.optim.AdamW(rest or [torch.zeros(0, requires_grad=True)], lr=DEFAULT_LR["adamw"],
                                       weight_decay=ADAMW_WEIGHT_DECAY)  # (an empty stand-in: a bias-free net)
        super().__init__({"agd": self.agd, "adamw": self.adamw})


class MuonWithAdamW(Composite):
    """``--optimizer muon``: torch.optim.Muon (``lr``, momentum 0.95 Nesterov, ``adjust_lr``:
    torch's "original" or "match_rms_adamw") on the model's hidden 2-D weight matrices, MatrixMuon
    (the same step, per matrix) on its conv filters and other hidden matrices, AdamW (``aux_lr``)
    on the rest: embeddings, the output head, biases, norms. Weight decay 0.01 on every part. The
    split, and how conv filters are flattened, are in torch_agd/train/muon.py; ``example`` is one
    input of the model (muon.example_input), run once to find its output head. ``split`` is the
    MuonSplit it used. Parts absent from a model (no convs, say) are left out. ``ns_dtype``
    "float32" (muon.NS_DTYPES) runs Newton-Schulz in float32 on every hidden matrix, the 2-D
    weights too (through MatrixMuon: torch.optim.Muon has no such option)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, *, lr: float | None = None,
                 aux_lr: float | None = None, adjust_lr: str = "original", ns_dtype: str = "bfloat16"):
        from torch_agd.train import muon

        if adjust_lr not in muon.ADJUST_LR:
            raise UsageError(f"--muon-adjust-lr must be one of {', '.join(muon.ADJUST_LR)}, got {adjust_lr!r}")
        muon.check_ns_dtype(ns_dtype)
        check_lr("muon", lr)
        check_lr("muon", aux_lr, "--aux-lr")
        lr = muon.DEFAULT_MUON_LR[adjust_lr] if lr is None else lr
        aux_lr = DEFAULT_LR["adamw"] if aux_lr is None else aux_lr
        self.split = split = muon.muon_split(model, example)
        if not (split.muon or split.matrix):
            raise UsageError("--optimizer muon found no hidden weight matrix in this model (only its output head); "
                             "use --optimizer adamw")
        hyper = dict(lr=lr, weight_decay=ADAMW_WEIGHT_DECAY, adjust_lr_fn=adjust_lr)
        parts: dict[str, Optimizer] = {}
        matrices = list(split.matrix)
        if ns_dtype == "float32":  # a plain (out, in) weight is kind "weight" to MatrixMuon
            matrices = [(name, p, "weight", 1) for name, p in split.muon] + matrices
        elif split.muon:
            parts["muon"] = torch.optim.Muon([p for _, p in split.muon], **hyper)
        if matrices:
            kinds: dict[tuple[str, int], list] = {}
            for _, p, kind, groups in matrices:
                kinds.setdefault((kind, groups), []).append(p)
            parts["matrix"] = muon.MatrixMuon([{"params": ps, "kind": kind, "conv_groups": groups}
                                               for (kind, groups), ps in kinds.items()], ns_dtype=ns_dtype, **hyper)
        if split.adamw:
            parts["adamw"] = torch.optim.AdamW([p for _, p in split.adamw], lr=aux_lr,
                                               weight_decay=ADAMW_WEIGHT_DECAY)
        super().__init__(parts)


def parse_agd_depth(depth: str | int | None):
    """--agd-depth as AGD's ``depth`` argument: "auto" (None: layers in series), "weights" or an
    integer; anything else is a UsageError."""
    if depth in (None, "auto"):
        return None
    if depth == "weights":
        return "weights"
    try:
        value = int(depth)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise UsageError(f"--agd-depth must be auto, weights or a positive integer, got {depth!r}")
    return value


def agd_of(optimizer):
    """The AGD that steps in ``optimizer`` (itself, or agd+adamw's AGD half), or None: the trainer
    reports its eta, skipped steps and L."""
    from torch_agd import AGD

    if isinstance(optimizer, AGDWithAdamW):
        return optimizer.agd
    return optimizer if isinstance(optimizer, AGD) else None


def init_weights(name: str, model: nn.Module) -> None:
    """The initialisation ``--optimizer name`` comes with: AGD's (orthogonal, scaled by s(W)) for
    agd; every other optimizer, agd+adamw included, keeps the model's own."""
    if name == "agd":
        from torch_agd import init_weights_

        init_weights_(model)


def needs_example(name: str, agd_head: str = "same") -> bool:
    """Whether build_optimizer needs an example input (to find the output head)."""
    return name == "muon" or (name == "agd" and agd_head == "frobenius")


def _agd_head_on_frobenius(model: nn.Module, example: torch.Tensor, depth, **kwargs) -> Optimizer:
    """AGD over ``model`` whose output head (the last linear map to run: muon.output_head) keeps
    the paper's Frobenius rule while its group's other matrices take ``kwargs["direction"]``:
    the head in a param group of its own, with ``direction="frobenius"``. L is the model's, as
    AGD(model) counts it (param groups alone do not know the residual path)."""
    from torch_agd import AGD
    from torch_agd.optim.rules import module_param_groups
    from torch_agd.train.muon import output_head

    head = {id(p) for p in model.get_submodule(output_head(model, example)).parameters(recurse=False)}
    groups = []
    for group in module_param_groups(model):
        rest = [(n, p) for n, p in group["params"] if id(p) not in head]
        mine = [(n, p) for n, p in group["params"] if id(p) in head]
        groups += [{**group, "params": rest}] if rest else []
        groups += [{**group, "params": mine, "direction": "frobenius"}] if mine else []
    return AGD(groups, depth=AGD(model, depth=depth).depth, **kwargs)


def build_optimizer(name: str, model: nn.Module, *, lr: float | None = None, gain: float = 1.0,
                    agd_depth: str | int | None = "weights", momentum: float = 0.0,
                    nesterov: bool = True, direction: str = "frobenius", agd_head: str = "same", init: bool = True,
                    aux_lr: float | None = None,
                    muon_adjust_lr: str | None = None, muon_ns_dtype: str | None = None,
                    example: torch.Tensor | None = None) -> Optimizer:
    """The optimizer ``name`` over ``model``'s parameters. ``lr=None`` means default_lr(name).
    ``agd_depth`` (AGD's L: "auto", "weights" or an integer), ``momentum`` and ``nesterov``
    (False: heavy ball), ``direction`` (orthogonalize.DIRECTIONS) and ``agd_head`` (AGD_HEADS: "frobenius" keeps
    the output head on the paper's rule, found from ``example``) apply to AGD. ``aux_lr`` (AdamW's lr, default 1e-3), ``muon_adjust_lr``
    ("original", the default, or "match_rms_adamw"), ``muon_ns_dtype`` (Newton-Schulz's precision:
    "bfloat16", torch's and the default, or "float32") and ``example`` (one model input, which finds
    the output head: muon.example_input) apply to Muon (MuonWithAdamW), which needs ``example``.

    ``init`` first applies init_weights(name, model), which for "agd" re-initialises the weights:
    so build it before loading a checkpoint and before wrapping the model in
    DistributedDataParallel. ``init=False`` builds it on a model already initialised, as the
    trainer does: it initialises the whole model, then shards it under --fsdp (FSDP2 replaces
    the parameters), then builds the optimizer on the parameters the model holds.
    """
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name in AGD_OPTIMIZERS and lr is not None:
        raise UsageError(f"--lr does not apply to --optimizer {name} (AGD sets its own step size); use --gain")
    if init:
        init_weights(name, model)
    if name == "agd+adamw":
        return AGDWithAdamW(model, gain=gain, depth=parse_agd_depth(agd_depth))
    if name == "muon":
        if example is None:
            raise UsageError("--optimizer muon needs one example input to find the model's output head: "
                             "build_optimizer(..., example=torch_agd.train.muon.example_input(info))")
        return MuonWithAdamW(model, example, lr=lr, aux_lr=aux_lr, adjust_lr=muon_adjust_lr or "original",
                             ns_dtype=muon_ns_dtype or "bfloat16")
    if name == "agd":
        from torch_agd import AGD

        kwargs = dict(gain=gain, momentum=momentum, nesterov=nesterov, direction=direction)
        if agd_head == "frobenius":
            if example is None:
                raise UsageError("agd_head='frobenius' needs one example input to find the model's output head")
            return _agd_head_on_frobenius(model, example, parse_agd_depth(agd_depth), **kwargs)
        return AGD(model, depth=parse_agd_depth(agd_depth), **kwargs)
    if name in PEERS:
        return build_peer(name, model.parameters(), lr=lr)
    check_lr(name, lr)
    lr = default_lr(name) if lr is None else lr
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
    return torch.optim.SGD(model.parameters(), lr=lr)
