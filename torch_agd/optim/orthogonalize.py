"""The orthogonal direction (AGD(..., direction="orthogonal")): each matrix block of the update
direction replaced by its orthogonal polar factor U Vᵀ (for X = U S Vᵀ), computed by Newton–Schulz.

(orthogonal.py, beside it, draws the random orthogonal blocks of the initialisation; this module
orthogonalises update directions.)

A step under this direction keeps G and eta as functional.py computes them; only the matrix
blocks of linear maps (rules.Rule.matrix: linear and conv weights per kernel position and conv
group, q, k, v of a packed in_proj, each expert of a stacked tensor) move by
    B <- B - lr * gain * (eta / L) * s(B) * O(D(B))
in place of D(B) / ||D(B)||_F. A bias joined to its layer ([W | b] acting on [x; 1]) is a column
of the layer's blocks, so the block orthogonalised is the augmented [D(W) | D(b)], and b takes
its last column back (docs/rules.md, "The orthogonal direction").
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import UsageError
from .blocks import Blocks

# "orthogonal-normalised" is a control for measuring the orthogonal direction, not a method:
# O(D(B)) / ||O(D(B))||_F, the orthogonal direction at the paper's Frobenius step size (so a block
# moves by (eta / L) * s(B) in Frobenius norm, as under "frobenius", rather than by up to
# sqrt(rank) times that). It tells the direction's effect apart from the larger step's.
# "orthogonal-nuclear" moves as "orthogonal" does, and takes G (so eta) from the first-order
# term of that move: each matrix block contributes s(B) <g(B), O(D(B))> (its gradient's nuclear
# norm when D = g) in place of s(B) ||g(B)||_F (docs/rules.md, "G and eta"). A measurement of
# whether eta should follow the derivation, on unsharded parameters only.
# "orthogonal-flattened" orthogonalises a conv's filters whole, as Muon does, rather than each
# kernel position's block: per conv group, the K blocks side by side, [B_1 | ... | B_K] (d_out x
# K d_in, each with its joined bias column), move by sqrt(K) s(B) O([D(B_1) | ... | D(B_K)]).
# sqrt(K) s(B) is that matrix's operator norm at initialisation (K semi-orthogonal blocks of
# scale s side by side), so the flattened filter bank spends its own budget, and the move's
# Frobenius size equals the per-position one's when d_out <= d_in. Kinds with one block per
# map (linear layers, attention, experts) move exactly as under "orthogonal".
DIRECTIONS = ("frobenius", "orthogonal", "orthogonal-normalised", "orthogonal-nuclear", "orthogonal-flattened")


def check_direction(direction, where: str = "") -> None:
    """A one-line UsageError unless ``direction`` names one of DIRECTIONS."""
    if not (isinstance(direction, str) and direction in DIRECTIONS):
        raise UsageError(f"AGD direction{where} must be one of {', '.join(map(repr, DIRECTIONS))}, got {direction!r}")


def orthogonal_kind(direction: str, matrix: bool) -> str | None:
    """What a tensor's blocks move by (ParamStep.orthogonal): None for the Frobenius rule (its
    group's direction, or a kind whose blocks are not matrices), else the orthogonal direction."""
    return direction if matrix and direction != "frobenius" else None


# The quintic X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X of Jordan et al.'s Muon: chosen so that five
# steps from singular values in (0, 1] land every one of them in about [0.7, 1.2], fast, rather
# than converging to exactly 1 slowly (the cubic a, b, c = 1.5, -0.5, 0 does that).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# A zero block stays zero: its Frobenius norm is floored here instead of dividing 0 by 0.
_NORM_FLOOR = 1e-30


def newton_schulz(x: Tensor, steps: int = NS_STEPS) -> Tensor:
    """About U Vᵀ of every matrix in ``x`` (..., m, n), all singular values sent to about 1.

    Computed in float32 for half-precision input (float32 and float64 keep their dtype): on a CPU,
    bfloat16 matmuls are slower than float32 ones, and on a GPU float32 costs little at the sizes
    of one block. X is first divided by its Frobenius norm, which bounds its spectral norm, so
    every singular value starts in (0, 1], where the iteration converges."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:  # X Xᵀ on the short side: m x m with m <= n is the cheaper Gram matrix
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_min(_NORM_FLOOR)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if gram.dim() == 3 else b * gram + c * (gram @ gram)
        x = torch.baddbmm(x, poly, x, beta=a) if x.dim() == 3 else a * x + poly @ x
    return x if wide else x.mT


def _as_matrices(x: Tensor, b: Blocks) -> Tensor:
    """``x`` (laid out as a tensor of blocks ``b``) as its blocks: (row_blocks, k, d_out, d_in),
    each the matrix of a linear map (a transposed layout's stored blocks are transposed back)."""
    m = x.reshape(b.row_blocks, b.rows_per_block, b.inner, b.k).permute(0, 3, 1, 2)
    return m.mT if b.transposed else m


def _from_matrices(m: Tensor, b: Blocks, like: Tensor) -> Tensor:
    """The inverse of _as_matrices, written into a tensor laid out like ``like`` (same strides,
    so the batched path's views of the direction fit it too)."""
    m = m.mT if b.transposed else m
    out = torch.empty_like(like)
    out.copy_(m.permute(0, 2, 3, 1).reshape(like.shape))
    return out


def augmented(d: Tensor, b: Blocks, bias: Tensor | None = None) -> Tensor:
    """The blocks of the direction ``d`` (blocks ``b``) as maps, (row_blocks, k, d_out, d_in); with
    ``bias`` (the direction of a bias joined to them), the augmented [D(W) | D(b)], whose last
    column is the bias's part of each block (a conv's bias in every kernel position's)."""
    m = _as_matrices(d, b)
    if bias is None:
        return m
    column = bias.reshape(b.row_blocks, 1, m.shape[-2], 1).expand(-1, b.k, -1, -1)
    return torch.cat([m, column.to(m.dtype)], dim=-1)


def split(o: Tensor, b: Blocks, d: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """O of the augmented blocks back to (the weight's update, the bias's update or None), each
    laid out like its direction. A conv's bias is the constant input's column of all k kernel
    positions' blocks, and the step moves it by the sum of their (equal) factors; so its update
    here is the mean of its k columns, and the sum of the k moves comes out."""
    d_in = o.shape[-1] - (bias is not None)
    w = _from_matrices(o[..., :d_in], b, d)
    if bias is None:
        return w, None
    u = torch.empty_like(bias)
    u.copy_(o[..., d_in].mean(1).reshape(bias.shape))
    return w, u


def as_batch(m: Tensor, flattened: bool = False) -> Tensor:
    """The matrices Newton–Schulz acts on, (n, rows, cols), from augmented blocks m (row_blocks,
    k, d_out, cols): each block; or, ``flattened``, each row block's k blocks side by side."""
    if flattened:
        return m.permute(0, 2, 1, 3).reshape(m.shape[0], m.shape[2], -1)
    return m.reshape(-1, *m.shape[-2:])


def from_batch(o: Tensor, shape: torch.Size, flattened: bool = False) -> Tensor:
    """as_batch's inverse: O of the batch back to blocks of ``shape``; a flattened bank's O is
    scaled by sqrt(k), its operator norm at initialisation in units of s(B)."""
    if flattened:
        k = shape[1]
        return o.view(shape[0], shape[2], k, shape[3]).permute(0, 2, 1, 3) * math.sqrt(k)
    return o.view(shape)


def orthogonal_update(d: Tensor, b: Blocks, bias: Tensor | None = None,
                      orthogonalise=newton_schulz, flattened: bool = False) -> tuple[Tensor, Tensor | None]:
    """O(D(B)) of every block of one tensor's direction ``d`` (with its joined ``bias``), in one
    batched chain over all its kernel positions, conv groups, q/k/v or experts (``flattened``:
    over its conv groups, each group's kernel positions side by side)."""
    m = augmented(d, b, bias)
    return split(from_batch(orthogonalise(as_batch(m, flattened)), m.shape, flattened), b, d, bias)


def orthogonal_updates(steps: list, orthogonalise=newton_schulz) -> tuple[list, list[tuple[int, int]], list]:
    """For a step's ParamSteps (functional.py): the update each one applies (its orthogonalised
    direction, or None to keep its direction), the ranges (base, count) of the flat block
    vector whose blocks now move by O(D(B)), which the step must not normalise again, and, for
    "orthogonal-nuclear", (base, <g(B), O(D(B))> per block) to take G from.

    A step is orthogonal where its group asked for it and its rule's blocks are matrices; a bias
    joined to such a step's blocks goes with it, whatever its own group says. Blocks of the same
    shape, dtype and device across tensors (a transformer's layers) are orthogonalised in one
    batched chain: Newton–Schulz acts on each matrix alone, so this changes nothing but the
    number of matmul calls."""
    updates: list[Tensor | None] = [None] * len(steps)
    owners = {s.placement.base: i for i, s in enumerate(steps) if s.orthogonal and not s.placement.blocks.joined}
    biases: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        if s.placement.blocks.joined and s.placement.base in owners:
            biases.setdefault(s.placement.base, []).append(i)
    ranges, batches, nuclear = [], {}, []
    for base, i in owners.items():
        s = steps[i]
        joined = biases.get(base, [])
        if len(joined) > 1:  # two tensors claiming one column cannot happen through assign_blocks
            raise UsageError(f"{len(joined)} biases join one matrix's blocks; direction='orthogonal' needs one")
        j = joined[0] if joined else None
        if s.orthogonal == "orthogonal-nuclear" and s.sharded_direction is not None:
            raise UsageError("direction='orthogonal-nuclear' (a measurement) steps unsharded parameters only")
        d, bias = _whole(s), None if j is None else _whole(steps[j])  # gathered once, if sharded
        m = augmented(d, s.placement.blocks, bias)
        x = as_batch(m, s.orthogonal == "orthogonal-flattened")
        batches.setdefault((x.shape[-2:], x.dtype, x.device), []).append((i, j, m, x, d, bias))
        ranges.append((base, s.placement.blocks.count))
    for members in batches.values():
        flat = [x for _, _, _, x, _, _ in members]
        o = orthogonalise(torch.cat(flat) if len(flat) > 1 else flat[0])
        for (i, j, m, _, d, bias), part in zip(members, o.split([len(f) for f in flat]), strict=True):
            s = steps[i]
            part = from_batch(part, m.shape, s.orthogonal == "orthogonal-flattened")
            if s.orthogonal == "orthogonal-normalised":  # the control: unit Frobenius norm per block
                part = part / torch.linalg.vector_norm(part, dim=(-2, -1), keepdim=True).clamp_min(_NORM_FLOOR)
            if s.orthogonal == "orthogonal-nuclear":  # <g(B), O(D(B))>, the gradient laid out as D
                g = augmented(s.grad, s.placement.blocks, None if j is None else steps[j].grad)
                inner = (g.to(part.dtype) * part).sum((-2, -1)).reshape(-1)  # per block, in block order
                nuclear.append((s.placement.base, inner.clamp_min(0)))  # a step against g adds nothing
            w, u = split(part, s.placement.blocks, d, bias)
            updates[i] = _local(w, s)
            if j is not None:
                updates[j] = _local(u, steps[j])
    return updates, ranges, nuclear


def _whole(s) -> Tensor:
    """A step's whole direction: a sharded block must be orthogonalised whole, so a DTensor's
    is all-gathered (each process then orthogonalises every block, and keeps its own rows)."""
    return s.direction if s.sharded_direction is None else s.sharded_direction.full_tensor()


def _local(update: Tensor, s) -> Tensor:
    """The entries of a whole update that the step's process holds (all of them unless sharded:
    rows, columns or both), laid out like its local direction."""
    if s.sharded_direction is None:
        return update
    held = update.reshape(s.sharded_direction.shape)
    for dim, index in enumerate(s.held):
        if index is not None:
            held = held.index_select(dim, index.to(held.device))
    out = torch.empty_like(s.direction)
    out.copy_(held.reshape(s.direction.shape))
    return out
