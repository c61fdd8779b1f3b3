"""The shape rule AGD applies to every weight tensor.

A weight of shape (d_out, d_in, k1, k2, ...) is a stack of k1*k2*... submatrices of shape
(d_out, d_in), one per kernel position; a linear weight is a single submatrix. Each gets the same
scale s(W) = sqrt(d_out / d_in) / sqrt(k1 * k2 * ...).
"""
import math

import torch
from torch import nn

from .errors import UsageError

# Layers whose weights are >= 2-D but not laid out as (out, in, kernel...): the rule does not apply.
_NOT_OUT_IN = (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvTransposeNd)


def scale(shape) -> float:
    """s(W) for a weight of this shape."""
    d_out, d_in = shape[0], shape[1]
    return math.sqrt(d_out / d_in) / math.sqrt(math.prod(shape[2:]))


def kernel_shape(shape) -> tuple:
    """Shape that broadcasts one value per submatrix over a weight: (1, 1, k1, k2, ...)."""
    return (1, 1, *shape[2:])


def check_weight(p: torch.Tensor, name: str) -> None:
    """Raise a UsageError naming `name` if AGD has no rule for this tensor."""
    if p.dim() == 0:
        raise UsageError(f"AGD cannot train the scalar parameter {name}: it has no rule for 0-D "
                         "tensors; train it with another optimizer or make it a buffer")
    if p.dim() == 1:
        raise UsageError(f"AGD cannot train the 1-D parameter {name} (shape {tuple(p.shape)}): it "
                         "has no rule for biases or norm affine weights; build the layer with "
                         "bias=False / affine=False")
    if p.numel() == 0:
        raise UsageError(f"AGD cannot train the empty parameter {name} (shape {tuple(p.shape)})")
    if not (p.is_floating_point()):
        raise UsageError(f"AGD cannot train {name}: dtype {p.dtype} is not floating point")


def named_weights(module: nn.Module) -> list:
    """(name, parameter) pairs of a module, rejecting layers whose weights are not (out, in, ...)."""
    for mod_name, mod in module.named_modules():
        if isinstance(mod, _NOT_OUT_IN) and any(True for _ in mod.parameters(recurse=False)):
            kind = type(mod).__name__
            raise UsageError(f"AGD cannot train {mod_name or 'the module'} ({kind}): its weight is not "
                             "laid out as (out, in, kernel...); give its parameters to another optimizer")
    return list(module.named_parameters())


def num_submatrices(shape) -> int:
    """K: how many (d_out, d_in) submatrices a weight of this shape holds (1 for a linear weight)."""
    return math.prod(shape[2:])
