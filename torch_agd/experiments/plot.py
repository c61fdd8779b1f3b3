"""``agd plot DIR... [--out FILE.png]``: the paper's figures from run directories.

One PNG with six panels: eta per epoch (mean line with the min-max band of the epoch's steps),
train and test loss (log scale) and accuracy per epoch, and a panel that summarises the sweep:
a heatmap of final test accuracy over depth x width (the shape sweep, fig. 3), final test accuracy
against batch size (the batch sweep, fig. 4, log2 axis), final train loss against learning rate
(the lr sweep, fig. 2, log-log, AGD as a horizontal line), or else final test accuracy per run.

Each DIR is a run directory or a sweep directory; all runs are overlaid. Runs that differ only in
their seed (``<group>-s<seed>``) are drawn as one line, the mean over seeds, with a band from the
lowest to the highest seed, so a sweep over 3 seeds stays readable.

matplotlib is used through its object API (``Figure``, Agg canvas): no pyplot, no global state,
no display needed.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Sequence

from torch_agd.atomic import atomic_file
from torch_agd.errors import UsageError
from torch_agd.experiments.runs import Run, final_stat, find_runs, group_runs, read_manifest, stat

CURVES = (  # (metrics key, axis label, log scale, shown in percent)
    ("train_loss", "train loss", True, False),
    ("test_loss", "test loss", True, False),
    ("train_acc", "train accuracy (%)", False, True),
    ("test_acc", "test accuracy (%)", False, True),
)


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError('agd plot needs matplotlib: pip install "torch-agd[plot]"') from None
    return Figure


def _distinct(runs: Sequence[Run], key: str) -> list:
    return sorted({run.param(key) for run in runs if run.param(key) is not None})


KINDS = ("shape", "batch", "lr", "final")
GRID_KINDS = {"shape": "shape", "batch": "batch", "lr": "lr", "peers": "final",  # sweep -> panel
              "batch-steps": "batch", "momentum": "final", "models": "final"}


def sweep_kind(runs: Sequence[Run]) -> str:
    """What the runs sweep over: 'shape', 'batch', 'lr' or 'final' (anything else).

    'lr' needs most groups to have an lr: the peers sweep tunes Adam over a few lrs, but it is a
    comparison of optimizers, drawn as final accuracies."""
    if len(_distinct(runs, "depth")) > 1 and len(_distinct(runs, "width")) > 1:
        return "shape"
    if len(_distinct(runs, "train_bs")) > 1:
        return "batch"
    groups = group_runs(runs).values()
    with_lr = sum(members[0].param("lr") is not None for members in groups)
    if len(_distinct(runs, "lr")) > 1 and with_lr > len(groups) - with_lr:
        return "lr"
    return "final"


def _seed_curves(members: Sequence[Run], key: str, scale: float):
    """Per epoch: (epochs, mean, lo, hi) of ``key`` over the seeds that reached that epoch."""
    by_epoch: dict[int, list[float]] = {}
    for run in members:
        for epoch, value in zip(*run.series(key)):
            by_epoch.setdefault(epoch, []).append(value * scale)
    epochs = sorted(by_epoch)
    stats = [stat(by_epoch[e]) for e in epochs]
    return epochs, [s.mean for s in stats], [s.lo for s in stats], [s.hi for s in stats]


MAX_BANDS = 6  # more overlapping seed bands than this hide the lines they belong to


def _marker(epochs: Sequence[int]) -> str:
    """Dots on short runs, so a run of one or two epochs is still visible."""
    return "." if len(epochs) <= 20 else ""


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_curves(ax, groups: dict[str, list[Run]], colors: dict, key: str, label: str,
                 log: bool, percent: bool) -> None:
    plotted = []
    for group, members in groups.items():
        epochs, mean, lo, hi = _seed_curves(members, key, 100.0 if percent else 1.0)
        plotted += [m for m in mean if math.isfinite(m)]
        if not any(math.isfinite(m) for m in mean):
            continue
        ax.plot(epochs, mean, color=colors[group], label=group, marker=_marker(epochs))
        if len(members) > 1 and len(groups) <= MAX_BANDS:
            ax.fill_between(epochs, lo, hi, color=colors[group], alpha=0.2, linewidth=0)
    _epoch_axis(ax)
    ax.set_ylabel(label)
    if log:
        ax.set_yscale("log")
        # One diverging run (Adam at lr 0.1 reaches 1e11) would flatten every other line: cap the
        # axis at 10x the median point and say so.
        if plotted and max(plotted) > 10 * statistics.median(plotted):
            ax.set_ylim(top=10 * statistics.median(plotted))
            ax.text(0.98, 0.98, "axis capped; larger values off the top", fontsize=7,
                    ha="right", va="top", transform=ax.transAxes)


def _draw_eta(ax, groups: dict[str, list[Run]], colors: dict) -> None:
    """eta_mean per epoch (mean over seeds) in a band from the lowest eta_min to the highest
    eta_max: the spread of eta over the epoch's steps and over seeds."""
    drawn = 0
    with_eta = sum(any(math.isfinite(run.final("eta_mean")) for run in members)
                   for members in groups.values())
    alpha = 0.2 if with_eta <= MAX_BANDS else 0.06  # many bands: faint, so lines stay visible
    for group, members in groups.items():
        epochs, mean, _, _ = _seed_curves(members, "eta_mean", 1.0)
        if not any(math.isfinite(m) for m in mean):
            continue  # not an AGD run
        _, _, lo, _ = _seed_curves(members, "eta_min", 1.0)
        _, _, _, hi = _seed_curves(members, "eta_max", 1.0)
        ax.plot(epochs, mean, color=colors[group], label=group, marker=_marker(epochs))
        if len(lo) == len(epochs) and len(hi) == len(epochs):
            ax.fill_between(epochs, lo, hi, color=colors[group], alpha=alpha, linewidth=0)
        drawn += 1
    _epoch_axis(ax)
    ax.set_ylabel("eta (before gain; band: min-max)")
    if not drawn:
        ax.text(0.5, 0.5, "no eta: no AGD runs", ha="center", va="center", transform=ax.transAxes)


def _draw_shape(fig, ax, runs: Sequence[Run]) -> None:
    depths, widths = _distinct(runs, "depth"), _distinct(runs, "width")
    cells = {}
    for members in group_runs(runs).values():
        cells[(members[0].param("depth"), members[0].param("width"))] = final_stat(members, "test_acc")
    grid = [[cells[(d, w)].mean * 100 if (d, w) in cells else math.nan for w in widths]
            for d in depths]
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if math.isfinite(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(widths)), [str(w) for w in widths])
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xlabel("width")
    ax.set_ylabel("depth")
    ax.set_title("final test accuracy (%)", fontsize=9)
    fig.colorbar(image, ax=ax)


def _draw_by_param(ax, runs: Sequence[Run], colors: dict, key: str, metric: str, percent: bool):
    """One line per optimizer: final ``metric`` against ``key`` (mean, min-max error bars);
    optimizers without that parameter (AGD in the lr sweep) become horizontal lines."""
    scale = 100.0 if percent else 1.0
    by_optimizer: dict[str, list[Run]] = {}
    for run in runs:
        by_optimizer.setdefault(str(run.param("optimizer", "?")), []).append(run)
    for optimizer, members in by_optimizer.items():
        color = colors[optimizer]
        xs = sorted({run.param(key) for run in members if run.param(key) is not None})
        if not xs:
            s = final_stat(members, metric)
            ax.axhline(s.mean * scale, color=color, linestyle="--", label=optimizer)
            ax.axhspan(s.lo * scale, s.hi * scale, color=color, alpha=0.15)
            continue
        stats = [final_stat([r for r in members if r.param(key) == x], metric) for x in xs]
        means = [s.mean * scale for s in stats]
        err = [[(s.mean - s.lo) * scale for s in stats], [(s.hi - s.mean) * scale for s in stats]]
        ax.errorbar(xs, means, yerr=err, color=color, marker="o", capsize=3, label=optimizer)
    ax.set_xscale("log", base=2 if key == "train_bs" else 10)
    ax.set_xlabel({"train_bs": "batch size", "lr": "learning rate"}.get(key, key))
    ax.set_ylabel(("final " + metric.replace("_", " ")) + (" (%)" if percent else ""))
    ax.legend(fontsize=7)


def _draw_final(ax, groups: dict[str, list[Run]], colors: dict, key: str = "test_acc",
                ylabel: str = "final test accuracy (%)", percent: bool = True) -> None:
    """A bar per group: the final ``key`` (mean over seeds, min-max error bars)."""
    scale = 100.0 if percent else 1.0
    names = list(groups)
    stats = [final_stat(groups[g], key) for g in names]
    means = [s.mean * scale if s.n else 0.0 for s in stats]
    err = [[(s.mean - s.lo) * scale if s.n else 0 for s in stats],
           [(s.hi - s.mean) * scale if s.n else 0 for s in stats]]
    ax.bar(range(len(names)), means, yerr=err, capsize=3, color=[colors[g] for g in names])
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    lows = [s.lo * scale for s in stats if s.n]
    if lows:  # zoom in on the differences, as long as every bar keeps some height
        ax.set_ylim(bottom=max(0.0, min(lows) - 5 if percent else 0.9 * min(lows)))


FAMILY_MAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")


def _colors(groups: dict[str, list[Run]], by_optimizer: bool) -> dict:
    """A colour per group, and per optimizer (for the lr panel). In the lr sweep the groups of
    one optimizer are shades of one colour, darker for larger lr, so the lines read as families."""
    from matplotlib import colormaps

    optimizers = list(dict.fromkeys(str(m[0].param("optimizer", "?")) for m in groups.values()))
    palette = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    colors = {group: palette(i % palette.N) for i, group in enumerate(groups)}
    for i, optimizer in enumerate(optimizers):
        family = [g for g, m in groups.items() if str(m[0].param("optimizer", "?")) == optimizer]
        colors.setdefault(optimizer, colors[family[0]])
        if by_optimizer and len(family) > 1:
            shades = colormaps[FAMILY_MAPS[i % len(FAMILY_MAPS)]]
            for j, group in enumerate(family):
                colors[group] = shades(0.4 + 0.55 * j / (len(family) - 1))
            colors[optimizer] = colors[family[-1]]
    return colors


def make_figure(runs: Sequence[Run], title: str | None = None, kind: str | None = None):
    """The six-panel figure for ``runs`` (a matplotlib Figure, not yet saved). ``kind`` picks
    the summary panel (one of KINDS); None guesses it from what varies between the runs."""
    if not runs:
        raise UsageError("nothing to plot: no runs found")
    Figure = _figure_class()

    groups = group_runs(runs)
    kind = kind or sweep_kind(runs)
    if kind not in KINDS:
        raise UsageError(f"unknown figure kind {kind!r}; choose one of {', '.join(KINDS)}")
    colors = _colors(groups, by_optimizer=kind == "lr")

    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3)
    _draw_eta(axes[0, 0], groups, colors)
    for ax, (key, label, log, percent) in zip(
            [axes[0, 1], axes[0, 2], axes[1, 0], axes[1, 1]], CURVES):
        _draw_curves(ax, groups, colors, key, label, log, percent)
    if kind == "shape":
        _draw_shape(fig, axes[1, 2], runs)
    elif kind == "batch":
        _draw_by_param(axes[1, 2], runs, colors, "train_bs", "test_acc", percent=True)
    elif kind == "lr":
        _draw_by_param(axes[1, 2], runs, colors, "lr", "train_loss", percent=False)
        axes[1, 2].set_yscale("log")
    else:
        _draw_final(axes[1, 2], groups, colors)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8,
               title="mean over seeds; band: min-max" if any(len(m) > 1 for m in groups.values())
               else None, title_fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig, path: Path, dpi: int = 72) -> Path:
    """Write ``fig`` as a PNG atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    with atomic_file(path) as f:
        fig.savefig(f, dpi=dpi, format="png")
    return path


def _recorded_kind(dirs: Sequence[Path]) -> str | None:
    """The panel for one sweep directory, from the grid its sweep.json records."""
    if len(dirs) != 1:
        return None
    return GRID_KINDS.get(read_manifest(dirs[0]).get("grid"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="run directories or sweep directories (their runs are overlaid)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default DIR/plot.png for one DIR, else agd-plot.png)")
    parser.add_argument("--title", default=None, help="figure title (default: the DIRs)")
    parser.add_argument("--dpi", type=int, default=72, help="resolution of the PNG (default 72)")


def run(args: argparse.Namespace) -> int:
    out = args.out or (args.dirs[0] / "plot.png" if len(args.dirs) == 1 else Path("agd-plot.png"))
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {out}")
    runs = find_runs(args.dirs)
    fig = make_figure(runs, args.title or ", ".join(str(d) for d in args.dirs),
                      _recorded_kind(args.dirs))
    save_figure(fig, out, dpi=args.dpi)
    print(f"wrote {out} ({len(runs)} runs)")
    return 0
