"""``--optimizer NAME`` -> a torch.optim.Optimizer for a model.

AGD comes with its own initialisation (orthogonal, scaled by s(W)), applied here before the
optimizer is built; the baselines keep PyTorch's default initialisation, as in the paper.
The learning-rate-free peers live in torch_agd.experiments.peers (an optional extra).
"""

from __future__ import annotations

import torch
from torch import nn

from torch_agd.errors import UsageError
from torch_agd.experiments.peers import PEERS, build_peer  # names only: the packages load on use

OPTIMIZERS = ("agd", "adam", "sgd", *PEERS)
# The paper's baselines at PyTorch's usual defaults (SGD has none; 0.1 is the paper's).
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1}


def build_optimizer(name: str, model: nn.Module, *, lr: float | None = None, gain: float = 1.0) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s parameters. ``lr=None`` means the default.

    For "agd" this re-initialises ``model``'s weights, so build it before loading a checkpoint
    and before wrapping the model in DistributedDataParallel.
    """
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if lr is not None and not 0 < lr < float("inf"):
        raise UsageError(f"--lr must be positive and finite, got {lr}")
    if name == "agd":
        if lr is not None:
            raise UsageError("--lr does not apply to --optimizer agd (AGD sets its own step size); use --gain")
        from torch_agd import AGD, init_weights_

        init_weights_(model)
        return AGD(model, gain=gain)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=DEFAULT_LR["adam"] if lr is None else lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=DEFAULT_LR["sgd"] if lr is None else lr)
    return build_peer(name, model.parameters(), lr=lr)
