"""Learning-rate-free peers that users compare AGD with, each at its published defaults.

``PEERS`` maps an ``--optimizer`` name to ``builder(params, lr=None) -> Optimizer``. ``lr=None``
keeps the package's own default: for Prodigy, D-Adaptation and DoG that is a multiplier of 1.0 on
the step size they estimate, for Schedule-Free AdamW a base learning rate of 0.0025. Nothing else
is changed, so a comparison measures each method as its authors ship it.

The packages are an optional extra (``pip install "torch-agd[peers]"``); they are imported only
when a peer is built, and a missing one is a one-line UsageError naming that command.

Schedule-Free AdamW keeps two sequences of weights and must be told which one the model holds:
``optimizer.train()`` before training steps and ``optimizer.eval()`` before evaluation or saving.
The trainer calls those methods whenever the optimizer has them (see docs/architecture.md).

DoG's authors recommend evaluating an averaged copy of the weights (their
PolynomialDecayAverager); the trainer evaluates the raw weights for every optimizer alike, so DoG is
compared here without averaging, which is how ``DoG(params)`` behaves on its own.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable

from torch.optim import Optimizer

from torch_agd.errors import UsageError

PIP_HINT = 'pip install "torch-agd[peers]"'

Builder = Callable[..., Optimizer]


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
        optimizer_cls = _load(name, module, cls)
        if lr is not None and not lr > 0:
            raise UsageError(f"--lr for {name} must be positive (got {lr}); omit it for the default")
        return optimizer_cls(params, lr=default_lr if lr is None else lr)

    build.__name__ = f"build_{name.replace('-', '_')}"
    build.__doc__ = f"{module}.{cls}(params, lr={default_lr} unless given): published defaults."
    return build


# name -> (module, class, default lr). The default lr is the package's own constructor default
# (a test checks that), so "published defaults" stays true if a package changes its default.
PEER_CLASSES: dict[str, tuple[str, str, float]] = {
    "prodigy": ("prodigyopt", "Prodigy", 1.0),
    "dadapt-adam": ("dadaptation", "DAdaptAdam", 1.0),
    "dog": ("dog", "DoG", 1.0),
    "schedulefree": ("schedulefree", "AdamWScheduleFree", 0.0025),
}

PEERS: dict[str, Builder] = {name: _peer(name, *spec) for name, spec in PEER_CLASSES.items()}


def build_peer(name: str, params: Iterable, lr: float | None = None) -> Optimizer:
    """Build the peer called ``name``; an unknown name is a UsageError listing the known ones."""
    try:
        builder = PEERS[name]
    except KeyError:
        raise UsageError(
            f"unknown peer optimizer '{name}'; choose one of {', '.join(PEERS)}"
        ) from None
    return builder(params, lr=lr)
