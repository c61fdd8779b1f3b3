"""AGD's initialisation: every submatrix uniformly (semi-)orthogonal, the tensor scaled by s(W).

Afterwards every singular value of every (d_out, d_in) submatrix equals s(W).
"""
import torch
from torch import nn

from .scale import check_weight, named_weights, num_submatrices, scale


def _haar_orthogonal(k: int, rows: int, cols: int, like: torch.Tensor, generator=None) -> torch.Tensor:
    """k matrices of shape (rows, cols) drawn from the uniform (Haar) measure on the
    (semi-)orthogonal matrices: QR of a Gaussian matrix with R's diagonal signs folded into Q."""
    tall = rows >= cols
    a = torch.randn(k, max(rows, cols), min(rows, cols), dtype=torch.float64,
                    device="cpu", generator=generator)
    q, r = torch.linalg.qr(a)
    # Without the sign fix QR would prefer one orientation and the law would not be uniform.
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q = q if tall else q.transpose(-2, -1)
    return q.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def init_weights_(module_or_params, generator: torch.Generator | None = None):
    """Initialise weights in place as AGD expects and return the argument.

    Accepts an nn.Module (all its parameters) or an iterable of weight tensors. Raises a
    UsageError naming any tensor the rule does not cover (1-D biases, 0-D, Embedding, ...).
    """
    if isinstance(module_or_params, nn.Module):
        named = named_weights(module_or_params)
    else:
        named = [(f"params[{i}]", p) for i, p in enumerate(module_or_params)]
    for name, p in named:
        check_weight(p, name)
    for _, p in named:
        d_out, d_in = p.shape[0], p.shape[1]
        k = num_submatrices(p.shape)
        q = _haar_orthogonal(k, d_out, d_in, p, generator)          # (k, d_out, d_in)
        w = q.permute(1, 2, 0).reshape(p.shape)                     # submatrix i at kernel position i
        p.copy_(w * scale(p.shape))
    return module_or_params
