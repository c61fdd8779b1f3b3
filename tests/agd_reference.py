"""A literal, per-submatrix transcription of AGD's step from the spec, for the tests only.

Deliberately naive (Python loops over kernel positions, float64, math module): it shares no code
with torch_agd, so agreement with it means the optimizer computes what the paper states.
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


def reference_step(weights, grads, gain=1.0, depth=None):
    """Return (new weights, eta) for one AGD step, in float64."""
    L = len(weights) if depth is None else depth
    G = 0.0
    for w, g in zip(weights, grads):
        G += s_of(w.shape) * sum(torch.linalg.norm(g[idx].double()).item() for idx in submatrices(g))
    G /= L
    eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    new = []
    for w, g in zip(weights, grads):
        w = w.detach().double().clone()
        for idx in submatrices(g):
            gm = g[idx].double()
            norm = torch.linalg.norm(gm).item()
            if norm > 0:
                w[idx] -= gain * (eta / L) * s_of(w.shape) * gm / norm
        new.append(w)
    return new, eta
