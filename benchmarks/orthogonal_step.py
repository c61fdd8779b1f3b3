"""Median time of one AGD step with direction="orthogonal" against one with the paper's
Frobenius direction, on the CharLM's tensors (torch_agd/models/charlm.py, CharLM(256): dim 128,
4 layers, 26 tensors, 0.87M parameters), with Nesterov momentum 0.9 as the byte-LM runs use it.

    python benchmarks/orthogonal_step.py [--reps 50] [--device cpu|cuda] [--foreach|--loop]
                                         [--dim 128] [--layers 4] [--threads N]

Both optimizers step their own copy of the same model and gradients, interleaved round by round so
machine noise hits both alike; the line printed is each one's median and their ratio. The cost
of "orthogonal" is the Newton–Schulz chain: 5 steps of three matmuls per block, in float32.
"""
import argparse
import copy
import statistics
import time

import torch

from torch_agd import AGD
from torch_agd.models.charlm import CharLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loop", action="store_true", help="the loop path (foreach=False)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (0: torch's default); on a CPU shared with other jobs, 1 "
                         "avoids OpenMP's threads waiting on each other at every small matmul")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = CharLM(256, dim=args.dim, layers=args.layers).to(args.device)
    grads = [torch.randn_like(p) * 1e-3 for p in base.parameters()]
    models = {d: copy.deepcopy(base) for d in ("frobenius", "orthogonal")}
    for m in models.values():  # deepcopy leaves .grad behind
        for p, g in zip(m.parameters(), grads, strict=True):
            p.grad = g.clone()
    opts = {d: AGD(m, direction=d, momentum=args.momentum, foreach=not args.loop) for d, m in models.items()}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {d: [] for d in opts}
    for rep in range(args.reps + 3):
        for d, opt in opts.items():
            assert opt.steps is None or opt.steps.item() == rep  # every step is taken
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if rep >= 3:  # the first steps build buffers and plans
                times[d].append(time.perf_counter() - t0)
    med = {d: statistics.median(t) for d, t in times.items()}
    n = sum(p.numel() for p in base.parameters())
    print(f"CharLM(256) dim {args.dim} x {args.layers} layers ({n / 1e6:.2f}M params), {args.device}, "
          f"{'loop' if args.loop else 'foreach'}, {torch.get_num_threads()} threads, momentum {args.momentum}, median of {args.reps}: "
          f"frobenius {med['frobenius'] * 1e3:.2f} ms, orthogonal {med['orthogonal'] * 1e3:.2f} ms, "
          f"orthogonal/frobenius {med['orthogonal'] / med['frobenius']:.2f}x")


if __name__ == "__main__":
    main()
