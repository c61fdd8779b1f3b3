"""Figures of one panel per setting, for the results page's grids that mix settings.

plot.py's six panels overlay every run of a sweep, which suits a sweep over one axis. The momentum
grid holds three settings (a network at a budget) and the models grid four models, each with its
own configurations: these figures give each setting a panel of its own, with one colour per
configuration label throughout.

- ``curves_figure``: a metric by epoch (mean over seeds, min–max band);
- ``bars_figure``: the final metric per configuration (mean, min–max error bars).

Each panel is drawn by plot.py's own panel code (``_draw_curves``, ``_draw_final``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch_agd.errors import UsageError
from torch_agd.experiments.plot import _draw_curves, _draw_final, _figure_class
from torch_agd.experiments.runs import Run


@dataclass
class Panel:
    """One setting: its configurations (label -> runs) and the metric shown."""

    title: str
    groups: dict[str, list[Run]]
    key: str = "test_acc"
    ylabel: str = "test accuracy (%)"
    percent: bool = True


def _figure(panels: Sequence[Panel], title: str, height: float):
    if not panels:
        raise UsageError("nothing to plot: no runs found")
    from matplotlib import colormaps

    labels = list(dict.fromkeys(label for panel in panels for label in panel.groups))
    palette = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colors = {label: palette(i % palette.N) for i, label in enumerate(labels)}
    fig = _figure_class()(figsize=(5 * len(panels), height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    fig.suptitle(title)
    return fig, axes, colors


def curves_figure(panels: Sequence[Panel], title: str):
    """Each panel: its metric by epoch, one line per configuration, with the seeds' min–max band."""
    fig, axes, colors = _figure(panels, title, 4.5)
    for ax, panel in zip(axes, panels):
        _draw_curves(ax, panel.groups, colors, panel.key, panel.ylabel, False, panel.percent)
        ax.set_title(panel.title, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def bars_figure(panels: Sequence[Panel], title: str):
    """Each panel: the final metric per configuration, with the seeds' min–max as error bars."""
    fig, axes, colors = _figure(panels, title, 5.5)
    for ax, panel in zip(axes, panels):
        _draw_final(ax, panel.groups, colors, panel.key, panel.ylabel, panel.percent)
        ax.set_title(panel.title, fontsize=9)
    return fig
