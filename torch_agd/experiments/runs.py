"""Run directories as data: loading, grouping by seed, mean and spread over seeds, tables.

A run directory is what ``agd train --out DIR`` writes (torch_agd.train.rundir). A sweep
directory holds run directories named ``<group>-s<seed>`` (run_name) and a sweep.json; runs that
differ only in their seed share a group, and a group's numbers are the mean and spread over its
seeds. plot.py draws these runs, results.py writes the results page from them, sweep.py prints
their table.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from torch_agd.errors import UsageError
from torch_agd.train import rundir

SWEEP_MANIFEST = "sweep.json"  # in a sweep directory: its grid and every run's flags
_SEED_SUFFIX = re.compile(r"-s(\d+)$")


def read_manifest(sweep_dir: Path) -> dict:
    """A sweep directory's sweep.json: {"grid", "scale", "runs": {name: argv}}; {} where there
    is none or it is not valid JSON."""
    return rundir.read_json(Path(sweep_dir) / SWEEP_MANIFEST)


def run_name(group: str, seed: int) -> str:
    """The directory name of ``group``'s run at ``seed``; Run.group reads the group back."""
    return f"{group}-s{seed}"


@dataclass
class Run:
    """One run directory, read once."""

    path: Path
    config: dict
    metrics: list[dict]
    finished: bool  # summary.json exists: every epoch completed

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def group(self) -> str:
        """The run's name without its seed: runs that differ only in the seed share it."""
        return _SEED_SUFFIX.sub("", self.name)

    def param(self, key: str, default=None):
        """A flag of the run, from config.json (argparse names: train_bs, lr, depth, ...)."""
        value = self.config.get(key)
        return default if value is None else value

    def final(self, key: str) -> float:
        """The last epoch's value of ``key`` (NaN if there is none, e.g. a diverged run)."""
        for row in reversed(self.metrics):
            value = row.get(key)
            if value is not None:
                return float(value)
        return math.nan

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of ``key`` over the run; missing or null values become NaN."""
        epochs = [int(row.get("epoch", i + 1)) for i, row in enumerate(self.metrics)]
        values = [math.nan if row.get(key) is None else float(row[key]) for row in self.metrics]
        return epochs, values


def has_metrics(path: Path) -> bool:
    """Whether ``path`` is a run directory that got as far as one epoch's metrics."""
    return (Path(path) / rundir.METRICS).exists()


def load_run(path: Path) -> Run:
    """Read a run directory; a torn last line of metrics.jsonl (a killed run) is ignored."""
    path = Path(path)
    return Run(path, rundir.read_json(path / rundir.CONFIG), rundir.read_jsonl(path / rundir.METRICS),
               (path / rundir.SUMMARY).exists())


def find_runs(paths: Iterable[Path | str]) -> list[Run]:
    """Runs under ``paths``: each is a run directory or a directory of run directories."""
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UsageError(f"{path} is not a directory; give run or sweep directories")
        if has_metrics(path):
            runs.append(load_run(path))
            continue
        found = [load_run(d) for d in sorted(path.iterdir()) if has_metrics(d)]
        if not found:
            raise UsageError(f"{path} holds no runs (no {rundir.METRICS} in it or its subdirectories)")
        runs.extend(found)
    return sorted(runs, key=sort_key)


def sort_key(run: Run) -> tuple:
    """AGD first, then by optimizer, shape, batch size, lr and seed: the order of the paper's
    axes, not of directory names (where "d16" sorts before "d2")."""
    seed = _SEED_SUFFIX.search(run.name)
    optimizer = str(run.param("optimizer", ""))
    return (optimizer != "agd", optimizer, run.param("depth") or 0, run.param("width") or 0,
            run.param("train_bs") or 0, run.param("lr") or 0.0, run.group,
            int(seed.group(1)) if seed else 0)


def group_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs by group, in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


@dataclass(frozen=True)
class Stat:
    """Mean and spread of one number over seeds; ``n`` counts the finite values."""

    mean: float
    std: float  # sample standard deviation (0 for one value)
    lo: float
    hi: float
    n: int

    def fmt(self, scale: float = 1.0, digits: int = 1) -> str:
        if self.n == 0:
            return "diverged"
        text = f"{self.mean * scale:.{digits}f}"
        if self.n > 1:
            text += f" ± {self.std * scale:.{digits}f}"
        return text

    def fmt_range(self, scale: float = 1.0, digits: int = 1) -> str:
        if self.n == 0:
            return "-"
        return f"{self.lo * scale:.{digits}f}–{self.hi * scale:.{digits}f}"


def stat(values: Iterable[float]) -> Stat:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return Stat(math.nan, math.nan, math.nan, math.nan, 0)
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return Stat(statistics.fmean(finite), std, min(finite), max(finite), len(finite))


def final_stat(runs: Sequence[Run], key: str) -> Stat:
    return stat(run.final(key) for run in runs)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; it also reads fine in a terminal."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
