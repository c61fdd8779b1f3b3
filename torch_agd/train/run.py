"""`agd train`: one run, from flags to a finished run directory.

    flags -> TrainConfig (fresh, or DIR/config.json on --resume) -> process group -> model (+ init)
          -> (shards, under --fsdp) -> optimizer -> data -> checkpoint? -> epochs (train, evaluate,
          save) -> summary

Every file of the run directory is written atomically after each epoch, so a run killed at
any moment resumes from its last completed epoch with `--out DIR --resume` and ends with the
same weights, bit for bit on the CPU, as if it had never stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from torch_agd.data import DATASETS, default_data_dir, load_data
from torch_agd.errors import UsageError
from torch_agd.models import ARCHS, build_model
from torch_agd.train import checkpoint as ckpt
from torch_agd.train import fsdp, meta, rundir, tp
from torch_agd.train.config import (CONFIG_FORMAT, TrainConfig, add_arguments, check_fsdp, check_split, default_out,
                                    resolve_config)
from torch_agd.train.dist import DistEnv, collective_failure, launch_position
from torch_agd.train.loop import LOSSES, evaluate, train_epoch
from torch_agd.train.muon import example_input
from torch_agd.train.optimizers import agd_of, build_optimizer, init_weights, needs_example
from torch_agd.train.schedule import build_scheduler

__all__ = ["add_arguments", "run"]  # what the CLI's `train` subcommand calls


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _check_new_run_dir(out: Path) -> None:
    if (out / rundir.CONFIG).exists():
        raise UsageError(f"{out} already holds a run: add --resume to continue it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")


def _start_run_dir(out: Path, config: TrainConfig, optimizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from torch_agd import __version__

    agd = agd_of(optimizer)
    agd_L = {} if agd is None else {"agd_L": agd.depth}  # the L that AGD found (--agd-depth auto) or was given
    rundir.write_json(out / rundir.CONFIG, {**config.flag_values(), **agd_L, "config_format": CONFIG_FORMAT,
                                            "version": __version__, "git_commit": _git_commit()})


# ------------------------------------------------------------------------ reporting


class Reporter:
    """Rank 0's voice: tqdm bars on a terminal, one plain line per epoch otherwise."""

    def __init__(self, env: DistEnv, epochs: int, start: int):
        self.active = env.is_master
        self.bars = self.active and sys.stderr.isatty()
        self.epoch_bar = None
        if self.bars:
            try:
                from tqdm import tqdm
            except ImportError:
                raise UsageError('progress bars need tqdm: pip install "torch-agd[train]"') from None
            self.tqdm = tqdm
            self.epoch_bar = tqdm(total=epochs, initial=start, desc="epochs", unit="epoch", dynamic_ncols=True)

    def batches(self, iterable, total: int, epoch: int):
        if not self.bars:
            return iterable
        return self.tqdm(iterable, total=total, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True)

    def line(self, text: str) -> None:
        if self.bars:
            self.tqdm.write(text)
        elif self.active:
            print(text, flush=True)

    def epoch_done(self) -> None:
        if self.epoch_bar is not None:
            self.epoch_bar.update()

    def close(self) -> None:
        if self.epoch_bar is not None:
            self.epoch_bar.close()


def _epoch_line(row: dict, epochs: int) -> str:
    eta = "" if row["eta_mean"] is None else (
        f"  eta {row['eta_mean']:.4f} [{row['eta_min']:.4f}, {row['eta_max']:.4f}]"
        + (f" skipped {row['skipped_steps']}" if row["skipped_steps"] else ""))
    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%"
            f"  test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%{eta}"
            f"  {row['epoch_seconds']:.1f}s {row['train_samples_per_second']:,.0f} samples/s")


def _summary(history: list[dict], out: Path) -> dict:
    best = max(history, key=lambda r: r["test_acc"])
    last = history[-1]
    return {
        "epochs": last["epoch"],
        "test_acc": last["test_acc"], "test_loss": last["test_loss"],
        "train_acc": last["train_acc"], "train_loss": last["train_loss"],
        "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
        "train_seconds": sum(r["epoch_seconds"] for r in history),
        "run_dir": str(out),
    }


# ------------------------------------------------------------------------ the run


def _metrics_row(epoch, train, test, skipped_before, seconds, train_seconds) -> dict:
    """``train``: synced train_epoch values; ``test``: (loss sum, correct, count)."""
    loss_sum, correct, count = train["totals"]
    row = {
        "epoch": epoch,
        "train_loss": loss_sum / count, "train_acc": correct / count,
        "test_loss": test[0] / test[2], "test_acc": test[1] / test[2],
        "eta_mean": None, "eta_min": None, "eta_max": None, "skipped_steps": None,
        "epoch_seconds": seconds,
        "train_samples_per_second": count / train_seconds,
    }
    if "eta" in train:
        eta_sum, eta_min, eta_max, skipped = train["eta"]
        row.update(eta_mean=eta_sum / train["steps"], eta_min=eta_min, eta_max=eta_max,
                   skipped_steps=int(skipped) - skipped_before)
    return row


def _sync_train(stats: dict, agd, env: DistEnv) -> dict:
    """One host sync (and one all-reduce) for an epoch's training statistics; ``agd``: the AGD
    that stepped (agd_of), whose eta and skipped steps are reported, or None."""
    device = stats["loss_sum"].device
    totals = torch.stack([stats["loss_sum"].double(), stats["correct"].double(),
                          torch.tensor(float(stats["count"]), dtype=torch.float64, device=device)])
    env.all_reduce_sum(totals)
    parts = [totals]
    if "eta_sum" in stats:  # eta is the same on every rank: it comes from the averaged gradients
        skipped = agd.skipped_steps
        parts.append(torch.stack([stats["eta_sum"].double(), stats["eta_min"].double(),
                                  stats["eta_max"].double(), skipped.double()]))
    values = torch.cat(parts).tolist()
    synced = {"totals": values[:3], "steps": stats["steps"]}
    if len(values) > 3:
        synced["eta"] = values[3:]
    return synced


def _switch(optimizer, mode: str) -> None:
    """Schedule-free optimizers hold different weights for training and evaluation."""
    if callable(getattr(optimizer, mode, None)):
        getattr(optimizer, mode)()


# How long a rank other than 0 waits, after a mistake in the flags, before it exits.
QUIET_RANK_WAIT_S = 10.0


def run(args: argparse.Namespace) -> int:
    # Mistakes in the flags are found before joining the process group, so a bad launch stops
    # at once; every rank finds them alike, so only rank 0 says so (a resume also reads
    # DIR/config.json, which a node may not see: then every rank speaks for itself).
    rank, world_size = launch_position()
    try:
        config, resuming = resolve_config(args)
        tp.check(config, world_size)
        check_split(config, world_size // config.tp)  # the tp ranks of a dp group share its batches
        check_fsdp(config)
    except UsageError:
        if rank != 0 and not args.resume:
            # A rank that leaves first gets rank 0 killed by the launcher before it has said why,
            # so the others wait (the launcher ends them once rank 0 has spoken and left).
            time.sleep(QUIET_RANK_WAIT_S)
            return 2
        raise
    env = DistEnv.create(cpu=config.cpu, distribute=config.distribute, fsdp=config.fsdp)
    try:
        config = _with_places(config, env)
        code = _train(config, resuming, env)
        if code == 0:
            # Leave together: a rank that tears down its process group while another still
            # talks to it can abort the job ("terminate called without an active exception").
            env.barrier()
        return code
    except Exception as exc:
        # A rank that died or hung: one line, instead of every rank's traceback from inside DDP.
        message = collective_failure(exc, env.rank, env.world_size) if env.distributed else None
        if message is None:
            raise
        print(f"agd: error: {message}; continue with --out {config.out} --resume", file=sys.stderr, flush=True)
        # Leave at once, without tearing down the process group: its other pending collectives
        # wait on the lost peer too, and one timing out later in a gloo thread aborts the process
        # (SIGABRT instead of this exit code). Every file of the run is already complete on disk.
        sys.stdout.flush()
        os._exit(1)
    finally:
        env.close()


def _with_places(config: TrainConfig, env: DistEnv) -> TrainConfig:
    """``config`` with its data dir and run directory filled in where the flags left them out
    (config.json records them so); every rank gets rank 0's run directory name."""
    data_dir = config.data_dir if config.data_dir is not None else str(default_data_dir())
    out = config.out
    if out is None:
        out = env.broadcast_object(default_out(config) if env.is_master else None)
    return dataclasses.replace(config, data_dir=data_dir, out=out)


def _build(config: TrainConfig, env: DistEnv):
    """The model, on env.device (sharded under --fsdp), and its optimizer."""
    info = DATASETS[config.dataset]
    sharded_from_meta = config.fsdp and config.tp <= 1 and config.optimizer == "agd"
    model = _sharded_from_meta(config, info, env) if sharded_from_meta else None
    if model is None:
        # The weights are drawn on the CPU from the seed, whole, so a run starts from the same weights
        # on any device, on every rank and with or without --fsdp.
        torch.manual_seed(config.seed)
        model = build_model(config.arch, info, depth=config.depth, width=config.width)
        init_weights(config.optimizer, model)
        model.to(env.device)
        if config.tp > 1:  # TP, then FSDP2 over dp (train/tp.py)
            tp.shard_model(model, env, config.tp, config.arch)
        elif config.fsdp:  # replaces the parameters: the optimizer is built after, on the shards
            fsdp.shard_model(model, env)
    optimizer = build_optimizer(config.optimizer, model, lr=config.lr, gain=config.gain, agd_depth=config.agd_depth,
                                momentum=config.momentum, nesterov=config.nesterov, direction=config.agd_direction,
                                agd_head=config.agd_head, init=False, aux_lr=config.aux_lr,
                                muon_adjust_lr=config.muon_adjust_lr, muon_ns_dtype=config.muon_ns_dtype,
                                example=example_input(info) if needs_example(config.optimizer, config.agd_head) else None)
    return model, optimizer


def _sharded_from_meta(config: TrainConfig, info, env: DistEnv):
    """--fsdp with AGD: the model built on the meta device, sharded, this rank's shards allocated
    and initialised: bitwise the weights of the whole build below, without ever holding them all
    (train/meta.py). None, with one line from rank 0, for a model that must be built whole."""
    torch.manual_seed(config.seed)
    if config.arch not in ARCHS:  # found by trying: hf:gpt2's constructor draws less on the meta device
        model, why = None, ("the constructors of timm and Hugging Face models may draw differently there, "
                            "which would change the weights the seed gives")
    else:
        model, why = meta.build_on_meta(lambda: build_model(config.arch, info, depth=config.depth, width=config.width))
        why = why or meta.why_not(model)
    if why is not None:
        if env.is_master:
            print(f"--fsdp: building {config.arch} whole on every rank, not on the meta device: {why}", flush=True)
        return None
    fsdp.shard_model(model, env)
    model.to_empty(device=env.device)
    meta.reset_constants_(model)
    init_weights(config.optimizer, model)
    return model


def _train(config: TrainConfig, resuming: bool, env: DistEnv) -> int:
    out = Path(config.out)
    if not resuming:
        _check_new_run_dir(out)
    model, optimizer = _build(config, env)
    agd = agd_of(optimizer)
    denv = tp.data_env(model, env, config.tp)  # whose slice of the data, and whose sums: dp's under --tp

    # One process per machine downloads (the data dir may be local to each node); the others
    # then find the files in place.
    if env.local_rank == 0:
        data = load_data(config.dataset, config.data_dir, env.device, workers=config.workers)
    env.barrier()
    if env.local_rank != 0:
        data = load_data(config.dataset, config.data_dir, env.device, workers=config.workers)
    if env.is_master:
        print(f"data: {data.source}", flush=True)

    data.train.check_batch_size(config.train_bs, rank=denv.rank, world_size=denv.world_size,
                                name="--train_bs")  # before the run directory is written
    # A step budget is whole epochs and the first steps of one more.
    per_epoch = data.train.num_batches(config.train_bs, world_size=denv.world_size)
    epochs = config.epochs if config.steps is None else -(-config.steps // per_epoch)
    # Before the optimizer's state is loaded: the scheduler sets every lr when it is built.
    scheduler = build_scheduler(optimizer, config.schedule, config.steps or epochs * per_epoch, config.warmup)
    if env.is_master and not resuming:
        _start_run_dir(out, config, optimizer)
    history: list[dict] = []
    start = 0
    checkpoint = fsdp.checkpoint_path(out, sharded=config.fsdp, resuming=resuming)
    have_checkpoint = resuming and checkpoint.exists()
    if env.broadcast_object(have_checkpoint) != have_checkpoint:  # every rank must resume from the same epoch
        raise UsageError(f"rank {env.rank} cannot see {checkpoint}, which rank 0 has: "
                         "--out must be a directory that every machine shares")
    if have_checkpoint and config.fsdp:  # every rank reads the shards it holds now
        state = fsdp.load_checkpoint(checkpoint, model=model, optimizer=optimizer)
    elif have_checkpoint:
        state = ckpt.load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if have_checkpoint:
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        history, start = state["metrics"], state["epoch"]
        if env.is_master:  # the kill may have come between the checkpoint and the metrics file
            rundir.write_jsonl(out / rundir.METRICS, history)

    train_model = model
    ddp = env.distributed and not config.fsdp
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    # Evaluation runs without DDP: ranks may hold different numbers of test batches.
    eval_model = train_model if not ddp else (torch.compile(model) if config.compile else model)

    loss_fn = LOSSES[config.loss]
    reporter = Reporter(env, epochs, start)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    resumed = f"resuming at epoch {start + 1}: " if 0 < start < epochs else ""
    if start and start == epochs:
        resumed = f"already finished {epochs} epochs: "
    reporter.line(f"{resumed}{config.arch} on {config.dataset} with {config.optimizer}: {n_params:,} parameters "
                  f"in {n_tensors} tensors, {env.world_size} x {env.device.type}{', FSDP' if config.fsdp else ''}; "
                  f"run directory {out}")
    skipped_before = sum(r["skipped_steps"] or 0 for r in history)
    epoch = start
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            _switch(optimizer, "train")
            batches = data.train.batches(config.train_bs, epoch=epoch, seed=config.seed,
                                         rank=denv.rank, world_size=denv.world_size)
            n = per_epoch if config.steps is None else min(per_epoch, config.steps - epoch * per_epoch)
            stats = train_epoch(train_model, optimizer,
                                reporter.batches(itertools.islice(batches, n), n, epoch + 1),
                                loss_fn=loss_fn, device=env.device, amp=config.amp, scheduler=scheduler)
            train = _sync_train(stats, agd, denv)
            t1 = time.perf_counter()

            _switch(optimizer, "eval")
            env.broadcast_(model.buffers())  # every rank evaluates rank 0's BatchNorm statistics
            test_batches = data.test.batches(config.test_bs, rank=denv.rank, world_size=denv.world_size)
            if config.fsdp:  # a sharded forward is a collective: as many on every rank
                test_batches = fsdp.in_lockstep(test_batches, model, data.test, config.test_bs, denv)
            test = evaluate(eval_model, test_batches, loss_fn=loss_fn, device=env.device, amp=config.amp)
            test = denv.all_reduce_sum(test).tolist()
            row = _metrics_row(epoch + 1, train, test, skipped_before, time.perf_counter() - t0, t1 - t0)
            skipped_before += row["skipped_steps"] or 0
            history.append(row)
            # Checkpoint first: metrics.jsonl is rebuilt from it on resume.
            if config.fsdp:  # every rank writes its own shards
                fsdp.save_checkpoint(out, model=model, optimizer=optimizer, epoch=epoch + 1, metrics=history, env=env,
                                     scheduler=scheduler)
            elif env.is_master:
                ckpt.save_checkpoint(out / rundir.CHECKPOINT, model=model, optimizer=optimizer,
                                     epoch=epoch + 1, metrics=history, scheduler=scheduler)
            if env.is_master:
                rundir.write_jsonl(out / rundir.METRICS, history)
            reporter.line(_epoch_line(row, epochs))
            reporter.epoch_done()
    except KeyboardInterrupt:
        reporter.close()
        if env.is_master:
            print(f"\ninterrupted in epoch {epoch + 1}; {checkpoint} holds the last completed "
                  f"epoch ({len(history)}): continue with  agd train --out {out} --resume", file=sys.stderr)
        return 130
    reporter.close()

    summary = _summary(history, out)
    if env.is_master:
        rundir.write_json(out / rundir.SUMMARY, summary)  # last: marks the run finished
    reporter.line(f"done: {summary['epochs']} epochs, test accuracy {100 * summary['test_acc']:.2f}% "
                  f"(best {100 * summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}), "
                  f"{summary['train_seconds']:.1f}s; run directory {out}")
    return 0
