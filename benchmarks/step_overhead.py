"""Median optimizer-step time of AGD relative to torch.optim.SGD and Adam on the same tensors.

    python benchmarks/step_overhead.py [--reps 100] [--device cpu|cuda|all] [--model NAME]
                                       [--compile [MODE]]

Shapes: the CIFAR-10 PreAct-ResNet-18 (21 weight tensors, 11.2M parameters) and a 16-layer,
512-wide FCN on CIFAR inputs. Every optimizer is timed on its own copy of the same tensors and
gradients, interleaved round by round, so machine noise hits all of them alike. Targets:
AGD <= 2.5x SGD on the CPU, <= 1.5x SGD on a GPU with no device-to-host sync, and a per-step
LR scheduler (lr changing every step) costing nothing measurable ("sched/AGD" near 1).
With --compile, every optimizer's step also runs under torch.compile(mode=MODE) and the compiled
steps are compared with each other: on a GPU that fuses each optimizer's elementwise work into a
few kernels, and MODE=reduce-overhead replays them as one CUDA graph, the form in which a step
costs what its memory traffic does rather than its kernel launches.
"""
import argparse
import math
import statistics
import time

import torch

from torch_agd import AGD


def scale(shape):
    """s(W) = sqrt(d_out / d_in) / sqrt(k1 * k2 * ...)."""
    return math.sqrt(shape[0] / shape[1]) / math.sqrt(math.prod(shape[2:]))


def resnet18_shapes(classes=10):
    shapes = [(64, 3, 3, 3)]
    c_in = 64
    for c in (64, 128, 256, 512):
        shapes += [(c, c_in, 3, 3), (c, c, 3, 3)]
        if c != c_in:
            shapes.append((c, c_in, 1, 1))  # shortcut convolution
        shapes += [(c, c, 3, 3), (c, c, 3, 3)]
        c_in = c
    return shapes + [(classes, 512)]


def fcn_shapes(depth=16, width=512, d_in=3 * 32 * 32, classes=10):
    return [(width, d_in)] + [(width, width)] * (depth - 2) + [(classes, width)]


def make(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=g).to(device).requires_grad_()
        p.grad = torch.randn(s, generator=g).to(device)
        params.append(p)
    return params


class PublishedStyleAGD(torch.optim.Optimizer):
    """The same AGD step built the way the paper's published code builds it: a Python loop over
    tensors, one norm per kernel position with vector_norm, and G and eta as Python floats, so one
    device-to-host copy per tensor. Written here, for timing only."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self):
        ps = [p for group in self.param_groups for p in group["params"]]
        norms = [torch.linalg.vector_norm(p.grad, dim=(0, 1), keepdim=True) for p in ps]
        G = sum(scale(p.shape) * n.sum().item() for p, n in zip(ps, norms)) / len(ps)
        eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
        for p, n in zip(ps, norms):
            p.sub_(eta / len(ps) * scale(p.shape) * p.grad / n)


class ScheduledAGD:
    """AGD with a LambdaLR stepped after every optimizer step, so lr changes every step."""

    def __init__(self, params):
        self.opt = AGD(params, foreach=True, direction="frobenius")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1 / (1 + 1e-3 * step))

    def step(self):
        self.opt.step()
        self.scheduler.step()


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3, foreach=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    # the paper's rule (direction="frobenius"): the step the published code takes, timed against it
    "agd": lambda ps: AGD(ps, foreach=True, direction="frobenius"),
    "agd-sched": ScheduledAGD,
    "agd-loop": lambda ps: AGD(ps, foreach=False, direction="frobenius"),
    "published": PublishedStyleAGD,
}


# The reference implementations allocate gradient-sized temporaries every step; their page faults
# and cache traffic slow whatever step is timed next to them, by up to half on this project's VM.
# So the main comparison and the references run in rounds of their own, each with SGD and AGD.
MAIN = ("sgd", "adam", "agd", "agd-sched")
REFERENCES = ("sgd", "agd", "agd-loop", "published")


def bench(shapes, device, reps, names, compile_mode=None):
    """Median step time of each optimizer in `names`, and the median of its per-round ratio to
    every other one (key "a/b")."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = {name: OPTIMIZERS[name](make(shapes, device)).step for name in names}
    if compile_mode:
        steps = {name: torch.compile(step, mode=compile_mode) for name, step in steps.items()}
    times = {name: [] for name in steps}
    for _ in range(3):  # warm-up: allocator, lazy state, kernels (and compilation)
        for step in steps.values():
            step()
    sync()
    for _ in range(reps):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    # Ratios are taken round by round (each round times every optimizer back to back), then
    # the median: a burst of load from elsewhere then skews a few rounds, not the answer.
    med = {name: statistics.median(t) for name, t in times.items()}
    for a in names:
        for b in names:
            med[f"{a}/{b}"] = statistics.median(x / y for x, y in zip(times[a], times[b]))
    return med


def check_no_sync(shapes, device):
    """On CUDA, a step under sync-debug 'error' mode raises on any device-to-host sync."""
    opt = AGD(make(shapes, device), direction="frobenius")
    opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "no device-to-host sync"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--model", default="all", choices=["preact-resnet18", "fcn-16x512", "all"])
    ap.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                    help="also compare torch.compile'd steps (mode: default, reduce-overhead, ...)")
    args = ap.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [torch.device(d) for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.reps} rounds;"
          " median step times, and medians of the per-round ratios")
    print(f"{'device':6} {'model':18} {'params':>8} {'SGD ms':>8} {'Adam ms':>8} {'AGD ms':>8}"
          f" {'AGD/SGD':>8} {'AGD/Adam':>9} {'sched/AGD':>9} {'loop/SGD':>9} {'pub/SGD':>8} {'AGD/pub':>8}")
    for device in devices:
        for label, shapes in (("preact-resnet18", resnet18_shapes()), ("fcn-16x512", fcn_shapes())):
            if args.model not in ("all", label):
                continue
            n = sum(torch.Size(s).numel() for s in shapes) / 1e6
            for mode in (None, args.compile) if args.compile else (None,):
                t = bench(shapes, device, args.reps, MAIN, mode)
                loop = ""
                if not mode:
                    r = bench(shapes, device, args.reps, REFERENCES)
                    loop = f"{r['agd-loop/sgd']:8.2f}x {r['published/sgd']:7.2f}x {r['agd/published']:7.2f}x"
                print(f"{device.type:6} {label + (' compiled' if mode else ''):18} {n:7.1f}M"
                      f" {t['sgd'] * 1e3:8.2f} {t['adam'] * 1e3:8.2f} {t['agd'] * 1e3:8.2f}"
                      f" {t['agd/sgd']:8.2f}x {t['agd/adam']:8.2f}x {t['agd-sched/agd']:8.2f}x {loop}")
            if device.type == "cuda":
                print(f"{'':6} {label:18} sync check: {check_no_sync(shapes, device)}")


if __name__ == "__main__":
    main()
