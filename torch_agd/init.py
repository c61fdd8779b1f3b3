"""AGD's initialisation, one rule per kind of parameter (rules.py):

- weight, weight_t, attention: every block uniformly (semi-)orthogonal, times s(B), so every
  singular value of every block equals s(B) (the paper's initialisation);
- embedding: every row a uniformly random direction of unit RMS (norm sqrt(d));
- bias: zero; norm: gamma = 1, beta = 0 (what the layer would do anyway, done explicitly);
- raw (positional embeddings, class tokens...): left as the module initialised it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import rules


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


def _orthogonal_blocks(p: torch.Tensor, b: rules.Blocks, generator) -> torch.Tensor:
    """p's value with each block orthogonal and of scale b.scale, in p's layout."""
    per_block = b.rows // b.row_blocks
    # (row_blocks, k, rows per block, inner): block (a, j) is rows a*r:(a+1)*r at kernel position j
    q = _haar_orthogonal(b.row_blocks * b.k, per_block, b.inner, p, generator)
    q = q.view(b.row_blocks, b.k, per_block, b.inner).permute(0, 2, 3, 1)
    return (q * b.scale).reshape(p.shape)


@torch.no_grad()
def init_weights_(module_or_params, generator: torch.Generator | None = None):
    """Initialise parameters in place as AGD expects and return the argument.

    Accepts an nn.Module (every parameter, by its kind) or an iterable of >= 2-D weight tensors
    laid out (out, in, kernel...). A parameter no rule covers is a UsageError naming it.
    """
    if isinstance(module_or_params, nn.Module):
        groups = rules.module_param_groups(module_or_params)
    else:
        groups = [{"params": [(f"params[{i}]", p) for i, p in enumerate(module_or_params)]}]
    named = []
    for group in groups:
        for name, p in group["params"]:
            kind = group.get("kind") or rules.default_kind(p, name)
            rules.check(kind, p, name, group.get("conv_groups", 1))
            named.append((name, p, kind, group.get("conv_groups", 1)))
    structure, _ = rules.assign_blocks(named)
    for name, p, kind, _ in named:
        b = structure[id(p)][0][0]
        if kind in ("weight", "weight_t", "attention"):
            p.copy_(_orthogonal_blocks(p, b, generator))
        elif kind == "embedding":
            rows = torch.randn(p.shape, dtype=torch.float64, generator=generator)
            rows *= math.sqrt(p.shape[1]) / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
            p.copy_(rows)
        elif kind == "bias" or kind == "norm" and name.endswith("bias"):
            p.zero_()
        elif kind == "norm":
            p.fill_(1.0)
    return module_or_params
