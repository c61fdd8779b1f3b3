"""Data-parallel scaling of AGD training: samples/s for 1 and 2 processes, and where a step goes.

    python benchmarks/scaling.py                      # CPU, and the GPUs if there are any
    python benchmarks/scaling.py --device cpu --procs 1 2 4 --depth 8 --width 1024 --batch 1024

For each device and process count N it starts N processes, as torchrun would (gloo on the CPU,
NCCL on GPUs, one GPU per process), that train the paper's FCN with AGD under
DistributedDataParallel exactly as `agd train` does: the global batch is split N ways, DDP
averages the gradients, AGD steps on the averages. Batches are synthetic Fashion-MNIST-shaped
tensors already on the device, so the numbers are the training step's alone.

Printed per N:
- samples/s of the global batch over untimed steps (no host syncs inside a step), and the
  speed-up over one process. On the CPU every configuration gets the same cores
  (--threads, default all cores, split evenly between the processes), so the speed-up measures
  what the split costs or gains, not extra hardware.
- median ms per step in forward, backward and AGD's opt.step(), from steps timed region by
  region (a host sync at each boundary).
- the gradient all-reduce. DDP launches it from backward hooks while backward still runs, so
  it cannot be timed on its own inside a step. Steps alternate between a normal, synced
  backward and one under ddp.no_sync() (same work, no communication); the all-reduce's cost
  *inside* a step is the difference of their median backward times, i.e. what the overlap
  failed to hide. Beside it: one all_reduce of a flat float32 tensor with as many elements as
  the model has parameters, the communication's full, unhidden cost.
AGD's own step (norms, G, eta, the update) runs after the all-reduce on every rank alike,
so it does not shrink with N: the printed step time is the part of a step that data
parallelism cannot split.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(rank: int, world_size: int, opts: dict, result: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from torch_agd.data import DATASETS
    from torch_agd.models import build_model
    from torch_agd.train.loop import mse_loss
    from torch_agd.train.optimizers import build_optimizer

    cuda = opts["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(opts["threads"])
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=300), device_id=device if cuda else None)
    info = DATASETS["fashion-mnist"]
    torch.manual_seed(0)
    model = build_model("fcn", info, depth=opts["depth"], width=opts["width"])
    optimizer = build_optimizer("agd", model)  # initialises the weights, before DDP wraps the model
    model.to(device)
    ddp = DistributedDataParallel(model, device_ids=[device] if cuda else None) if world_size > 1 else None
    net = ddp or model

    # A pool of global batches; this rank uses its slice of each, as Split.batches does.
    g = torch.Generator().manual_seed(1)
    batch, local = opts["batch"], opts["batch"] // world_size
    mine = slice(rank * local, (rank + 1) * local)
    pool = [(torch.randn(batch, *info.in_shape, generator=g)[mine].to(device),
             torch.randint(0, info.num_classes, (batch,), generator=g)[mine].to(device)) for _ in range(8)]

    def step(i: int) -> None:
        x, y = pool[i % len(pool)]
        optimizer.zero_grad(set_to_none=True)
        mse_loss(net(x), y).backward()
        optimizer.step()

    for i in range(opts["warmup"]):
        step(i)
    _sync(device)
    if ddp is not None:
        dist.barrier()
    start = time.perf_counter()
    for i in range(opts["steps"]):
        step(i)
    _sync(device)
    elapsed = time.perf_counter() - start

    # Region by region; odd steps skip the gradient all-reduce (no_sync), which on more than one
    # process lets the ranks' weights drift apart: harmless here, nothing reads them.
    times = {k: [] for k in ("forward", "backward_synced", "backward_no_sync", "step")}
    for i in range(2 * opts["steps"]):
        skip = ddp is not None and i % 2 == 1
        x, y = pool[i % len(pool)]
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        with ddp.no_sync() if skip else nullcontext():  # no_sync must cover the forward too
            loss = mse_loss(net(x), y)
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        _sync(device)
        t3 = time.perf_counter()
        times["forward"].append(t1 - t0)
        times["backward_no_sync" if skip else "backward_synced"].append(t2 - t1)
        times["step"].append(t3 - t2)

    n_params = sum(p.numel() for p in model.parameters())
    flat = []
    if ddp is not None:
        buffer = torch.ones(n_params, device=device)
        for i in range(opts["steps"] + 3):
            _sync(device)
            t0 = time.perf_counter()
            dist.all_reduce(buffer)
            _sync(device)
            if i >= 3:
                flat.append(time.perf_counter() - t0)
    if rank == 0:
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items() if v}
        ms["flat_all_reduce"] = 1e3 * statistics.median(flat) if flat else None
        Path(result).write_text(json.dumps({"samples_per_second": opts["steps"] * batch / elapsed,
                                            "params": n_params, "ms": ms}))
    if world_size > 1:
        dist.destroy_process_group()


def measure(world_size: int, opts: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        mp.start_processes(_worker, args=(world_size, opts, result), nprocs=world_size, start_method="spawn")
        return json.loads(Path(result).read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=512, help="global batch size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads in all, split evenly between the processes")
    args = parser.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
        print("no GPU: CPU only")
    for device in devices:
        print(f"\n{device}: fcn depth {args.depth} width {args.width}, global batch {args.batch}, "
              f"{args.steps} steps, AGD" + (f", {args.threads} CPU threads in all" if device == "cpu" else ""))
        print(f"{'procs':>5} {'samples/s':>10} {'speed-up':>8} {'fwd ms':>7} {'bwd ms':>7} "
              f"{'bwd no_sync':>11} {'allreduce in step':>17} {'flat allreduce':>14} {'AGD step ms':>11}")
        base = None
        for n in args.procs:
            if args.batch % n:
                print(f"{n:>5}  skipped: --batch {args.batch} does not split over {n} processes")
                continue
            if device == "cuda" and n > torch.cuda.device_count():
                print(f"{n:>5}  skipped: needs {n} GPUs, this machine has {torch.cuda.device_count()}")
                continue
            if device == "cpu" and n > args.threads:
                print(f"{n:>5}  skipped: fewer than one of the {args.threads} threads per process")
                continue
            opts = dict(vars(args), device=device, threads=max(1, args.threads // n))
            r = measure(n, opts)
            ms = r["ms"]
            base = base or r["samples_per_second"]
            hidden = (f"{ms['backward_synced'] - ms['backward_no_sync']:17.2f}"
                      if "backward_no_sync" in ms else f"{'-':>17}")
            flat = f"{ms['flat_all_reduce']:14.2f}" if ms["flat_all_reduce"] is not None else f"{'-':>14}"
            nosync = f"{ms['backward_no_sync']:11.2f}" if "backward_no_sync" in ms else f"{'-':>11}"
            print(f"{n:>5} {r['samples_per_second']:10,.0f} {r['samples_per_second'] / base:8.2f} "
                  f"{ms['forward']:7.2f} {ms['backward_synced']:7.2f} {nosync} {hidden} {flat} {ms['step']:11.2f}",
                  flush=True)
        print(f"({r['params']:,} parameters; ms are medians per step on rank 0; 'bwd ms' includes DDP's "
              "gradient all-reduce, 'allreduce in step' = bwd - bwd no_sync)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
