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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from torch_agd.atomic import atomic_write_text
from torch_agd.errors import UsageError

_SEED_SUFFIX = re.compile(r"-s(\d+)$")


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
    return Run(path, _read_json(path / "config.json"), metrics, (path / "summary.json").exists())


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


def _accuracy_cells(members: Sequence[Run]) -> list[str]:
    """seeds, test acc mean ± sd, test acc min–max, final train loss: every table's columns."""
    acc = final_stat(members, "test_acc")
    return [str(len(members)), _pct(acc), acc.fmt_range(100), _loss(final_stat(members, "train_loss"))]


ACCURACY_HEADERS = ["seeds", "test acc %", "test acc % (min–max)", "final train loss"]


def render_lr(runs: Sequence[Run]) -> str:
    groups = group_runs(runs)
    rows = [[m[0].param("optimizer"), "-" if m[0].param("lr") is None else f"{m[0].param('lr'):g}",
             *_accuracy_cells(m)] for m in groups.values()]
    text = [markdown_table(["optimizer", "lr", *ACCURACY_HEADERS], rows), "",
            f"Paper: {PAPER_LR}.", "", "Ours:", ""]
    agd = groups.get("agd")
    for optimizer in ("adam", "sgd"):
        names = [g for g, m in groups.items() if m[0].param("optimizer") == optimizer]
        by_acc, by_loss = _best(groups, names, "test_acc", False), _best(groups, names, "train_loss", True)
        if by_acc is None or by_loss is None:
            continue
        lr_acc, lr_loss = groups[by_acc][0].param("lr"), groups[by_loss][0].param("lr")
        line = f"- {optimizer}: best lr {lr_acc:g} by test accuracy, {lr_loss:g} by train loss"
        if agd:
            a, b = final_stat(agd, "train_loss"), final_stat(groups[by_loss], "train_loss")
            beaten = sum(not final_stat(groups[n], "test_acc").n or final_stat(agd, "test_acc").mean
                         > final_stat(groups[n], "test_acc").mean for n in names)
            line += (f". {_versus(agd, groups[by_acc], f'{optimizer} at lr {lr_acc:g}')}. AGD's final "
                     f"train loss {_loss(a)} is {'lower' if a.mean < b.mean else '**higher**'} than "
                     f"{optimizer}'s lowest ({_loss(b)}). AGD beats {optimizer} at {beaten} of "
                     f"{len(names)} learning rates")
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
    rows = [[m[0].param("train_bs"), *_accuracy_cells(m),
             f"{PAPER_BATCH[m[0].param('train_bs')]:.1f}" if m[0].param("train_bs") in PAPER_BATCH else "-"]
            for m in groups.values()]
    text = [markdown_table(["batch size", *ACCURACY_HEADERS, "paper test acc % (CIFAR-10)"], rows), ""]
    accs = {m[0].param("train_bs"): final_stat(m, "test_acc") for m in groups.values()}
    finite = {b: s for b, s in accs.items() if s.n}
    if finite:
        best, largest = max(finite, key=lambda b: finite[b].mean), max(finite)
        drop = (finite[best].mean - finite[largest].mean) * 100
        fall = f"at batch {largest} AGD's test accuracy is {drop:.1f} points below its best"
        text.append(f"Ours: best at batch {best} ({_pct(finite[best])}%). Every run has the same "
                    f"number of epochs, so a larger batch takes fewer steps. "
                    + (f"**Unlike the paper's, {fall}** (the paper's rises from batch 32 to 1024 "
                       f"and holds at 4096)." if drop > 1 else
                       f"As in the paper, {fall} (the paper's holds from 1024 to 4096)."))
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
        rows.append([rank, label, *_accuracy_cells(members), seconds.fmt(1, 2)])
    text = [markdown_table(["rank", "optimizer", *ACCURACY_HEADERS, "s / epoch"], rows), ""]
    text += [f"Paper: {PAPER_PEERS}.", ""]
    if "agd" in shown:
        text += [f"Ours: AGD ranks {order.index('agd') + 1} of {len(order)} by mean test accuracy.", ""]
        text += [f"- {_versus(shown['agd'], shown[g], g if g != tuned else 'tuned Adam')}."
                 for g in order if g != "agd"]
    return "\n".join(text)


SHORT = {"lr": "Learning rate", "shape": "Shape", "batch": "Batch size", "peers": "Peers"}
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
    subset = values("train_subset")
    return (f"{len(runs)} runs ({sum(r.finished for r in runs)} finished); seeds per configuration: "
            f"{len(seeds)}; dataset: {values('dataset')}"
            + (f" (training subset: {subset})" if subset != "-" else "")
            + f"; epochs: {values('epochs')}; torch-agd {values('version')}"
            + (f", git HEAD when run {commits}" if commits != "-" else "")
            + f"; {cpu / 60:.1f} minutes of epoch time (training and evaluation) in all.")


def render_page(root: Path, page: Path, figures: Path) -> str:
    """docs/results.md from ROOT/{lr,shape,batch,peers}; writes the figures under ``figures``."""
    from torch_agd.experiments.plot import GRID_KINDS, make_figure, save_figure

    root, page, figures = Path(root), Path(page), Path(figures)
    header = 4  # the title and the paragraph under it; the summary of losses follows them
    parts = ["# Results", "",
             "Generated by `scripts/make_results.sh` from the run directories under "
             f"`{root}/`; do not edit by hand. Numbers are the final epoch's, as mean ± sample "
             "standard deviation over seeds, with the lowest–highest seed beside them.", ""]
    all_runs, losses = [], []
    for grid in GRID_ORDER:
        parts += [f"## {TITLES[grid]}", ""]
        try:
            runs = find_runs([root / grid])
        except UsageError:
            parts += [f"Not run: no runs under `{root / grid}` (run `agd sweep {grid}`).", ""]
            continue
        all_runs += runs
        fig = make_figure(runs, TITLES[grid], GRID_KINDS[grid])
        png = save_figure(fig, figures / f"{grid}.png")
        link = os.path.relpath(png, page.parent)
        text = RENDERERS[grid](runs)
        losses += [f"{SHORT[grid]}: {sentence}" for sentence in _bold_sentences(text)]
        parts += [_setup(runs), "", text, "", f"![{grid}]({link})", ""]
        unfinished = [run.name for run in runs if not run.finished]
        if unfinished:
            parts += [f"Unfinished runs (no summary.json): {', '.join(unfinished)}.", ""]
    if not all_runs:
        raise UsageError(f"no runs under {root}/{{{','.join(GRID_ORDER)}}}; run the sweeps first")
    summary = ["## Where AGD loses", ""] + ([f"- {line}" for line in losses] or ["Nowhere in these runs."])
    return "\n".join(parts[:header] + summary + [""] + parts[header:])


def _bold_sentences(text: str) -> list[str]:
    """The sentences a renderer marked in bold: each says where AGD does worse."""
    sentences = []
    for line in text.splitlines():
        for sentence in re.split(r"(?<=\.)\s+", line.removeprefix("- ")):
            if "**" in sentence:
                sentences.append(sentence.replace("**", "").rstrip("."))
    return sentences


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
    atomic_write_text(args.out, text)
    print(f"wrote {args.out} and figures under {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
