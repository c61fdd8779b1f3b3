"""The momentum section of docs/results.md, from ROOT/momentum (``agd sweep momentum``).

A setting is a network and a number of epochs (config.json's arch and epochs). In each, AGD runs
with momentum 0 (the paper's rule), 0.9 in Nesterov's form (the trainer's default form) and 0.9 as
heavy ball, beside Adam over a few learning rates, the best of which by mean final test accuracy
is "tuned Adam". Per setting: a table, and three findings: momentum 0.9 against 0, AGD's best
against tuned Adam (a loss is listed under "Where AGD loses") and Nesterov against heavy ball. A
closing finding says whether momentum 0.9 beat momentum 0 in every setting measured, the
condition set for changing the trainer's default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch_agd.experiments.findings import ACCURACY_HEADERS, Finding, Section, accuracy_cells, best_group, compare
from torch_agd.experiments.plot_panels import Panel, curves_figure
from torch_agd.experiments.runs import Run, final_stat, group_runs, markdown_table
from torch_agd.train.config import FLAGS, SAVED_BEFORE

DEFAULT_MOMENTUM = FLAGS["momentum"][1]  # the trainer's --momentum when none is given


def _agd_role(run: Run) -> str | None:
    """'m0', 'nesterov' or 'heavy-ball' for an AGD run; None for any other optimizer."""
    if run.param("optimizer") != "agd":
        return None
    if not run.param("momentum", DEFAULT_MOMENTUM):
        return "m0"
    # config.json as written before --momentum-form existed: the form those runs used
    return str(run.param("momentum_form", SAVED_BEFORE["momentum_form"]))


def _label(run: Run) -> str:
    role = _agd_role(run)
    if role is None:
        return f"{run.param('optimizer')}, lr {run.param('lr'):g}"
    if role == "m0":
        return "AGD, momentum 0 (the paper's rule)"
    return f"AGD, momentum {run.param('momentum'):g}, {'Nesterov' if role == 'nesterov' else 'heavy ball'}"


@dataclass
class Setting:
    """One network at one budget: its groups of runs, AGD's by role, Adam's, and tuned Adam."""

    name: str
    groups: dict[str, list[Run]]
    agd: dict[str, str] = field(default_factory=dict)  # role -> group
    adam: list[str] = field(default_factory=list)
    tuned: str | None = None


def settings(runs: Sequence[Run]) -> list[Setting]:
    """The runs by (network, epochs): the FCN before other networks, fewer epochs first."""
    by_key: dict[tuple, list[Run]] = {}
    for run in runs:
        by_key.setdefault((run.param("arch"), run.param("epochs")), []).append(run)
    found = []
    for arch, epochs in sorted(by_key, key=lambda k: (k[0] != "fcn", str(k[0]), k[1] or 0)):
        first = by_key[(arch, epochs)][0]
        net = (f"FCN depth {first.param('depth')} width {first.param('width')}" if arch == "fcn"
               else "small CNN (--arch cnn)" if arch == "cnn" else str(arch))
        setting = Setting(f"{net}, {epochs} epochs", group_runs(by_key[(arch, epochs)]))
        for group, members in setting.groups.items():
            role = _agd_role(members[0])
            if role is not None:
                setting.agd.setdefault(role, group)
            elif members[0].param("optimizer") == "adam":
                setting.adam.append(group)
        setting.tuned = best_group(setting.groups, setting.adam, "test_acc", lowest=False)
        found.append(setting)
    return found


def _table(setting: Setting) -> str:
    rows = []
    for group, members in setting.groups.items():
        label = _label(members[0])
        if group == setting.tuned:
            lrs = ", ".join(f"{setting.groups[g][0].param('lr'):g}" for g in setting.adam)
            label += f" (tuned Adam: best of lr {lrs})"
        rows.append([label, *accuracy_cells(members)])
    return markdown_table(["configuration", *ACCURACY_HEADERS], rows)


def _findings(setting: Setting) -> list[Finding]:
    groups, agd, found = setting.groups, setting.agd, []
    if "m0" in agd and "nesterov" in agd:
        found.append(compare(groups[agd["nesterov"]], groups[agd["m0"]], "AGD with momentum 0.9 (Nesterov)",
                             "momentum 0", worse=False))
    best = best_group(groups, agd.values(), "test_acc", lowest=False)
    if best is not None and setting.tuned is not None:
        label = _label(groups[best][0]).removeprefix("AGD, ")
        found.append(compare(groups[best], groups[setting.tuned], f"AGD's best ({label})",
                             f"tuned Adam (lr {groups[setting.tuned][0].param('lr'):g})"))
    if "nesterov" in agd and "heavy-ball" in agd:
        found.append(compare(groups[agd["nesterov"]], groups[agd["heavy-ball"]], "AGD with Nesterov momentum",
                             "heavy-ball momentum", worse=False))
    return [Finding(f.lead, f.worse, f.tail, topic=setting.name) for f in found]


def _verdict(measured: list[Setting]) -> Finding | None:
    """Did momentum 0.9 (Nesterov) beat momentum 0, by mean final test accuracy, in every setting?"""
    pairs = [(s, final_stat(s.groups[s.agd["nesterov"]], "test_acc"), final_stat(s.groups[s.agd["m0"]], "test_acc"))
             for s in measured if "nesterov" in s.agd and "m0" in s.agd]
    pairs = [(s, m, z) for s, m, z in pairs if m.n and z.n]
    if not pairs:
        return None
    won = [s for s, m, z in pairs if m.mean > z.mean]
    clear = sum(m.lo > z.hi for s, m, z in pairs if s in won)
    lead = f"Momentum 0.9 (Nesterov) beat momentum 0 in {len(won)} of {len(pairs)} settings"
    if len(won) == len(pairs):
        if DEFAULT_MOMENTUM:
            return Finding(f"{lead} ({clear} beyond the seed spread): momentum won everywhere measured, "
                           f"and the trainer's default is --momentum {DEFAULT_MOMENTUM:g}")
        # Said plainly: the default did not follow the measurement, and why.
        return Finding(f"{lead} ({clear} beyond the seed spread): momentum won everywhere measured, yet the "
                       f"default stays --momentum 0, the paper's exact rule with no optimizer state (momentum "
                       f"holds a buffer the size of the weights); turn it on with --momentum 0.9")
    lost = ", ".join(s.name for s, _, _ in pairs if s not in won)
    default = (f"so the default stays {DEFAULT_MOMENTUM:g}" if DEFAULT_MOMENTUM == 0
               else f"against the trainer's default of {DEFAULT_MOMENTUM:g}")
    return Finding(f"{lead} (not in: {lost}), {default}")


def render_momentum(runs: Sequence[Run]) -> Section:
    measured = settings(runs)
    section = Section(["Per setting: AGD with momentum 0 (the paper's rule), 0.9 in Nesterov's form (the "
                       "form `--momentum` takes by default) and 0.9 as heavy ball, beside Adam over a few "
                       "learning rates; tuned Adam is the best of them by mean final test accuracy. The paper "
                       "has no momentum.", ""])
    for setting in measured:
        section.lines += [f"### {setting.name}", "", _table(setting), ""]
        section.lines += [f"- {section.state(finding)}." for finding in _findings(setting)]
        section.lines.append("")
    verdict = _verdict(measured)
    if verdict is not None:
        section.lines.append(f"Verdict: {section.state(verdict)}.")
    else:
        section.lines.pop()  # the blank line after the last setting: the page adds its own
    return section


def figure(runs: Sequence[Run], title: str):
    """Test accuracy by epoch, one panel per setting: AGD's configurations and tuned Adam."""
    panels = []
    for setting in settings(runs):
        shown = [*setting.agd.values(), *([setting.tuned] if setting.tuned else [])]
        panels.append(Panel(setting.name, {_label(setting.groups[g][0]): setting.groups[g] for g in shown}))
    return curves_figure(panels, title)
