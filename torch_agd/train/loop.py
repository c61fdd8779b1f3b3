"""One epoch of training and one pass of evaluation.

The step is the textbook one: zero_grad, forward, loss, backward, optimizer.step. Nothing in
it reads a device value on the host: the loss sum, the correct count and AGD's eta
statistics are accumulated in 0-d tensors on the device and read once, at the epoch's end,
so the GPU never waits for Python.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_agd.train.optimizers import agd_of


def mse_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The paper's square loss: mean over batch and classes of (f(x) - sqrt(C) * onehot(y))^2.

    The sqrt(C) makes the target vector's norm match the output scale that AGD's
    initialisation gives the network (entries of size ~1).
    """
    num_classes = logits.shape[1]
    target = F.one_hot(y, num_classes).to(logits.dtype) * math.sqrt(num_classes)
    return F.mse_loss(logits, target)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": mse_loss, "xent": F.cross_entropy}


def _autocast(device: torch.device, amp: bool):
    # bf16 activations only: the weights (and so AGD's small relative updates) stay float32.
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def _per_target(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """A language model predicts every position: (B, T, C) logits and (B, T) targets become
    B*T predictions, so the loss is the mean over every predicted byte and count is their number."""
    if logits.dim() > 2:
        return logits.flatten(0, -2), y.flatten()
    return logits, y


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[Tensor, Tensor]],
                *, loss_fn, device: torch.device, amp: bool = False, scheduler=None) -> dict[str, Tensor]:
    """Train on every batch once. Returns device tensors (no sync): loss_sum, correct, count
    (this process's samples), and, where AGD steps (agd, agd+adamw), eta_sum/min/max.
    ``scheduler`` (an lr scheduler, or None) steps once after every optimizer step."""
    agd = agd_of(optimizer)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    eta_sum = eta_min = eta_max = None
    steps = 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            logits, y = _per_target(model(x), y)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.detach().argmax(dim=1) == y).sum()
        count += y.shape[0]
        steps += 1
        eta = None if agd is None else agd.eta
        if eta is not None:  # AGD updates its eta in place: fold it in before the next step
            if eta_sum is None:
                eta_sum, eta_min, eta_max = eta.double().clone(), eta.clone(), eta.clone()
            else:
                eta_sum += eta
                torch.minimum(eta_min, eta, out=eta_min)
                torch.maximum(eta_max, eta, out=eta_max)
    stats = {"loss_sum": loss_sum, "correct": correct, "count": count, "steps": steps}
    if eta_sum is not None:
        stats.update(eta_sum=eta_sum, eta_min=eta_min, eta_max=eta_max)
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, loss_fn,
             device: torch.device, amp: bool = False) -> Tensor:
    """Sum of loss, correct predictions and samples over ``batches``: a float64 device tensor
    of shape (3,), ready to be summed across ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in batches:
        with _autocast(device, amp):
            logits, y = _per_target(model(x), y)
        loss = loss_fn(logits.float(), y)
        totals[0] += loss * y.shape[0]
        totals[1] += (logits.argmax(dim=1) == y).sum()
        totals[2] += y.shape[0]
    return totals
