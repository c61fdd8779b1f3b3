"""Random (semi-)orthogonal matrices, drawn from the uniform (Haar) measure: AGD's initialisation
sets every block of a layer to one of these, times the block's scale s(B)."""
from __future__ import annotations

import torch

from .blocks import Blocks


def haar_orthogonal(k: int, rows: int, cols: int, like: torch.Tensor, generator=None) -> torch.Tensor:
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


def orthogonal_blocks(p: torch.Tensor, b: Blocks, generator) -> torch.Tensor:
    """p's value with each block orthogonal and of scale b.scale, in p's layout."""
    per_block = b.rows // b.row_blocks
    # (row_blocks, k, rows per block, inner): block (a, j) is rows a*r:(a+1)*r at kernel position j
    q = haar_orthogonal(b.row_blocks * b.k, per_block, b.inner, p, generator)
    q = q.view(b.row_blocks, b.k, per_block, b.inner).permute(0, 2, 3, 1)
    return (q * b.scale).reshape(p.shape)
