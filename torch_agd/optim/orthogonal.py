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


# ---------------------------------------------------------------- a shard's rows of the same draw
#
# Under FSDP2 (after building on the meta device) a process holds some rows of a parameter and
# must get exactly those rows of what the code above gives the whole tensor from the same
# generator. Every process draws every number of the whole tensor in the same order (so the
# generator ends where it would have, and the result does not depend on how many processes
# share the rows), but only one block of it at a time, and factorises only the blocks it holds.

CHUNK = 1 << 16  # numbers drawn per call while streaming (a multiple of 16: see normal_stream)


def normal_stream(total: int, generator=None):
    """Pieces (float64, each at most CHUNK long) that concatenate to exactly what
    torch.randn(total, dtype=torch.float64, generator=generator) gives, drawing as much.

    This follows the CPU kernel (ATen/native/cpu/DistributionTemplates.h, normal_fill): for 16 or
    more numbers it draws one uniform per number, turns each run of 16 into 16 normals, and if
    total is not a multiple of 16, draws 16 more uniforms for the last 16 numbers. Runs of a
    multiple of 16 therefore chain exactly; tests/test_meta_init.py holds this to the bit."""
    if total < 16:  # another (serial) kernel: drawn whole, it is small
        yield torch.randn(total, dtype=torch.float64, device="cpu", generator=generator)
        return
    main = total - total % 16
    keep = total if total % 16 == 0 else total - 16  # what the last 16 do not overwrite
    done = 0
    while done < main:
        piece = torch.randn(min(CHUNK, main - done), dtype=torch.float64, device="cpu", generator=generator)
        if done < keep:
            yield piece[:keep - done]
        done += piece.numel()
    if total % 16:
        # the uniforms of the unfinished last run are drawn and then overwritten
        torch.empty(total % 16, dtype=torch.float64, device="cpu").uniform_(generator=generator)
        yield torch.randn(16, dtype=torch.float64, device="cpu", generator=generator)


class Reader:
    """Successive runs of n numbers from a stream of pieces."""

    def __init__(self, pieces):
        self.pieces, self.left = pieces, torch.empty(0, dtype=torch.float64)

    def take(self, n: int) -> torch.Tensor:
        parts, have = [self.left], self.left.numel()
        while have < n:
            piece = next(self.pieces)
            parts.append(piece)
            have += piece.numel()
        run = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.left = run[n:]
        return run[:n]


def _qr_as_in_a_batch(a: torch.Tensor, index: int):
    """torch.linalg.qr of ``a`` as it comes out at position ``index`` of a batch of such matrices.
    MKL's result depends on whether the matrix starts 16-byte aligned in torch's batch buffer
    (it does when index * numel is even), so an odd position is factorised behind a dummy."""
    if index * a.numel() % 2 == 0:
        return torch.linalg.qr(a)
    q, r = torch.linalg.qr(torch.stack([torch.zeros_like(a), a]))
    return q[1], r[1]


def orthogonal_rows_(local: torch.Tensor, b: Blocks, r0: int, generator) -> None:
    """Set ``local``, rows r0.. (as ``b`` counts rows) of a parameter cut into blocks ``b``, to
    those rows of orthogonal_blocks(p, b, generator): the same numbers, drawn block by block."""
    per_block, tall = b.rows // b.row_blocks, b.rows // b.row_blocks >= b.inner
    n = local.numel() // (b.inner * b.k)
    out = local.view(n, b.inner, b.k)  # row, inner, kernel position: the layout orthogonal_blocks writes
    long, short = max(per_block, b.inner), min(per_block, b.inner)
    draws = Reader(normal_stream(b.row_blocks * b.k * long * short, generator))
    for a in range(b.row_blocks):
        lo, hi = max(r0, a * per_block), min(r0 + n, (a + 1) * per_block)
        for j in range(b.k):
            x = draws.take(long * short).view(long, short)
            if lo >= hi:  # drawn only to keep the generator in step
                continue
            q, r = _qr_as_in_a_batch(x, a * b.k + j)
            q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
            q = (q if tall else q.transpose(-2, -1)).to(device=local.device, dtype=local.dtype)
            out[lo - r0:hi - r0, :, j] = (q * b.scale)[lo - a * per_block:hi - a * per_block]


def directions_rows_(local: torch.Tensor, shape: tuple, r0: int, normalise, generator) -> None:
    """Set ``local`` (rows r0.. of a (rows, d) table) to those rows of normalise(torch.randn(shape,
    float64)), drawing the whole table's numbers, a chunk of rows at a time; ``normalise`` works
    row by row, so it gives a chunk the rows it gives the whole."""
    rows, d = shape
    n = local.shape[0]
    draws = Reader(normal_stream(rows * d, generator))
    step = max(1, CHUNK // max(d, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        x = draws.take((stop - start) * d).view(stop - start, d)
        lo, hi = max(r0, start), min(r0 + n, stop)
        if lo < hi:
            local[lo - r0:hi - r0] = normalise(x[lo - start:hi - start].clone())
