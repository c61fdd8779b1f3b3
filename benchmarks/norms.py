"""The CPU norm kernels behind AGD's fast path, measured side by side in one run.

    python benchmarks/norms.py

1. Read rate (GB/s of gradient read) of a cold 512x512x3x3 gradient: the per-kernel-position
   sums of squares by cpu_kernels.column_sq (the fast path) and by vector_norm(dim=(0, 1)), beside one
   whole-tensor norm by _foreach_norm, by BLAS dot and a plain sum().
2. Relative error against float64 of a float32 norm by vector_norm, _foreach_norm and dot.
3. The fixed cost of one step: AGD, Adam and SGD on the ResNet-18's 21 tensors shrunk 64x per
   channel dimension, so that the step is all overhead.
"""
import statistics
import time

import torch

from step_overhead import make, resnet18_shapes
from torch_agd import AGD
from torch_agd.optim import cpu_kernels


def median_ms(fn, tensors, reps=60):
    """Median time of fn(t), cycling through `tensors` (more than the cache holds: a cold read)."""
    times = []
    for r in range(reps + 8):
        t = tensors[r % len(tensors)]
        t0 = time.perf_counter()
        fn(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[8:]) * 1e3


def read_rates():
    gs = [torch.randn(512, 512, 3, 3) for _ in range(6)]  # 57 MB in all
    k = 9
    rows = cpu_kernels.rows_view(gs[0], k)
    workspace = cpu_kernels.workspace(torch.float32)
    kernels = {
        "column_sq (per kernel position)": lambda g: cpu_kernels.column_sq(g, rows, k, workspace),
        "vector_norm(dim=(0, 1)) (per kernel position)": lambda g: torch.linalg.vector_norm(g, dim=(0, 1)),
        "_foreach_norm (whole tensor)": lambda g: torch._foreach_norm([g]),
        "dot (whole tensor)": lambda g: torch.dot(g.view(-1), g.view(-1)),
        "sum() (whole tensor, no squares)": lambda g: g.sum(),
    }
    gb = gs[0].numel() * 4 / 1e9
    print("read rate of a cold 512x512x3x3 float32 gradient:")
    for name, fn in kernels.items():
        print(f"  {name:48} {gb / median_ms(fn, gs) * 1e3:6.1f} GB/s")


def accuracy():
    print("relative error of a float32 norm against float64 (randn * 3 + 1):")
    for n in (2_359_296, 50_000_000):
        x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 3 + 1
        exact = x.double().square().sum().sqrt().item()
        found = {"vector_norm": torch.linalg.vector_norm(x).item(),
                 "_foreach_norm": torch._foreach_norm([x])[0].item(),
                 "dot": torch.dot(x, x).sqrt().item()}
        print(f"  {n:>10,} elements: " + ", ".join(f"{k} {abs(v - exact) / exact:.1e}" for k, v in found.items()))


def fixed_cost():
    shapes = [(max(1, s[0] // 64), max(1, s[1] // 64), *s[2:]) for s in resnet18_shapes()]
    steps = {"AGD": AGD(make(shapes, "cpu"), direction="frobenius").step,  # the paper's step
             "Adam": torch.optim.Adam(make(shapes, "cpu"), foreach=True).step,
             "SGD": torch.optim.SGD(make(shapes, "cpu"), lr=1e-3, foreach=True).step}
    print("fixed cost of one step on 21 tiny tensors:")
    for name, step in steps.items():
        print(f"  {name:5} {median_ms(lambda _: step(), [None], reps=300):.3f} ms")


if __name__ == "__main__":
    read_rates()
    accuracy()
    fixed_cost()
