"""The results page's building blocks: findings (comparisons as data), sections, number formats.

Every renderer of docs/results.md (results.py and its per-topic modules) returns a ``Section``:
its Markdown lines and the ``Finding``s it states. A finding whose ``worse`` part is set says
where AGD does worse; the page shows that part in bold and lists the sentence again under "Where
AGD loses". ``compare`` is the one comparison of two groups of runs (mean, and whether the gap is
beyond the spread of the seeds), for accuracies (higher is better, gaps in points) and for losses
(lower is better, gaps in percent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from torch_agd.experiments.runs import Run, Stat, final_stat


@dataclass(frozen=True)
class Finding:
    """One sentence of a comparison, without its full stop: ``lead + worse + tail``. ``worse`` is
    the part that says AGD does worse (bold on the page, and the sentence is listed under "Where
    AGD loses"); empty when it does not. ``topic`` names the setting for that list, where the
    sentence stands without its table (empty: the section's name is enough)."""

    lead: str
    worse: str = ""
    tail: str = ""
    topic: str = ""

    @property
    def text(self) -> str:
        return self.lead + self.worse + self.tail

    @property
    def markdown(self) -> str:
        return self.lead + (f"**{self.worse}**" if self.worse else "") + self.tail


@dataclass
class Section:
    """A grid's part of the page: its Markdown lines and the findings they state, in order."""

    lines: list[str]
    findings: list[Finding] = field(default_factory=list)

    def state(self, finding: Finding) -> str:
        """``finding`` as Markdown, recorded as stated here: the one place a finding is rendered."""
        self.findings.append(finding)
        return finding.markdown

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def pct(s: Stat) -> str:
    return s.fmt(100)


def loss_text(s: Stat) -> str:
    return s.fmt(1, 4) if s.n == 0 or s.mean >= 1e-3 else f"{s.mean:.2e}"


def best_group(groups: dict[str, list[Run]], names: Iterable[str], key: str, lowest: bool) -> str | None:
    """The group among ``names`` with the highest (or ``lowest``) mean final ``key``."""
    scored = [(final_stat(groups[n], key).mean, n) for n in names
              if final_stat(groups[n], key).n]
    if not scored:
        return None
    return (min if lowest else max)(scored)[1]


@dataclass(frozen=True)
class Metric:
    """What a comparison compares: a final value of metrics.jsonl, and which way is better."""

    key: str
    name: str
    lower_is_better: bool = False

    def gap(self, a: Stat, b: Stat) -> float:
        """How much worse ``a`` is than ``b`` (negative: better): points of accuracy, or percent
        of ``b``'s loss."""
        if self.lower_is_better:
            return (a.mean / b.mean - 1) * 100
        return (b.mean - a.mean) * 100

    def unit(self) -> str:
        return f"% in {self.name}" if self.lower_is_better else f" points of {self.name}"

    def value(self, s: Stat) -> str:
        return f"{self.name} {s.mean:.4f}" if self.lower_is_better else f"{self.name} {s.mean * 100:.1f}%"


ACCURACY = Metric("test_acc", "test accuracy")
VALIDATION_LOSS = Metric("test_loss", "validation loss", lower_is_better=True)  # the LM's test_loss


def compare(a: Sequence[Run], b: Sequence[Run], a_name: str, b_name: str, *,
            metric: Metric = ACCURACY, worse: bool = True) -> Finding:
    """'A loses to B by X (beyond / within the seed spread)', 'A beats B ...' or 'A ties with B';
    the losing part is ``worse`` (listed under "Where AGD loses") when ``worse`` is set: A is AGD."""
    sa, sb = final_stat(a, metric.key), final_stat(b, metric.key)
    if not (sa.n and sb.n):
        return Finding(f"{a_name} vs {b_name}: not comparable (a run diverged)")
    gap = metric.gap(sa, sb)
    if abs(gap) < 0.05:
        return Finding(f"{a_name} ties with {b_name} ({metric.value(sa)})")
    a_low, a_high = (sa.lo, sa.hi) if not metric.lower_is_better else (-sa.hi, -sa.lo)
    b_low, b_high = (sb.lo, sb.hi) if not metric.lower_is_better else (-sb.hi, -sb.lo)
    beyond = a_high < b_low if gap > 0 else b_high < a_low
    where = "beyond the seed spread" if beyond else "within the seed spread"
    if min(sa.n, sb.n) < 2:  # one seed has no spread to be beyond: say how little was run
        where = "one seed: no spread measured"
    by = f" by {abs(gap):.1f}{metric.unit()} ({where})"
    if gap < 0:
        return Finding(f"{a_name} beats {b_name}{by}")
    if worse:
        return Finding("", f"{a_name} loses to {b_name}", by)
    return Finding(f"{a_name} loses to {b_name}{by}")


def versus(agd: Sequence[Run], other: Sequence[Run], name: str) -> Finding:
    """'AGD loses to NAME by X points (beyond / within the seed spread)' or 'AGD beats ...'."""
    return compare(agd, other, "AGD", name)


def accuracy_cells(members: Sequence[Run]) -> list[str]:
    """seeds, test acc mean ± sd, test acc min–max, final train loss: every table's columns."""
    acc = final_stat(members, "test_acc")
    return [str(len(members)), pct(acc), acc.fmt_range(100), loss_text(final_stat(members, "train_loss"))]


ACCURACY_HEADERS = ["seeds", "test acc %", "test acc % (min–max)", "final train loss"]
