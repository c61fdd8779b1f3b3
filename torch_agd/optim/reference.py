"""A literal, per-block transcription of AGD's step, for the tests only.

Deliberately naive (Python loops over blocks, float64, the math module): it shares no code with
torch_agd, so agreement with it means the optimizer computes what its docs state. A block is a
list of pieces (tensor position, index into that tensor) with a scale s; one step is

    G = (1/L) sum_B s(B) ||g(B)||,  eta = log((1 + sqrt(1 + 4G)) / 2),
    every piece of B moves by -lr * gain * eta / L * s(B) * g(piece) / ||g(B)||

so a piece that sits in several blocks (a conv's bias, in each kernel position's block) moves by
the sum of their moves.
"""
import itertools
import math

import torch


def submatrices(t):
    """Yield index tuples selecting each (d_out, d_in) submatrix of a weight."""
    for pos in itertools.product(*(range(k) for k in t.shape[2:])):
        yield (slice(None), slice(None), *pos)


def s_of(shape):
    return math.sqrt(shape[0] / shape[1]) / math.sqrt(math.prod(shape[2:]))


def weight_blocks(i, shape, groups=1, bias=None, transposed=False):
    """Blocks of a conv/linear weight at position i: per group and kernel position. ``bias``: the
    position of a bias that joins them (the constant input's column of every block)."""
    rows = shape[0] // groups
    d_out, d_in = (shape[0] // groups, shape[1]) if not transposed else (shape[1], shape[0] // groups)
    k = math.prod(shape[2:])
    s = math.sqrt(d_out / (d_in + (bias is not None))) / math.sqrt(k)
    out = []
    for a in range(groups):
        r = slice(a * rows, (a + 1) * rows)
        for pos in itertools.product(*(range(n) for n in shape[2:])):
            pieces = [(i, (r, slice(None), *pos))]
            if bias is not None:  # the bias entries of this group's output channels
                pieces.append((bias, (slice(a * d_out, (a + 1) * d_out),)))
            out.append((pieces, s))
    return out


def attention_blocks(i, d, bias=None):
    """q, k and v of a packed (3d, d) in_proj_weight, each with its third of the bias."""
    s = math.sqrt(d / (d + (bias is not None)))
    return [([(i, (slice(j * d, (j + 1) * d), slice(None)))] + ([] if bias is None else [(bias, (slice(j * d, (j + 1) * d),))]), s)
            for j in range(3)]


def row_blocks(i, shape):
    """Every vector along the last dim (embedding rows, raw slots), of scale sqrt(d)."""
    d = shape[-1] if shape else 1
    if not shape:
        return [([(i, ())], 1.0)]
    return [([(i, (*idx, slice(None)))], math.sqrt(d)) for idx in itertools.product(*(range(n) for n in shape[:-1]))]


def norm_blocks(gamma, numel, beta=None):
    """A norm layer's [diag(gamma) | beta]: one block of every channel's gamma and beta, scale 1
    (flat indices into the affine tensors)."""
    pieces = [(gamma, ("flat", c)) for c in range(numel)]
    pieces += [] if beta is None else [(beta, ("flat", c)) for c in range(numel)]
    return [(pieces, 1.0)]


def _get(t, idx):
    if idx and idx[0] == "flat":
        return t.reshape(-1)[idx[1]]
    return t[idx]


def reference_blocks_step(values, grads, blocks, depth, mults=None):
    """(new values, eta) after one step over ``blocks`` (lists of pieces and scales)."""
    values = [v.detach().double().clone() for v in values]
    grads = [g.detach().double() for g in grads]
    mults = mults or [1.0] * len(values)
    norms = []
    for pieces, _ in blocks:
        norms.append(math.sqrt(sum(float(_get(grads[i], idx).square().sum()) for i, idx in pieces)))
    G = sum(s * n for (_, s), n in zip(blocks, norms, strict=True)) / depth
    eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    moves = [torch.zeros_like(v) for v in values]
    for (pieces, s), n in zip(blocks, norms, strict=True):
        if n == 0:
            continue
        for i, idx in pieces:
            step = mults[i] * eta / depth * s * _get(grads[i], idx) / n
            if idx and idx[0] == "flat":
                moves[i].view(-1)[idx[1]] += step
            else:
                moves[i][idx] += step
    return [v - m for v, m in zip(values, moves, strict=True)], eta


def reference_step(weights, grads, gain=1.0, depth=None):
    """Return (new weights, eta) for one step of the paper's rule on (out, in, kernel...) weights."""
    L = len(weights) if depth is None else depth
    G = 0.0
    for w, g in zip(weights, grads, strict=True):
        G += s_of(w.shape) * sum(torch.linalg.norm(g[idx].double()).item() for idx in submatrices(g))
    G /= L
    eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    new = []
    for w, g in zip(weights, grads, strict=True):
        w = w.detach().double().clone()
        for idx in submatrices(g):
            gm = g[idx].double()
            norm = torch.linalg.norm(gm).item()
            if norm > 0:
                w[idx] -= gain * (eta / L) * s_of(w.shape) * gm / norm
        new.append(w)
    return new, eta


def reference_momentum_steps(weights, grad_steps, momentum, nesterov=True, depth=None):
    """Weights after one step per entry of ``grad_steps`` (a list of gradient lists), with a
    buffer m <- beta m + g per tensor: the blocks of g + beta m (Nesterov) or of m (heavy ball)
    are normalised; G and eta come from g. A step whose G is not finite leaves the weights and
    clears the buffers."""
    weights = [w.detach().double().clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in weights]
    L = len(weights) if depth is None else depth
    for grads in grad_steps:
        grads = [g.double() for g in grads]
        G = sum(s_of(w.shape) * torch.linalg.norm(g[idx]).item() for w, g in zip(weights, grads, strict=True)
                for idx in submatrices(g)) / L
        if not math.isfinite(G):
            bufs = [torch.zeros_like(w) for w in weights]
            continue
        eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
        bufs = [momentum * m + g for m, g in zip(bufs, grads, strict=True)]
        dirs = [g + momentum * m for g, m in zip(grads, bufs, strict=True)] if nesterov else bufs
        for w, d in zip(weights, dirs, strict=True):
            for idx in submatrices(d):
                norm = torch.linalg.norm(d[idx]).item()
                if norm > 0:
                    w[idx] -= (eta / L) * s_of(w.shape) * d[idx] / norm
    return weights


def stacked_blocks(i, shape, transposed=False, bias=None):
    """Blocks of E matrices stored as one (E, out, in) tensor ((E, in, out) if ``transposed``):
    each expert's matrix, of scale sqrt(out/in), with its row of an (E, out) bias at ``bias``."""
    experts, a, b = shape
    d_out, d_in = (b, a) if transposed else (a, b)
    s = math.sqrt(d_out / (d_in + (bias is not None)))
    return [([(i, (e,))] + ([] if bias is None else [(bias, (e,))]), s) for e in range(experts)]


def polar_by_svd(m):
    """U Vᵀ of m = U S Vᵀ, exactly (float64)."""
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u @ vh


def as_matrices(blocks, transposed=False):
    """Mark blocks (from weight_blocks, attention_blocks, stacked_blocks) as matrix blocks for
    reference_orthogonal_step: their first piece selects the (d_out, d_in) matrix, stored
    (d_in, d_out) if ``transposed``; any further piece is a joined bias, one more column."""
    return [(pieces, s, "matrix_t" if transposed else "matrix") for pieces, s in blocks]


def reference_orthogonal_step(values, grads, blocks, depth, mults=None, directions=None, orthogonalise=polar_by_svd,
                              nuclear=False, filters=()):
    """(new values, eta) after one step of the orthogonal direction over ``blocks``: entries
    (pieces, s) move as in reference_blocks_step (by the direction's block over its Frobenius
    norm); entries (pieces, s, "matrix" | "matrix_t") build the matrix [D(W) | D(b) ...] from
    their pieces, and move by s * O([D(W) | D(b)]), split back. G and eta come from the gradients'
    Frobenius norms, the moves from ``directions`` (default the gradients). A zero block stays.
    ``nuclear``: a matrix block adds max(0, <[g(W) | g(b)], O([D(W) | D(b)])>) to G in place of
    its gradient's Frobenius norm (direction="orthogonal-nuclear"). ``filters``: lists of indices
    of matrix blocks (a conv group's kernel positions) moved as one flattened matrix, their
    matrices side by side, by sqrt(len) * s * O of it, split back (direction="orthogonal-flattened");
    G is unchanged."""
    values = [v.detach().double().clone() for v in values]
    grads = [g.detach().double() for g in grads]
    dirs = grads if directions is None else [d.detach().double() for d in directions]
    mults = mults or [1.0] * len(values)
    def matrix(arrays, pieces, kind):  # [X(W) | X(b) ...] of a matrix block, as the map
        (i, idx), *bias = pieces
        w = _get(arrays[i], idx)
        w = w.T if kind[0] == "matrix_t" else w
        return torch.cat([w] + [_get(arrays[j], jdx).reshape(-1, 1) for j, jdx in bias], dim=1), w.shape[1]

    G = 0.0
    for pieces, s, *kind in blocks:
        if nuclear and kind:
            o, _ = matrix(dirs, pieces, kind)
            g, _ = matrix(grads, pieces, kind)
            if float(o.square().sum()) > 0:
                G += s * max(0.0, float((g * orthogonalise(o)).sum()))
            continue
        G += s * math.sqrt(sum(float(_get(grads[i], idx).square().sum()) for i, idx in pieces))
    G /= depth
    eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    moves = [torch.zeros_like(v) for v in values]

    def add(i, idx, step):
        if idx and idx[0] == "flat":
            moves[i].view(-1)[idx[1]] += step
        else:
            moves[i][idx] += step

    def move(pieces, kind, o, s):  # a matrix block's move: s * o, the columns back to their pieces
        (i, idx), *bias = pieces
        d_in = o.shape[1] - len(bias)
        add(i, idx, mults[i] * eta / depth * s * (o[:, :d_in].T if kind[0] == "matrix_t" else o[:, :d_in]))
        for c, (j, jdx) in enumerate(bias):
            add(j, jdx, mults[j] * eta / depth * s * o[:, d_in + c])

    banked = {b for bank in filters for b in bank}
    for bank in filters:  # [D(B_1) | ... | D(B_K)], orthogonalised whole
        parts = [matrix(dirs, blocks[b][0], blocks[b][2:])[0] for b in bank]
        if float(sum(part.square().sum() for part in parts)) == 0:
            continue
        o = orthogonalise(torch.cat(parts, dim=1)) * math.sqrt(len(bank))
        for b, cols in zip(bank, o.split([part.shape[1] for part in parts], dim=1), strict=True):
            move(blocks[b][0], blocks[b][2:], cols, blocks[b][1])
    for number, (pieces, s, *kind) in enumerate(blocks):
        n = math.sqrt(sum(float(_get(dirs[i], idx).square().sum()) for i, idx in pieces))
        if n == 0 or number in banked:
            continue
        if not kind:
            for i, idx in pieces:
                add(i, idx, mults[i] * eta / depth * s * _get(dirs[i], idx) / n)
            continue
        move(pieces, kind, orthogonalise(matrix(dirs, pieces, kind)[0]), s)
    return [v - m for v, m in zip(values, moves, strict=True)], eta
