"""Run directories -> numbers: loading, mean and spread over seeds, tables, docs/results.md.

A run directory is what ``agd train --out DIR`` writes (docs/architecture.md): config.json,
metrics.jsonl (one object per epoch) and summary.json once every epoch finished. A sweep
directory holds run directories named ``<group>-s<seed>``; runs that differ only in their seed
share a group, and a group's numbers are the mean and spread over its seeds.

``python -m torch_agd.experiments.results RUNS --out docs/results.md --figures docs/figures``
(what scripts/make_results.sh calls) renders the page from RUNS/{lr,shape,batch,peers}; every
number on it comes from those directories, and the paper's numbers are quoted beside ours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from torch_agd.errors import UsageError

_SEED_SUFFIX = re.compile(r"-s(\d+)$")

# config.json holds every flag under its argparse name; older or hand-made configs may use the
# dashed spelling, so both are accepted.
_ALIASES = {"train_bs": ("train_bs", "train-bs", "batch_size")}


@dataclass
class Run:
    """One run directory, read once."""

    path: Path
    config: dict
    metrics: list[dict]
    finished: bool  # summary.json exists: every epoch completed
    summary: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def group(self) -> str:
        """The run's name without its seed: runs that differ only in the seed share it."""
        return _SEED_SUFFIX.sub("", self.name)

    def param(self, key: str, default=None):
        for alias in _ALIASES.get(key, (key,)):
            if alias in self.config:
                return self.config[alias]
        return default

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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_run(path: Path) -> Run:
    """Read a run directory; a torn last line of metrics.jsonl (a killed run) is ignored."""
    path = Path(path)
    metrics = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        try:
            metrics.append(json.loads(line))
        except ValueError:
            continue
    summary_path = path / "summary.json"
    return Run(
        path=path,
        config=_read_json(path / "config.json"),
        metrics=metrics,
        finished=summary_path.exists(),
        summary=_read_json(summary_path),
    )


def find_runs(paths: Iterable[Path | str]) -> list[Run]:
    """Runs under ``paths``: each is a run directory or a directory of run directories."""
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UsageError(f"{path} is not a directory; give run or sweep directories")
        if (path / "metrics.jsonl").exists():
            runs.append(load_run(path))
            continue
        found = [load_run(d) for d in sorted(path.iterdir()) if (d / "metrics.jsonl").exists()]
        if not found:
            raise UsageError(f"{path} holds no runs (no metrics.jsonl in it or its subdirectories)")
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


def make_readable(path: str) -> None:
    """mkstemp creates files 0600; give the final file the mode a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        make_readable(tmp)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- docs/results.md -----------------------------------------------------------------------

GRID_ORDER = ("lr", "shape", "batch", "peers")

# The paper's numbers, as restated in ../shared/AGD-SPEC.md ("Published numbers"). All are on
# CIFAR-10; the small sweeps run on Fashion-MNIST, so they are quoted beside ours for the shape of
# the result (which lr wins, whether every shape trains, how accuracy moves with batch size),
# not as numbers to match.
PAPER_LR = "FCN depth 8 width 256 on CIFAR-10: AGD's objective on par with Adam's; best lr: Adam 1e-4, SGD 1e-1"
PAPER_SHAPE = ("FCN width 64..2048 x depth 2..32 on CIFAR-10: AGD trains at every shape; best 63.7% "
               "test accuracy at depth 4, width 2048")
PAPER_BATCH = {32: 55.0, 128: 58.0, 1024: 60.0, 4096: 59.8}  # 4-layer FCN, CIFAR-10, test acc %
PAPER_PEERS = ("FCN depth 16 width 512 on CIFAR-10, batch 128: AGD 52.7% test accuracy vs Adam "
               "tuned over lr 1e-5..1e-1 53.5% (the paper compares no learning-rate-free peers)")


def _pct(s: Stat) -> str:
    return s.fmt(100)


def _loss(s: Stat) -> str:
    return s.fmt(1, 4) if s.n == 0 or s.mean >= 1e-3 else f"{s.mean:.2e}"


def _chance(runs: Sequence[Run]) -> float:
    return 0.01 if any(run.param("dataset") == "cifar100" for run in runs) else 0.1


def _best(groups: dict[str, list[Run]], names: Iterable[str], key: str, lowest: bool) -> str | None:
    scored = [(final_stat(groups[n], key).mean, n) for n in names
              if final_stat(groups[n], key).n]
    if not scored:
        return None
    return (min if lowest else max)(scored)[1]


def _versus(agd: list[Run], other: list[Run], name: str) -> str:
    """'AGD loses to NAME by X points (beyond / within the seed spread)' or 'AGD beats ...'."""
    a, b = final_stat(agd, "test_acc"), final_stat(other, "test_acc")
    if not (a.n and b.n):
        return f"AGD vs {name}: not comparable (a run diverged)"
    gap = (b.mean - a.mean) * 100
    if abs(gap) < 0.05:
        return f"AGD ties with {name} (test accuracy {a.mean * 100:.1f}%)"
    beyond = a.hi < b.lo if gap > 0 else b.hi < a.lo
    where = "beyond the seed spread" if beyond else "within the seed spread"
    if gap > 0:
        return f"**AGD loses to {name}** by {gap:.1f} points of test accuracy ({where})"
    return f"AGD beats {name} by {-gap:.1f} points of test accuracy ({where})"


def render_lr(runs: Sequence[Run]) -> str:
    groups = group_runs(runs)
    rows = []
    for group, members in groups.items():
        first = members[0]
        lr = first.param("lr")
        rows.append([first.param("optimizer"), "-" if lr is None else f"{lr:g}", len(members),
                     _loss(final_stat(members, "train_loss")), _pct(final_stat(members, "test_acc")),
                     final_stat(members, "test_acc").fmt_range(100)])
    text = [markdown_table(["optimizer", "lr", "seeds", "final train loss", "test acc %",
                            "test acc % (min–max)"], rows), ""]
    text += [f"Paper: {PAPER_LR}.", "", "Ours:", ""]
    agd = groups.get("agd")
    for optimizer in ("adam", "sgd"):
        names = [g for g, m in groups.items() if m[0].param("optimizer") == optimizer]
        best_loss = _best(groups, names, "train_loss", lowest=True)
        best_acc = _best(groups, names, "test_acc", lowest=False)
        if best_loss is None:
            continue
        lr = groups[best_loss][0].param("lr")
        line = f"- {optimizer}: best lr by final train loss {lr:g}"
        if agd:
            a, b = final_stat(agd, "train_loss"), final_stat(groups[best_loss], "train_loss")
            verdict = "lower" if a.mean < b.mean else "**higher**"
            rival = f"{optimizer} at its best lr ({groups[best_acc][0].param('lr'):g})"
            line += (f"; AGD's train loss {_loss(a)} is {verdict} than {optimizer} at that lr "
                     f"({_loss(b)}); {_versus(agd, groups[best_acc], rival)}")
            beaten = sum(final_stat(agd, "test_acc").mean > final_stat(groups[n], "test_acc").mean
                         or not final_stat(groups[n], "test_acc").n for n in names)
            line += f"; AGD beats {optimizer} at {beaten} of {len(names)} learning rates"
        text.append(line + ".")
    return "\n".join(text)


def render_shape(runs: Sequence[Run]) -> str:
    groups = group_runs(runs)
    cells = {(m[0].param("depth"), m[0].param("width")): m for m in groups.values()}
    depths = sorted({d for d, _ in cells})
    widths = sorted({w for _, w in cells})
    rows = [[f"depth {d}"] + [_pct(final_stat(cells[(d, w)], "test_acc")) if (d, w) in cells
                              else "-" for w in widths] for d in depths]
    text = [markdown_table(["test acc %"] + [f"width {w}" for w in widths], rows), ""]
    text += [f"Paper: {PAPER_SHAPE}.", ""]
    chance = _chance(runs)
    best = max(cells, key=lambda k: final_stat(cells[k], "test_acc").mean
               if final_stat(cells[k], "test_acc").n else -1)
    failed = [f"depth {d} width {w}" for (d, w), m in sorted(cells.items())
              if not final_stat(m, "test_acc").n or final_stat(m, "test_acc").mean < 2 * chance]
    text.append(f"Ours: best {_pct(final_stat(cells[best], 'test_acc'))}% at depth {best[0]}, "
                f"width {best[1]}. " + (
                    f"**AGD did not train** (test accuracy under twice chance) at: {', '.join(failed)}."
                    if failed else f"AGD trains at all {len(cells)} shapes (every cell above twice chance)."))
    return "\n".join(text)


def render_batch(runs: Sequence[Run]) -> str:
    groups = group_runs(runs)
    rows = []
    accs = {}
    for members in groups.values():
        batch = members[0].param("train_bs")
        acc = final_stat(members, "test_acc")
        accs[batch] = acc
        paper = PAPER_BATCH.get(batch)
        rows.append([batch, len(members), _pct(acc), acc.fmt_range(100),
                     _loss(final_stat(members, "train_loss")),
                     "-" if paper is None else f"{paper:.1f}"])
    text = [markdown_table(["batch size", "seeds", "test acc %", "test acc % (min–max)",
                            "final train loss", "paper test acc % (CIFAR-10)"], rows), ""]
    finite = {b: s for b, s in accs.items() if s.n}
    if finite:
        best = max(finite, key=lambda b: finite[b].mean)
        largest = max(finite)
        drop = (finite[best].mean - finite[largest].mean) * 100
        text.append(f"Ours: best at batch {best} ({_pct(finite[best])}%); at batch {largest} test "
                    f"accuracy is {drop:.1f} points lower. Every run has the same number of epochs, "
                    f"so a larger batch takes fewer steps. The paper's accuracy rises from batch 32 "
                    f"to 1024 and holds at 4096" + (
                        "; **ours falls at large batch**, where the paper's does not." if drop > 1 else "."))
    return "\n".join(text)


def render_peers(runs: Sequence[Run]) -> str:
    groups = group_runs(runs)
    adam = [g for g, m in groups.items() if m[0].param("optimizer") == "adam"]
    tuned = _best(groups, adam, "test_acc", lowest=False)
    shown = {g: m for g, m in groups.items() if g not in adam or g == tuned}
    order = sorted(shown, key=lambda g: -final_stat(shown[g], "test_acc").mean
                   if final_stat(shown[g], "test_acc").n else math.inf)
    rows = []
    for rank, group in enumerate(order, 1):
        members = shown[group]
        label = group
        if group == tuned:
            lrs = ", ".join(f"{groups[g][0].param('lr'):g}" for g in adam)
            label = f"adam (tuned: best of lr {lrs}) lr {members[0].param('lr'):g}"
        seconds = stat(row.get("epoch_seconds", math.nan) for run in members for row in run.metrics)
        rows.append([rank, label, len(members), _pct(final_stat(members, "test_acc")),
                     final_stat(members, "test_acc").fmt_range(100),
                     _loss(final_stat(members, "train_loss")), seconds.fmt(1, 2)])
    text = [markdown_table(["rank", "optimizer", "seeds", "test acc %", "test acc % (min–max)",
                            "final train loss", "s / epoch"], rows), ""]
    text += [f"Paper: {PAPER_PEERS}.", ""]
    if "agd" in shown:
        text += [f"Ours: AGD ranks {order.index('agd') + 1} of {len(order)} by mean test accuracy.", ""]
        text += [f"- {_versus(shown['agd'], shown[g], g if g != tuned else 'tuned Adam')}."
                 for g in order if g != "agd"]
    return "\n".join(text)


RENDERERS = {"lr": render_lr, "shape": render_shape, "batch": render_batch, "peers": render_peers}
TITLES = {
    "lr": "Learning rate: Adam and SGD over lr beside AGD (paper fig. 2)",
    "shape": "Shape: FCN depth x width under AGD (paper fig. 3)",
    "batch": "Batch size under AGD (paper fig. 4)",
    "peers": "AGD vs learning-rate-free peers and tuned Adam",
}


def _setup(runs: Sequence[Run]) -> str:
    """What the runs were: one line per grid-wide setting, read from config.json."""
    def values(key):
        found = sorted({str(run.param(key)) for run in runs if run.param(key) is not None})
        return ", ".join(found) if found else "-"

    seeds = {run.param("seed") for run in runs}
    cpu = sum(float(row.get("epoch_seconds") or 0) for run in runs for row in run.metrics)
    commits = values("git_commit")
    return (f"{len(runs)} runs ({sum(r.finished for r in runs)} finished); seeds per configuration: "
            f"{len(seeds)}; dataset: {values('dataset')}; epochs: {values('epochs')}; training "
            f"subset: {values('train_subset')}; torch-agd {values('version')}"
            + (f", commit {commits}" if commits != "-" else "")
            + f"; {cpu / 60:.1f} minutes of training time in total.")


def render_page(root: Path, page: Path, figures: Path) -> str:
    """docs/results.md from ROOT/{lr,shape,batch,peers}; writes the figures under ``figures``."""
    from torch_agd.experiments.plot import make_figure, save_figure

    root, page, figures = Path(root), Path(page), Path(figures)
    parts = ["# Results", "",
             "Generated by `scripts/make_results.sh` from the run directories under "
             f"`{root}/`; do not edit by hand. Numbers are the final epoch's, as mean ± sample "
             "standard deviation over seeds, with the lowest–highest seed beside them.", ""]
    all_runs = []
    for grid in GRID_ORDER:
        parts += [f"## {TITLES[grid]}", ""]
        try:
            runs = find_runs([root / grid])
        except UsageError:
            parts += [f"Not run: no runs under `{root / grid}` (run `agd sweep {grid}`).", ""]
            continue
        all_runs += runs
        fig = make_figure(runs, TITLES[grid])
        png = save_figure(fig, figures / f"{grid}.png")
        link = os.path.relpath(png, page.parent)
        parts += [_setup(runs), "", RENDERERS[grid](runs), "", f"![{grid}]({link})", ""]
        unfinished = [run.name for run in runs if not run.finished]
        if unfinished:
            parts += [f"Unfinished runs (no summary.json): {', '.join(unfinished)}.", ""]
    if not all_runs:
        raise UsageError(f"no runs under {root}/{{{','.join(GRID_ORDER)}}}; run the sweeps first")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_agd.experiments.results",
                                     description="write docs/results.md from sweep directories")
    parser.add_argument("root", type=Path, help="directory holding the lr, shape, batch, peers sweeps")
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    args = parser.parse_args(argv)
    try:
        text = render_page(args.root, args.out, args.figures)
    except UsageError as exc:
        print(f"results: error: {exc}", file=sys.stderr)
        return 2
    write_text_atomic(args.out, text)
    print(f"wrote {args.out} and figures under {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
