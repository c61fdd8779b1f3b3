"""The fully-connected network of the paper: bias-free linear layers, ReLU * sqrt(2).

The sqrt(2) undoes the halving of the second moment by ReLU, so that with AGD's
orthogonal initialisation the activations keep their scale through depth.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


class ScaledReLU(nn.Module):
    """ReLU(x) * sqrt(2)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.relu(x) * math.sqrt(2.0)


class FCN(nn.Sequential):
    """Linear(d_in, w) -> [ReLU*sqrt(2) -> Linear(w, w)] x (depth-2) -> ReLU*sqrt(2) -> Linear(w, classes).

    Inputs of any shape (B, ...) are flattened first; ``depth`` counts the linear layers.
    """

    def __init__(self, in_features: int, num_classes: int, *, depth: int, width: int):
        widths = [in_features] + [width] * (depth - 1) + [num_classes]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0:
                layers.append(ScaledReLU())
            layers.append(nn.Linear(d_in, d_out, bias=False))
        super().__init__(*layers)
