"""docs/results.md from sweep directories: tables, the paper's numbers beside ours, findings.

``python -m torch_agd.experiments.results RUNS --out docs/results.md --figures docs/figures``
(what scripts/make_results.sh calls) renders the page from RUNS/<grid> for every grid of
GRID_ORDER; every number on it comes from those directories (read by runs.py), and the paper's
numbers are quoted beside ours. Each grid's renderer returns its text together with its findings
(findings.py), the comparisons it made as data; those where AGD does worse are bold in the text
and listed again at the top. The grids of the paper's figures are rendered here; momentum and
models have modules of their own (results_momentum.py, results_models.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from torch_agd.atomic import atomic_write_text
from torch_agd.errors import UsageError
from torch_agd.experiments import results_compare, results_merge, results_models, results_momentum
from torch_agd.experiments.findings import (
    ACCURACY_HEADERS, Finding, Section, accuracy_cells, best_group, loss_text, pct, versus,
)
from torch_agd.experiments.plot import GRID_KINDS, make_figure, save_figure
from torch_agd.experiments.runs import (SWEEP_MANIFEST, Run, final_stat, find_runs, group_runs, markdown_table,
                                        read_manifest, stat)
from torch_agd.train import rundir

GRID_ORDER = ("lr", "shape", "batch", "batch-steps", "peers", "momentum", "models", "libraries", "compare")
SUBSECTIONS = ("batch-steps",)  # rendered as a part (###) of the section before them

# The paper's numbers (Bernstein et al. 2023, arXiv:2304.05187: figs. 2-4 and its CIFAR-10
# table). All are on CIFAR-10; the small sweeps run on Fashion-MNIST, so they are quoted beside
# ours for the shape of the result (which lr wins, whether every shape trains, how accuracy moves
# with batch size), not as numbers to match.
PAPER_LR = "FCN depth 8 width 256 on CIFAR-10: AGD's objective on par with Adam's; best lr: Adam 1e-4, SGD 1e-1"
PAPER_SHAPE = ("FCN width 64..2048 x depth 2..32 on CIFAR-10: AGD trains at every shape; best 63.7% "
               "test accuracy at depth 4, width 2048")
PAPER_BATCH = {32: 55.0, 128: 58.0, 1024: 60.0, 4096: 59.8}  # 4-layer FCN, CIFAR-10, test acc %
PAPER_PEERS = ("FCN depth 16 width 512 on CIFAR-10, batch 128: AGD 52.7% test accuracy vs Adam "
               "tuned over lr 1e-5..1e-1 53.5% (the paper compares no learning-rate-free peers)")
# Which budget fig. 4 gave each batch size: not stated in the paper's text or caption, and the
# published code has an epoch budget only. That it is equal steps is this project's reading.
PAPER_BATCH_BUDGET = ("Which comparison did the paper make? Its fig. 4 caption gives the batch sizes and "
                      "final accuracies but not whether every batch size trained for the same number of "
                      "epochs or of steps, and the published code has only an epoch budget (`--epochs`). "
                      "That the paper's comparison is at equal steps is a claim made here, not something "
                      "the paper states")


def _chance(runs: Sequence[Run]) -> float:
    return 0.01 if any(run.param("dataset") == "cifar100" for run in runs) else 0.1


def render_lr(runs: Sequence[Run]) -> Section:
    groups = group_runs(runs)
    rows = [[m[0].param("optimizer"), "-" if m[0].param("lr") is None else f"{m[0].param('lr'):g}",
             *accuracy_cells(m)] for m in groups.values()]
    section = Section([markdown_table(["optimizer", "lr", *ACCURACY_HEADERS], rows), "",
                       f"Paper: {PAPER_LR}.", "", "Ours:", ""])
    agd = groups.get("agd")
    for optimizer in ("adam", "sgd"):
        names = [g for g, m in groups.items() if m[0].param("optimizer") == optimizer]
        by_acc, by_loss = best_group(groups, names, "test_acc", False), best_group(groups, names, "train_loss", True)
        if by_acc is None or by_loss is None:
            continue
        lr_acc, lr_loss = groups[by_acc][0].param("lr"), groups[by_loss][0].param("lr")
        line = f"- {optimizer}: best lr {lr_acc:g} by test accuracy, {lr_loss:g} by train loss"
        if agd:
            a, b = final_stat(agd, "train_loss"), final_stat(groups[by_loss], "train_loss")
            beaten = sum(not final_stat(groups[n], "test_acc").n or final_stat(agd, "test_acc").mean
                         > final_stat(groups[n], "test_acc").mean for n in names)
            lead, tail = f"AGD's final train loss {loss_text(a)} is ", f" than {optimizer}'s lowest ({loss_text(b)})"
            loss = Finding(lead + "lower" + tail) if a.mean < b.mean else Finding(lead, "higher", tail)
            line += (f". {section.state(versus(agd, groups[by_acc], f'{optimizer} at lr {lr_acc:g}'))}. "
                     f"{section.state(loss)}. AGD beats {optimizer} at {beaten} of {len(names)} "
                     "learning rates")
        section.lines.append(line + ".")
    return section


def render_shape(runs: Sequence[Run]) -> Section:
    groups = group_runs(runs)
    cells = {(m[0].param("depth"), m[0].param("width")): m for m in groups.values()}
    depths = sorted({d for d, _ in cells})
    widths = sorted({w for _, w in cells})
    rows = [[f"depth {d}"] + [pct(final_stat(cells[(d, w)], "test_acc")) if (d, w) in cells
                              else "-" for w in widths] for d in depths]
    section = Section([markdown_table(["test acc %"] + [f"width {w}" for w in widths], rows), "",
                       f"Paper: {PAPER_SHAPE}.", ""])
    chance = _chance(runs)
    best = max(cells, key=lambda k: final_stat(cells[k], "test_acc").mean
               if final_stat(cells[k], "test_acc").n else -1)
    failed = [f"depth {d} width {w}" for (d, w), m in sorted(cells.items())
              if not final_stat(m, "test_acc").n or final_stat(m, "test_acc").mean < 2 * chance]
    if failed:
        worse = Finding("", "AGD did not train", f" (test accuracy under twice chance) at: {', '.join(failed)}")
        verdict = section.state(worse) + "."
    else:
        verdict = f"AGD trains at all {len(cells)} shapes (every cell above twice chance)."
    section.lines.append(f"Ours: best {pct(final_stat(cells[best], 'test_acc'))}% at depth {best[0]}, "
                         f"width {best[1]}. {verdict}")
    return section


def _render_batch(runs: Sequence[Run], budget: str, epochs_column: bool) -> Section:
    """Test accuracy by batch size beside the paper's, and the verdict: does it hold up at the
    largest batch? ``budget`` says what the runs had in common; ``epochs_column`` adds the epochs
    each batch size ran (for runs with a step budget)."""
    groups = group_runs(runs)
    rows = [[m[0].param("train_bs"),
             *([f"{stat(r.final('epoch') for r in m).hi:.0f}"] if epochs_column else []), *accuracy_cells(m),
             f"{PAPER_BATCH[m[0].param('train_bs')]:.1f}" if m[0].param("train_bs") in PAPER_BATCH else "-"]
            for m in groups.values()]
    headers = ["batch size", *(["epochs"] if epochs_column else []), *ACCURACY_HEADERS,
               "paper test acc % (CIFAR-10)"]
    section = Section([markdown_table(headers, rows), ""])
    accs = {m[0].param("train_bs"): final_stat(m, "test_acc") for m in groups.values()}
    finite = {b: s for b, s in accs.items() if s.n}
    if finite:
        best, largest = max(finite, key=lambda b: finite[b].mean), max(finite)
        drop = (finite[best].mean - finite[largest].mean) * 100
        fall = f"at batch {largest} AGD's test accuracy is {drop:.1f} points below its best"
        if drop > 1:
            verdict = Finding("", f"Unlike the paper's, {fall}",
                              " (the paper's rises from batch 32 to 1024 and holds at 4096)")
        else:
            verdict = Finding(f"As in the paper, {fall} (the paper's holds from 1024 to 4096)")
        section.lines.append(f"Ours: best at batch {best} ({pct(finite[best])}%). {budget} "
                             f"{section.state(verdict)}.")
    return section


def render_batch(runs: Sequence[Run]) -> Section:
    return _render_batch(runs, "Every run has the same number of epochs, so a larger batch takes fewer steps.",
                         epochs_column=False)


def render_batch_steps(runs: Sequence[Run]) -> Section:
    steps = ", ".join(sorted({str(run.param("steps")) for run in runs}))
    section = _render_batch(runs, f"Every run takes the same {steps} steps, so a larger batch sees more "
                                  "examples (more epochs).", epochs_column=True)
    section.lines += ["", f"{PAPER_BATCH_BUDGET}."]
    return section


def render_peers(runs: Sequence[Run]) -> Section:
    groups = group_runs(runs)
    adam = [g for g, m in groups.items() if m[0].param("optimizer") == "adam"]
    tuned = best_group(groups, adam, "test_acc", lowest=False)
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
        rows.append([rank, label, *accuracy_cells(members), seconds.fmt(1, 2)])
    section = Section([markdown_table(["rank", "optimizer", *ACCURACY_HEADERS, "s / epoch"], rows), "",
                       f"Paper: {PAPER_PEERS}.", ""])
    if "agd" in shown:
        section.lines += [f"Ours: AGD ranks {order.index('agd') + 1} of {len(order)} by mean test accuracy.", ""]
        section.lines += [f"- {section.state(versus(shown['agd'], shown[g], g if g != tuned else 'tuned Adam'))}."
                          for g in order if g != "agd"]
    return section


SHORT = {"lr": "Learning rate", "shape": "Shape", "batch": "Batch size", "batch-steps": "Batch size at equal steps",
         "peers": "Peers", "momentum": "Momentum", "models": "Models", "libraries": "timm and transformers",
         "compare": "Every optimizer"}
RENDERERS: dict[str, Callable[[Sequence[Run]], Section]] = {
    "lr": render_lr, "shape": render_shape, "batch": render_batch, "batch-steps": render_batch_steps,
    "peers": render_peers, "momentum": results_momentum.render_momentum, "models": results_models.render_models,
    "libraries": results_models.render_libraries, "compare": results_compare.render_compare,
}
TITLES = {
    "lr": "Learning rate: Adam and SGD over lr beside AGD (paper fig. 2)",
    "shape": "Shape: FCN depth x width under AGD (paper fig. 3)",
    "batch": "Batch size under AGD (paper fig. 4)",
    "batch-steps": "Batch size at equal steps",
    "peers": "AGD vs learning-rate-free peers and tuned Adam",
    "momentum": "Momentum: AGD with momentum 0 and 0.9 against tuned Adam",
    "models": "AGD on models nobody here wrote, and the paper's ResNet-18 under both counts of L",
    "libraries": "AGD(model) on a timm model and a transformers causal LM, built by name",
    "compare": "Every optimizer on each model: AGD, orthogonal AGD, tuned AdamW, tuned Muon, the peers",
}
# Each grid's section heading, in GRID_ORDER (a SUBSECTIONS grid is a part of the section before it)
HEADINGS = {grid: f"{'###' if grid in SUBSECTIONS else '##'} {TITLES[grid]}" for grid in GRID_ORDER}
# Grids with a figure of their own (runs, title) -> Figure; the others get plot.py's six panels.
FIGURES = {"momentum": results_momentum.figure, "models": results_models.figure, "libraries": results_models.figure,
           "compare": results_compare.figure}


def _setup(runs: Sequence[Run]) -> str:
    """What the runs were: one line per grid-wide setting, read from config.json."""
    def values(key, among=runs):
        found = sorted({str(run.param(key)) for run in among if run.param(key) is not None},
                       key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
        return ", ".join(found) if found else "-"

    seeds = {run.param("seed") for run in runs}
    cpu = sum(float(row.get("epoch_seconds") or 0) for run in runs for row in run.metrics)
    commits = values("git_commit")
    budget = f"; epochs: {values('epochs')}"
    with_steps = [run for run in runs if run.param("steps") is not None]
    if with_steps:  # a run with a step budget ignores its (default) epochs
        by_epochs = [run for run in runs if run.param("steps") is None]
        budget = (f"; epochs: {values('epochs', by_epochs)}" if by_epochs else "") + \
            f"; steps: {values('steps', with_steps)}"
    return (f"{len(runs)} runs ({sum(r.finished for r in runs)} finished); seeds per configuration: "
            f"{len(seeds)}; dataset: {values('dataset')}"
            + f"{budget}; torch-agd {values('version')}"
            + (f", git HEAD when run {commits}" if commits != "-" else "")
            + f"; {cpu / 60:.1f} minutes of epoch time (training and evaluation) in all.")


def read_grids(root: Path) -> dict[str, list[Run]]:
    """The runs of each grid under ``root``, in GRID_ORDER; a grid with no runs is left out."""
    grids = {}
    for grid in GRID_ORDER:
        try:
            grids[grid] = find_runs([Path(root) / grid])
        except UsageError:
            continue
    return grids


def _not_started(sweep_dir: Path, runs: Sequence[Run]) -> list[str]:
    """Runs that the sweep's manifest lists but that have no run directory yet: a page rendered
    while a sweep is under way says what it does not yet include."""
    listed = read_manifest(sweep_dir).get("runs", {})
    present = {run.name for run in runs}
    return [name for name in listed if name not in present]


def render_markdown(root: Path, grids: dict[str, list[Run]], figures: dict[str, str],
                    only: Sequence[str] | None = None) -> str:
    """The page for ``grids`` (read_grids(root)); ``figures``: each grid's figure, as a link.
    ``only``: a page of these grids alone (a grid still running, shown apart from the full page)."""
    root = Path(root)
    losses, body = [], []
    for grid in (GRID_ORDER if only is None else [g for g in GRID_ORDER if g in only]):
        body += [HEADINGS[grid], ""]
        if grid not in grids:
            body += [f"Not run: no runs under `{root / grid}` (run `agd sweep {grid}`).", ""]
            continue
        runs = grids[grid]
        section = RENDERERS[grid](runs)
        losses += [f"- {SHORT[grid]}: {finding.topic + ': ' if finding.topic else ''}{finding.text}"
                   for finding in section.findings if finding.worse]
        body += [_setup(runs), "", section.text, "", f"![{grid}]({figures[grid]})", ""]
        unfinished = [run.name for run in runs if not run.finished]
        if unfinished:
            body += [f"Unfinished runs (no {rundir.SUMMARY}): {', '.join(unfinished)}.", ""]
        not_started = _not_started(runs[0].path.parent, runs)  # where the runs are, not the shown root
        if not_started:
            body += [f"Not yet run ({len(not_started)} of the grid's runs that {SWEEP_MANIFEST} lists; "
                     f"`agd sweep {grid}` runs them): {', '.join(not_started)}.", ""]
    made_by = ("`scripts/make_results.sh`" if only is None else
               f"`python -m torch_agd.experiments.results {root} --grids {' '.join(only)}`")
    return "\n".join(["# Results", "",
                      f"Generated by {made_by} from the run directories under "
                      f"`{root}/`; do not edit by hand. Numbers are the final epoch's, as mean ± sample "
                      "standard deviation over seeds, with the lowest–highest seed beside them.", "",
                      results_merge.LOSSES, "", *(losses or [results_merge.NOWHERE]), "", *body])


def _figure(grid: str, runs: Sequence[Run]):
    if grid in FIGURES:
        return FIGURES[grid](runs, TITLES[grid])
    return make_figure(runs, TITLES[grid], GRID_KINDS[grid])


def render_page(root: Path, page: Path, figures: Path, only: Sequence[str] | None = None) -> str:
    """docs/results.md from ROOT/<grid> for each grid of GRID_ORDER (or of ``only``); writes the
    figures under ``figures``."""
    root, page, figures = Path(root), Path(page), Path(figures)
    if only is not None and not set(only) <= set(GRID_ORDER):
        raise UsageError(f"unknown grid in --grids {' '.join(only)}; choose from {', '.join(GRID_ORDER)}")
    grids = {g: runs for g, runs in read_grids(root).items() if only is None or g in only}
    if not grids:
        raise UsageError(f"no runs under {root}/{{{','.join(GRID_ORDER)}}}; run the sweeps first")
    links = {}
    for grid, runs in grids.items():
        png = save_figure(_figure(grid, runs), figures / f"{grid}.png")
        links[grid] = os.path.relpath(png, page.parent)
    return render_markdown(root, grids, links, only)


def _update(args: argparse.Namespace) -> str:
    """The page at --out with the sections of --grids rendered again (results_merge.py)."""
    if not args.grids:
        raise UsageError("--update renders only the grids named by --grids into the page; name them")
    if not args.out.is_file():
        raise UsageError(f"--update needs the page to update at {args.out}; leave --update out to write it")
    new = render_page(args.root, args.out, args.figures, args.grids)
    command = (f"python -m torch_agd.experiments.results {args.root} --grids {' '.join(args.grids)} "
               f"--out {args.out} --update")
    return results_merge.merge_pages(args.out.read_text(), new, args.grids, command, headings=HEADINGS,
                                     short=SHORT)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_agd.experiments.results",
                                     description="write docs/results.md from sweep directories")
    parser.add_argument("root", type=Path, help="directory holding the sweeps: " + ", ".join(GRID_ORDER))
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    parser.add_argument("--grids", nargs="+", metavar="GRID",
                        help="a page of these grids alone (default: every grid, the full page)")
    parser.add_argument("--update", action="store_true",
                        help="render the --grids' sections into the page at --out in place of its "
                             "old ones, keeping its other sections (grids whose runs are gone)")
    args = parser.parse_args(argv)
    try:
        text = _update(args) if args.update else render_page(args.root, args.out, args.figures, args.grids)
    except UsageError as exc:
        print(f"results: error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(args.out, text)
    print(f"wrote {args.out} and figures under {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
