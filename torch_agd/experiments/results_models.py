"""The models section of docs/results.md, from ROOT/models (``agd sweep models``).

Per model (config.json's arch): a table of every configuration tried at the model's step budget,
with the depth L that AGD used (``agd_L``, recorded by the trainer), and findings: the
target for AGD at its defaults against tuned AdamW (within 1 point of test accuracy on a vision
model, within 2% of the validation loss on the language model), AGD against the AGD+AdamW
fallback, Prodigy and Schedule-Free, and AGD's two counts of L against each other. On text the
metric is the validation loss in nats per byte (the trainer's test_loss; lower is better), and
tuned AdamW is the learning rate with the lowest one; on images, test accuracy and the highest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch_agd.data import TEXT
from torch_agd.experiments.findings import (
    ACCURACY, VALIDATION_LOSS, Finding, Metric, Section, best_group, compare, loss_text, pct,
)
from torch_agd.experiments.plot_panels import Panel, bars_figure
from torch_agd.experiments.runs import Run, Stat, final_stat, group_runs, markdown_table
from torch_agd.models import PAPER_ARCHS

# The targets: how far AGD at its defaults may be from tuned AdamW (points of accuracy;
# percent of the validation loss).
TARGETS = {ACCURACY: (1.0, "1 point of test accuracy"), VALIDATION_LOSS: (2.0, "2% of the validation loss")}
OTHERS = (("agd+adamw", "the AGD+AdamW fallback"), ("prodigy", "Prodigy"), ("schedulefree", "Schedule-Free AdamW"))


@dataclass
class Model:
    """One model's runs: its groups (label -> runs), its metric, AdamW's groups and tuned AdamW."""

    arch: str
    title: str
    metric: Metric
    groups: dict[str, list[Run]]
    adamw: list[str] = field(default_factory=list)
    tuned: str | None = None

    def by_optimizer(self, name: str) -> list[Run] | None:
        found = [m for m in self.groups.values() if m[0].param("optimizer") == name]
        return found[0] if found else None

    def agd_by_depth(self, depth: str) -> list[Run] | None:
        found = [m for m in self.groups.values() if m[0].param("optimizer") == "agd"
                 and m[0].param("agd_depth") == depth and not m[0].param("momentum")]
        return found[0] if found else None


def _label(group: str, arch: str) -> str:
    return group.removeprefix(f"{arch.replace(':', '-')}-")  # timm:resnet18's groups are timm-resnet18-...


def models(runs: Sequence[Run]) -> list[Model]:
    """The runs by model: vision models first, then language models, then the paper's networks."""
    by_arch: dict[str, list[Run]] = {}
    for run in runs:
        by_arch.setdefault(str(run.param("arch")), []).append(run)
    text = {arch: any(r.param("dataset") in TEXT for r in members) for arch, members in by_arch.items()}
    found = []
    for arch in sorted(by_arch, key=lambda a: (a in PAPER_ARCHS, text[a], a)):
        first = by_arch[arch][0]
        metric = VALIDATION_LOSS if text[arch] else ACCURACY
        budget = f"{first.param('steps')} steps" if first.param("steps") else f"{first.param('epochs')} epochs"
        what = ("validation loss in nats per byte, lower is better" if text[arch]
                else "the paper's CIFAR ResNet-18, its square loss" if arch in PAPER_ARCHS else "cross-entropy")
        model = Model(arch, f"{arch} on {first.param('dataset')}, {budget} at batch {first.param('train_bs')} ({what})",
                      metric, {_label(g, arch): m for g, m in group_runs(by_arch[arch]).items()})
        model.adamw = [g for g, m in model.groups.items() if m[0].param("optimizer") == "adamw"]
        model.tuned = best_group(model.groups, model.adamw, metric.key, lowest=metric.lower_is_better)
        found.append(model)
    return found


def _depth(members: Sequence[Run]) -> str:
    """The L that AGD used in these runs (config.json's agd_L), or '-'."""
    found = sorted({str(r.param("agd_L")) for r in members if r.param("agd_L") is not None})
    return ", ".join(found) if found else "-"


def _depth_is(members: Sequence[Run]) -> str:
    depth = _depth(members)
    return "L unrecorded" if depth == "-" else f"L = {depth}"


def _cells(members: Sequence[Run], metric: Metric) -> list[str]:
    s: Stat = final_stat(members, metric.key)
    if metric.lower_is_better:
        value, spread = s.fmt(1, 4), s.fmt_range(1, 4)
    else:
        value, spread = pct(s), s.fmt_range(100)
    return [str(len(members)), value, spread, loss_text(final_stat(members, "train_loss"))]


def _table(model: Model) -> str:
    metric = "validation loss" if model.metric.lower_is_better else "test acc %"
    rows = []
    for label, members in model.groups.items():
        if label == model.tuned:
            lrs = ", ".join(f"{model.groups[g][0].param('lr'):g}" for g in model.adamw)
            label += f" (tuned AdamW: best of lr {lrs})"
        rows.append([label, _depth(members), *_cells(members, model.metric)])
    return markdown_table(["configuration", "L", "seeds", metric, f"{metric} (min–max)", "final train loss"], rows)


def _target(model: Model, agd: list[Run]) -> Finding:
    """AGD at its defaults against tuned AdamW, and whether that meets the target."""
    tuned = model.groups[model.tuned]
    finding = compare(agd, tuned, "AGD", f"tuned AdamW (lr {tuned[0].param('lr'):g})", metric=model.metric)
    limit, words = TARGETS[model.metric]
    a, b = final_stat(agd, model.metric.key), final_stat(tuned, model.metric.key)
    if not (a.n and b.n):
        verdict = f"; the target (within {words}) cannot be checked"
    else:
        met = round(model.metric.gap(a, b), 1) <= limit  # at the precision the sentence shows
        verdict = f"; the target (within {words}) is {'met' if met else 'missed'}"
    return Finding(finding.lead, finding.worse, finding.tail + verdict)


def _findings(model: Model) -> list[Finding]:
    found = []
    agd = model.groups.get("agd")
    if agd is not None and model.tuned is not None:
        found.append(_target(model, agd))
    if agd is not None:
        for optimizer, name in OTHERS:
            other = model.by_optimizer(optimizer)
            if other is not None:
                found.append(compare(agd, other, "AGD", name, metric=model.metric))
    momentum = model.groups.get("agd-m0.9")
    if momentum is not None and agd is not None:
        found.append(compare(momentum, agd, "AGD with momentum 0.9 (Nesterov)", "AGD without (the default)",
                             metric=model.metric, worse=False))
        if model.tuned is not None:
            tuned = model.groups[model.tuned]
            found.append(compare(momentum, tuned, "AGD with momentum 0.9",
                                 f"tuned AdamW (lr {tuned[0].param('lr'):g})", metric=model.metric))
    auto, weights = model.agd_by_depth("auto"), model.agd_by_depth("weights")
    if auto is not None and weights is not None:
        found.append(compare(auto, weights, f"AGD with {_depth_is(auto)} (auto: layers in series)",
                             f"{_depth_is(weights)} (weights: one per weight tensor, the paper's count)",
                             metric=model.metric, worse=False))
    return [Finding(f.lead, f.worse, f.tail, topic=model.arch) for f in found]


INTRO = ("The targets: AGD at its defaults (gain 1, the default count of L) within 1 point of tuned "
         "AdamW's test accuracy on both vision models, and within 2% of its validation loss on the language "
         "model. AdamW has weight decay 0.01; tuned AdamW is its best learning rate (highest mean test accuracy, "
         "or lowest mean validation loss). Every configuration of a model has the same step budget. L is the "
         "depth AGD used, as the trainer recorded it in config.json (`agd_L`): `agd` counts layers in series "
         "on these models (auto), `agd-L-weights` one per weight tensor (the paper's count), and the fallback "
         "`agd+adamw` one per weight matrix it steps; `agd-m0.9` is AGD with momentum 0.9 (Nesterov), "
         "tried where the default falls short. The paper measured none of these models; its own ResNet-18 "
         "is the last table.")


LIBRARIES_INTRO = ("Models of the libraries people train with, built by name with random weights (`--arch "
                   "timm:NAME`, `--arch hf:NAME`) and trained by `AGD(model)` with no override: AGD at its "
                   "defaults (`agd`: momentum 0, L counted along the residual path) and with momentum 0.9 "
                   "(`agd-m0.9`), against AdamW (weight decay 0.01) over four learning rates around its best; "
                   "tuned AdamW is the best of them. The targets are the models grid's: within 1 point of "
                   "tuned AdamW's test accuracy on images, within 2% of its validation loss on text.")


def render_models(runs: Sequence[Run], intro: str = INTRO) -> Section:
    section = Section([intro, ""])
    for model in models(runs):
        section.lines += [f"### {model.title}", "", _table(model), ""]
        section.lines += [f"- {section.state(finding)}." for finding in _findings(model)]
        section.lines.append("")
    section.lines.pop()  # the blank line after the last model: the page adds its own
    return section


def render_libraries(runs: Sequence[Run]) -> Section:
    return render_models(runs, LIBRARIES_INTRO)


def figure(runs: Sequence[Run], title: str):
    """The final metric of every configuration, one panel per model."""
    panels = [Panel(m.arch, m.groups, m.metric.key,
                    "validation loss (nats per byte)" if m.metric.lower_is_better else "test accuracy (%)",
                    percent=not m.metric.lower_is_better) for m in models(runs)]
    return bars_figure(panels, title)
