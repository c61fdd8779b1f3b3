"""``agd sweep NAME``: the paper's grids of ``agd train`` runs, restartable at any point.

Each run goes to ROOT/NAME/<group>-s<seed>/ and is launched as its own process
(``python -m torch_agd train ... --out DIR``), so a crash or a Ctrl-C loses at most the epoch in
flight. Re-running a sweep skips runs that wrote summary.json (in ROOT, or in the records of
``--records`` below), resumes (``--resume``) runs that left a checkpoint, and starts the rest.
ROOT/NAME/sweep.json records every run's flags, so a second sweep with other settings into the
same directory is refused instead of silently mixed.

``--records DIR`` keeps a copy of each finished run's record (config.json, metrics.jsonl,
summary.json: a few kB, no checkpoint) and of sweep.json under DIR/NAME/, for committing: ROOT
holds checkpoints and is not versioned, so a results page rendered from DIR survives a fresh
checkout (the compare page renders from records/, as scripts/make_results.sh does).

The grids (lr, shape, batch, peers, batch-steps, momentum, models, libraries, compare) and their scales are defined
in grids.py.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Sequence

from torch_agd.atomic import atomic_write_bytes
from torch_agd.errors import UsageError
from torch_agd.experiments.grids import GRIDS, SCALES, RunSpec, grid_runs
from torch_agd.experiments.runs import (
    SWEEP_MANIFEST, Run, final_stat, group_runs, has_metrics, load_run, markdown_table, read_manifest,
)
from torch_agd.train import rundir


# --- running -------------------------------------------------------------------------------

Runner = Callable[[Sequence[str], Path], int]
"""runner(train_argv, log_path) -> exit status. train_argv is what follows ``agd train``."""


class SubprocessRunner:
    """Run ``python -m torch_agd train`` as a child process with ``threads`` torch threads."""

    def __init__(self, threads: int = 1):
        self.threads = threads

    def __call__(self, argv: Sequence[str], log_path: Path) -> int:
        env = dict(os.environ)
        # Torch sizes its intra-op pool from these at start-up; one thread per run keeps
        # several concurrent runs (--jobs) from fighting over the cores.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"$ agd train {' '.join(argv)}\n")
            log.flush()
            cmd = [sys.executable, "-m", "torch_agd", "train", *argv]
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def run_state(run_dir: Path) -> str:
    """'done' (summary.json and metrics.jsonl), 'resume' (a checkpoint, but no summary or no
    metrics: the trainer rebuilds both from the checkpoint; or only config.json, a run killed
    before its first checkpoint, which the trainer refuses to start afresh but resumes from
    epoch 0) or 'new'."""
    if (run_dir / rundir.SUMMARY).exists() and has_metrics(run_dir):
        return "done"
    if (run_dir / rundir.CHECKPOINT).exists() or (run_dir / rundir.CONFIG).exists():
        return "resume"
    return "new"


def recorded_state(sweep_dir: Path, kept: Path | None, name: str) -> str:
    """run_state of sweep_dir/name, or 'kept' for a run absent from ROOT whose record kept/name is
    finished: it ran in another checkout (ROOT is not versioned), and its record is all that a
    results page reads."""
    state = run_state(sweep_dir / name)
    return "kept" if state == "new" and kept is not None and run_state(kept / name) == "done" else state


def _check_manifest(sweep_dir: Path, name: str, scale: str, specs: Sequence[RunSpec]) -> dict:
    """Merge this sweep's runs into sweep.json; refuse a run whose flags changed."""
    path = sweep_dir / SWEEP_MANIFEST
    manifest = {"grid": name, "scale": scale, "runs": {}}
    if path.exists():
        manifest = read_manifest(sweep_dir)
        if not manifest:
            raise UsageError(f"{path} is not valid JSON; delete it to start the sweep afresh")
    if manifest.get("grid") != name:
        raise UsageError(f"{sweep_dir} holds sweep '{manifest.get('grid')}', not '{name}'; "
                         f"choose another --root")
    for spec in specs:
        old = manifest["runs"].get(spec.name)
        if old is not None and old != list(spec.argv):
            raise UsageError(f"{sweep_dir / spec.name} was run with other flags "
                             f"({' '.join(old)}); use another --root for these settings")
        manifest["runs"][spec.name] = list(spec.argv)
    return manifest


RECORD_FILES = (rundir.CONFIG, rundir.METRICS, rundir.SUMMARY)  # what a results page reads of a run


def keep_record(run_dir: Path, records: Path) -> None:
    """Copy a finished run's record (RECORD_FILES) to records/<run>/, each file atomically."""
    for name in RECORD_FILES:
        atomic_write_bytes(records / run_dir.name / name, (run_dir / name).read_bytes())


@dataclass
class SweepOutcome:
    skipped: list[str]
    finished: list[str]
    failed: list[str]


def run_sweep(name: str, specs: Sequence[RunSpec], root: Path, runner: Runner, *,
              scale: str = "small", jobs: int = 1, log: Callable[[str], None] = print,
              records: Path | None = None, listed: Sequence[RunSpec] | None = None) -> SweepOutcome:
    """Run what is left of ``specs`` into root/name/; ``jobs`` runs at a time. ``records``: keep
    each finished run's record under records/name/ (keep_record), those finished before too.
    ``listed``: the whole grid, written into sweep.json (default ``specs``), so that a sweep of
    some of its runs (--only) leaves the rest listed, and a results page names them as not run."""
    sweep_dir = Path(root) / name
    listed = specs if listed is None else listed
    manifest = _check_manifest(sweep_dir, name, scale, listed)
    rundir.write_json(sweep_dir / SWEEP_MANIFEST, manifest)
    kept = None if records is None else Path(records) / name
    if kept is not None:  # the records' own manifest: every run listed, whether or not kept yet
        rundir.write_json(kept / SWEEP_MANIFEST, _check_manifest(kept, name, scale, listed))
    outcome = SweepOutcome([], [], [])
    todo = []
    recorded = 0
    for spec in specs:
        state = recorded_state(sweep_dir, kept, spec.name)
        if state == "done":
            outcome.skipped.append(spec.name)
            if kept is not None:
                keep_record(sweep_dir / spec.name, kept)
        elif state == "kept":
            outcome.skipped.append(spec.name)
            recorded += 1
        else:
            todo.append((spec, state))
    only_kept = f" ({recorded} of them only in {kept})" if recorded else ""
    log(f"sweep {name}: {len(specs)} runs, {len(outcome.skipped)} already finished{only_kept}, "
        f"{len(todo)} to run")

    def launch(spec: RunSpec, state: str) -> tuple[RunSpec, int, float]:
        run_dir = sweep_dir / spec.name
        argv = [*spec.argv, "--out", str(run_dir)] + (["--resume"] if state == "resume" else [])
        start = time.monotonic()
        status = runner(argv, sweep_dir / "logs" / f"{spec.name}.log")
        return spec, status, time.monotonic() - start

    # Runs are handed to the pool only as slots free up, from this thread: after a Ctrl-C (or
    # any error) nothing new starts, and the runs in flight end with their own SIGINT.
    queue = iter(todo)
    count = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        running = {pool.submit(launch, *item) for item in islice(queue, max(1, jobs))}
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                spec, status, seconds = future.result()
                count += 1
                ok = status == 0 and run_state(sweep_dir / spec.name) == "done"
                (outcome.finished if ok else outcome.failed).append(spec.name)
                if ok and kept is not None:
                    keep_record(sweep_dir / spec.name, kept)
                verdict = "done" if ok else f"FAILED (exit {status}; see logs/{spec.name}.log)"
                log(f"[{count}/{len(todo)}] {spec.name}: {verdict} in {seconds:.1f}s")
                running |= {pool.submit(launch, *item) for item in islice(queue, 1)}
    return outcome


def summary_table(runs: Sequence[Run]) -> str:
    """One row per group: seeds, final test accuracy and train loss (mean ± sd, min–max)."""
    rows = []
    for group, members in group_runs(runs).items():
        acc, loss = final_stat(members, "test_acc"), final_stat(members, "train_loss")
        done = sum(run.finished for run in members)
        rows.append([group, f"{done}/{len(members)}", acc.fmt(100), acc.fmt_range(100),
                     loss.fmt(1, 4)])
    return markdown_table(
        ["run", "finished", "test acc % (mean ± sd)", "test acc % (min–max)", "train loss"], rows
    )


# --- command line --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(GRIDS), help="which grid: " + ", ".join(GRIDS))
    parser.add_argument("--scale", choices=sorted(SCALES), default="small",
                        help="paper: the paper's settings on cifar10; small: fashion-mnist, CPU-sized")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration (0..N-1)")
    parser.add_argument("--root", type=Path, default=Path("runs"),
                        help="runs go to ROOT/NAME/<run>/ (default runs)")
    parser.add_argument("--records", type=Path, default=None, metavar="DIR",
                        help="also keep each finished run's config, metrics and summary (no checkpoint) "
                             "under DIR/NAME/, to commit and render results from (e.g. records); a run recorded "
                             "there and absent from ROOT counts as finished")
    parser.add_argument("--dataset", default=None, help="override the scale's dataset")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the scale's epochs (lr, shape, batch, peers; batch-steps: its steps follow)")
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None,
                        help="passed to agd train --data-dir")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (OMP_NUM_THREADS; default 1)")
    parser.add_argument("--only", nargs="+", metavar="PATTERN", default=None,
                        help="run only the grid's runs whose names match one of these shell patterns "
                             "(e.g. 'charlm-*-s1'): to choose the order on a small machine; the rest stay listed")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the runs and what would happen to each; run nothing")


def only(specs: Sequence[RunSpec], patterns: Sequence[str]) -> list[RunSpec]:
    """The specs whose run names match one of the shell ``patterns``, in the grid's order; a
    pattern that matches no run is a one-line error (a typo would otherwise run nothing)."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(spec.name, pattern) for spec in specs):
            raise UsageError(f"--only {pattern!r} matches none of the grid's {len(specs)} runs "
                             f"(names like {specs[0].name}); see --dry-run")
    return [spec for spec in specs if any(fnmatch.fnmatchcase(spec.name, p) for p in patterns)]


def run(args: argparse.Namespace, runner: Runner | None = None) -> int:
    if args.jobs < 1 or args.threads < 1:
        raise UsageError("--jobs and --threads must be at least 1")
    extra = ["--data-dir", str(args.data_dir)] if args.data_dir else []
    grid = specs = grid_runs(args.name, args.scale, args.seeds, args.dataset, args.epochs, extra)
    if args.only:
        specs = only(grid, args.only)
    sweep_dir = Path(args.root) / args.name
    kept = None if args.records is None else Path(args.records) / args.name
    if args.dry_run:
        for spec in specs:
            state = recorded_state(sweep_dir, kept, spec.name)
            print(f"{state:6}  agd train {' '.join(spec.argv)} --out {sweep_dir / spec.name}")
        return 0
    outcome = run_sweep(args.name, specs, args.root, runner or SubprocessRunner(args.threads),
                        scale=args.scale, jobs=args.jobs, records=args.records, listed=grid)
    dirs = [sweep_dir / spec.name if has_metrics(sweep_dir / spec.name) or kept is None else kept / spec.name
            for spec in specs]
    runs = [load_run(run_dir) for run_dir in dirs if has_metrics(run_dir)]
    if runs:
        print(summary_table(runs))
    if outcome.failed:
        print(f"{len(outcome.failed)} run(s) failed: {', '.join(outcome.failed)}; "
              f"run the same command again to retry them", file=sys.stderr)
        return 1
    return 0
