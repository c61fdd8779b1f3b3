"""Memory per rank of AGD and Adam under DDP and FSDP2, measured from the tensors each rank holds.

    python benchmarks/memory.py                                  # 12-layer transformer, 1 2 4 ranks
    python benchmarks/memory.py --ranks 1 2 --layers 4 --dim 256 # smaller
    python benchmarks/memory.py --construction --ranks 1 2 4     # building + init: whole vs meta device

--construction measures something else: how much each rank's resident memory rises (its peak
RSS, Linux's VmHWM, reset just before) while it builds and initialises the model for FSDP2,
whole and then sharded (the trainer before issue 22) or on the meta device (`agd train --fsdp`
now: torch_agd/train/meta.py), against the size of the whole model's parameters.

For each strategy (DDP, FSDP2) and number of ranks N it starts N gloo processes on the CPU (the
CPU stands in for N GPUs: what is counted is which tensors exist, not where) that build the same
model from the same seed, wrap it as `agd train` does (DDP; or FSDP2 with the trainer's policy,
torch_agd.train.fsdp.shard_model: each transformer layer, the embedding, the final norm and the
head are units, the root takes the rest), build the optimizer on it, and take two training steps.
Then each rank adds up the bytes of the storages it holds (untyped_storage().nbytes(), each
storage once; a DTensor counts its local shard), in this order, each storage in the first group
it appears in:

- params: the parameters (FSDP2: this rank's shards, padded as FSDP2 pads them);
- grads: their .grad tensors;
- buckets: DDP's gradient buckets, read in a communication hook (one more copy of the gradients
  that DDP all-reduces; gradient_as_bucket_view=False, DDP's and the trainer's default);
- optimizer: every other tensor the optimizer holds (its state; for AGD also its cached step
  layouts), found by walking the optimizer object;
- gathered (FSDP2, transient): the largest unit's parameters as its forward sees them, all-gathered
  whole, read in a forward hook. They are freed after the unit's forward (and again after its
  backward), so they are not part of the total.

The printed table gives each figure in MiB for the rank that holds the most (shards may differ
in length by a row), bytes per parameter, and the largest model of the same shape that fits one
80 GB GPU per rank, derived from them:

    P_max = 0.9 * 80e9 B / (total bytes per parameter + 3 * gathered bytes per parameter)

10% of the GPU is left for the CUDA context, the allocator and workspace; activations are
excluded (they depend on batch and sequence, not on the optimizer); float32 parameters and
gradients (mixed precision computes in bf16 but keeps float32 master weights, and AGD needs
them); the transient term assumes FSDP2 holds at most two units' gathered parameters (the
one computing and the one prefetched) and one unit's unsharded gradients at a time, and that
a unit stays the same fraction of the model as it grows (more width, same depth).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

GPU_BYTES = 80e9
HEADROOM = 0.9
TRANSIENT_UNITS = 3  # two units' gathered parameters (one prefetched) and one unit's unsharded gradients
OPTIMIZERS = ("agd", "adam")
STRATEGIES = ("ddp", "fsdp")
MIB = 2 ** 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Ledger:
    """Bytes of storages, each counted once, in the first group it is added to."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, group: str, tensors) -> None:
        total = self.bytes.setdefault(group, 0)
        for t in tensors:
            storage = _local(t).untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                total += storage.nbytes()
        self.bytes[group] = total


def _held_tensors(obj, found: list, visited: set, depth: int = 0) -> list:
    """Every tensor reachable from ``obj`` through dicts, lists, tuples and object attributes."""
    if id(obj) in visited or depth > 12:
        return found
    visited.add(id(obj))
    if isinstance(obj, Tensor):
        found.append(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _held_tensors(key, found, visited, depth + 1)
            _held_tensors(value, found, visited, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            _held_tensors(value, found, visited, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        _held_tensors(vars(obj), found, visited, depth + 1)
    return found


def build_model(opts: dict) -> nn.Module:
    from torch_agd.models.charlm import CharLM

    return CharLM(opts["vocab"], dim=opts["dim"], layers=opts["layers"], heads=opts["heads"],
                  context=opts["context"])


def _worker(rank: int, world_size: int, strategy: str, opts: dict, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from torch_agd.train import fsdp
    from torch_agd.train.dist import DistEnv
    from torch_agd.train.optimizers import build_optimizer, init_weights

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=600))
    env = DistEnv(rank=rank, world_size=world_size)
    results = {}
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        model = build_model(opts)
        n_params = sum(p.numel() for p in model.parameters())
        init_weights(name, model)  # AGD draws the weights; Adam keeps torch's
        buckets, gathered = {}, {}
        if strategy == "ddp":
            net = DistributedDataParallel(model)

            def record(state, bucket):
                buckets[bucket.index()] = bucket.buffer()
                return allreduce_hook(state, bucket)

            net.register_comm_hook(None, record)
        else:
            fsdp.shard_model(model, env)
            net = model
            for unit in fsdp.units(model):
                def seen(module, args, output, _unit=unit):
                    ledger = Ledger()
                    ledger.add("unit", module.parameters())
                    gathered[id(_unit)] = ledger.bytes["unit"]

                # prepend: before FSDP2's own post-forward hook frees the gathered parameters
                unit.register_forward_hook(seen, prepend=True)
        optimizer = build_optimizer(name, model, init=False)  # once, on what the model now holds (shards under FSDP2)
        g = torch.Generator().manual_seed(1)
        local = opts["batch"] // world_size
        for _ in range(2):  # DDP rebuilds its buckets after the first step
            idx = torch.randint(0, opts["vocab"], (opts["batch"], opts["context"] + 1), generator=g)
            mine = idx[rank * local:(rank + 1) * local]
            optimizer.zero_grad(set_to_none=False)
            logits = net(mine[:, :-1])
            nn.functional.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten()).backward()
            optimizer.step()
        ledger = Ledger()
        ledger.add("params", model.parameters())
        ledger.add("grads", [p.grad for p in model.parameters() if p.grad is not None])
        ledger.add("buckets", buckets.values())
        ledger.add("optimizer", _held_tensors(optimizer, [], set()))
        results[name] = dict(ledger.bytes, gathered=max(gathered.values(), default=0), n_params=n_params)
        del net, model, optimizer, buckets
    everyone = [None] * world_size
    dist.all_gather_object(everyone, results)
    if rank == 0:
        Path(out).write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()


def measure(strategy: str, world_size: int, opts: dict) -> list[dict]:
    """Every rank's figures, per optimizer."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        mp.start_processes(_worker, args=(world_size, strategy, opts, out), nprocs=world_size, start_method="spawn")
        return json.loads(Path(out).read_text())


GROUPS = ("params", "grads", "buckets", "optimizer")


def row(strategy: str, name: str, world_size: int, ranks: list[dict]) -> dict:
    """The rank that holds the most, and the figures derived from it."""
    worst = max((r[name] for r in ranks), key=lambda r: sum(r[g] for g in GROUPS))
    n = worst["n_params"]
    total = sum(worst[g] for g in GROUPS)
    per_param = total / n
    transient = TRANSIENT_UNITS * worst["gathered"] / n
    return dict(strategy=strategy, name=name, ranks=world_size, n_params=n,
                **{g: worst[g] for g in GROUPS}, total=total, gathered=worst["gathered"],
                per_param=per_param, max_params=HEADROOM * GPU_BYTES / (per_param + transient))


def _billions(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def print_table(rows: list[dict]) -> None:
    head = ("| strategy | optimizer | ranks | params MiB | grads MiB | DDP buckets MiB | optimizer MiB | "
            "total MiB | bytes/param | gathered unit MiB (transient) | largest model in 80 GB |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        name = {"agd": "AGD", "adam": "Adam"}[r["name"]]
        print(f"| {r['strategy'].upper() if r['strategy'] == 'ddp' else 'FSDP2'} | {name} | {r['ranks']} | "
              f"{r['params'] / MIB:,.1f} | {r['grads'] / MIB:,.1f} | {r['buckets'] / MIB:,.1f} | "
              f"{r['optimizer'] / MIB:,.3f} | {r['total'] / MIB:,.1f} | {r['per_param']:.2f} | "
              f"{r['gathered'] / MIB:,.1f} | {_billions(r['max_params'])} |")


# ------------------------------------------------------------ construction: whole or on the meta device


def _rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    # Linux >= 4.0: the peak resident set size starts again from what is resident now.
    Path("/proc/self/clear_refs").write_text("5")


def _build_and_init(how: str, opts: dict, env) -> nn.Module:
    """What each rank of `agd train --fsdp --optimizer agd` does before the optimizer: "whole" (the
    trainer before issue 22: build on the CPU, init_weights_, then shard) or "meta"."""
    from torch_agd import init_weights_
    from torch_agd.train import fsdp, meta

    torch.manual_seed(0)
    if how == "whole":
        model = build_model(opts)
        init_weights_(model)
        fsdp.shard_model(model, env)
        return model
    model, why = meta.build_on_meta(lambda: build_model(opts))
    assert why is None and meta.why_not(model) is None
    fsdp.shard_model(model, env)
    model.to_empty(device="cpu")
    meta.reset_constants_(model)
    init_weights_(model)
    return model


def _construction_worker(rank: int, world_size: int, how: str, opts: dict, out: str) -> None:
    from torch_agd.train.dist import DistEnv

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=600))
    env = DistEnv(rank=rank, world_size=world_size)
    # Once on a tiny model first: imports, MKL's and gloo's first allocations are not the model's.
    _build_and_init(how, dict(opts, layers=1, dim=opts["heads"] * 2, vocab=8, context=4), env)
    dist.barrier()
    now = _rss_kib("VmRSS")
    _reset_peak()
    model = _build_and_init(how, opts, env)
    peak = (_rss_kib("VmHWM") - now) * 1024
    held = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    everyone = [None] * world_size
    dist.all_gather_object(everyone, {"peak": peak, "held": held})
    if rank == 0:
        Path(out).write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()


def measure_construction(how: str, world_size: int, opts: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        mp.start_processes(_construction_worker, args=(world_size, how, opts, out), nprocs=world_size,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def construction_table(ranks: list[int], opts: dict) -> list[dict]:
    """Per number of ranks, the largest rise in resident memory (peak RSS, from Linux's VmHWM) of
    any rank while it builds and initialises the model, whole and on the meta device, against the
    bytes of the whole model's parameters."""
    model_bytes = sum(p.numel() * p.element_size() for p in build_model(opts).parameters())
    rows = []
    for n in ranks:
        whole, on_meta = (measure_construction(how, n, opts) for how in ("whole", "meta"))
        rows.append(dict(ranks=n, model=model_bytes, whole=max(r["peak"] for r in whole),
                         meta=max(r["peak"] for r in on_meta), shard=max(r["held"] for r in on_meta)))
        print(f"  measured construction on {n} rank(s)", file=sys.stderr, flush=True)
    print("| ranks | model MiB | shard MiB (per rank) | peak RSS rise, whole build + init MiB | "
          "peak RSS rise, meta build + init MiB | whole / model | meta / model |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['model'] / MIB:,.1f} | {r['shard'] / MIB:,.1f} | {r['whole'] / MIB:,.1f} | "
              f"{r['meta'] / MIB:,.1f} | {r['whole'] / r['model']:.2f} | {r['meta'] / r['model']:.2f} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences), split over the ranks")
    parser.add_argument("--construction", action="store_true",
                        help="measure instead the peak memory per rank while building and initialising the "
                             "model for FSDP2: whole (then sharded) and on the meta device")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    opts = vars(args)
    for n in args.ranks:
        if args.batch % n:
            parser.error(f"--batch {args.batch} does not split over {n} ranks")
    print(f"CharLM: {args.layers} layers, dim {args.dim}, {args.heads} heads, vocab {args.vocab}, "
          f"context {args.context}; {sum(p.numel() for p in build_model(opts).parameters()):,} parameters, "
          f"float32; torch {torch.__version__}; figures per rank (the rank holding the most)", flush=True)
    if args.construction:
        rows = construction_table(args.ranks, opts)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    rows = []
    for strategy in args.strategies:
        for n in args.ranks:
            ranks = measure(strategy, n, opts)
            rows += [row(strategy, name, n, ranks) for name in OPTIMIZERS]
            print(f"  measured {strategy} on {n} rank(s)", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
