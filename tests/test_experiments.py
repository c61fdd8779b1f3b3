"""Experiments: sweep grids and restart logic, figures, the results page.

Sweeps are driven by a fake trainer (an injected runner) that writes run directories the way
docs/architecture.md says `agd train` does, so nothing here trains a network.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
from pathlib import Path

import pytest

from torch_agd.errors import UsageError
from torch_agd.experiments import plot, results, runs as rundirs, sweep
from torch_agd.train import rundir
from torch_agd.train.optimizers import PEERS

from fakeruns import diverge, flags as _flags, trainer_config, write_run


# --- a fake trainer ------------------------------------------------------------------------

def _fake_acc(config):
    """A deterministic accuracy that depends on the run's settings, so tables differ by row."""
    seed = config.get("seed", 0)
    adam_bonus = 0.05 if config.get("optimizer") == "adam" else 0.0
    return (0.5 + 0.02 * seed + 0.001 * config.get("depth", 0) + 0.0001 * config.get("width", 0)
            + adam_bonus)


class FakeTrainer:
    """Records every launch; writes a finished run, or dies (checkpoint, no summary) at
    launch number ``die_at``, like a process killed mid-run."""

    def __init__(self, die_at=None, epochs=3):
        self.calls, self.die_at, self.epochs = [], die_at, epochs

    def __call__(self, argv, log_path):
        self.calls.append(list(argv))
        config = _flags(argv)
        out = Path(config["out"])
        if self.die_at is not None and len(self.calls) == self.die_at:
            write_run(out, config, 1, _fake_acc(config), finished=False)
            raise KeyboardInterrupt  # the sweep itself is interrupted here
        write_run(out, config, self.epochs, _fake_acc(config), eta=config["optimizer"] == "agd")
        return 0


def _sweep_args(name, root, **kw):
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    argv = [name, "--root", str(root)]
    for key, value in kw.items():  # value True: a bare flag
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return parser.parse_args(argv)


# --- grids ---------------------------------------------------------------------------------

def _arg(spec, flag):
    return spec.argv[spec.argv.index(flag) + 1]


def test_lr_grid_is_adam_and_sgd_over_five_lrs_beside_agd():
    specs = sweep.grid_runs("lr", "small", seeds=2)
    assert len(specs) == 2 * (1 + 2 * 5)
    pairs = {(_arg(s, "--optimizer"), float(_arg(s, "--lr")) if "--lr" in s.argv else None)
             for s in specs}
    assert pairs == {("agd", None)} | {(o, lr) for o in ("adam", "sgd")
                                       for lr in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}
    # one FCN for all of them, and seed-major order: the whole grid at seed 0 first
    assert len({(_arg(s, "--depth"), _arg(s, "--width")) for s in specs}) == 1
    assert [s.seed for s in specs] == [0] * 11 + [1] * 11
    assert len({s.name for s in specs}) == len(specs)
    assert all(s.name == f"{s.group}-s{s.seed}" for s in specs)


def test_shape_grid_covers_depth_by_width_and_paper_scale_matches_the_paper():
    small = sweep.grid_runs("shape", "small", seeds=1)
    s = sweep.SCALES["small"]
    assert len(small) == len(s.shape_depths) * len(s.shape_widths)
    assert {_arg(x, "--optimizer") for x in small} == {"agd"}
    assert {_arg(x, "--dataset") for x in small} == {"fashion-mnist"}
    paper = sweep.grid_runs("shape", "paper", seeds=1)
    assert {int(_arg(x, "--width")) for x in paper} == {64, 128, 256, 512, 1024, 2048}
    assert {int(_arg(x, "--depth")) for x in paper} == {2, 4, 8, 16, 32}
    assert {_arg(x, "--dataset") for x in paper} == {"cifar10"}


def test_batch_grid_spans_32_to_4096_on_a_4_layer_fcn():
    specs = sweep.grid_runs("batch", "paper", seeds=3)
    assert sorted({int(_arg(x, "--train_bs")) for x in specs}) == [32, 128, 1024, 4096]
    assert {_arg(x, "--depth") for x in specs} == {"4"}
    assert len(specs) == 12


def test_peers_grid_has_agd_every_peer_and_adam_over_lrs():
    specs = sweep.grid_runs("peers", "small", seeds=3, dataset="mnist", epochs=2)
    optimizers = {_arg(x, "--optimizer") for x in specs}
    assert optimizers == {"agd", "adam", *PEERS}
    adam_lrs = {float(_arg(x, "--lr")) for x in specs if _arg(x, "--optimizer") == "adam"}
    assert adam_lrs == set(sweep.SCALES["small"].peer_adam_lrs) and len(adam_lrs) > 1
    assert {_arg(x, "--dataset") for x in specs} == {"mnist"}
    assert {_arg(x, "--epochs") for x in specs} == {"2"}
    assert {x.seed for x in specs} == {0, 1, 2}
    # peers run at their published defaults: no --lr
    assert all("--lr" not in x.argv for x in specs if _arg(x, "--optimizer") in PEERS)


@pytest.mark.parametrize("kw, match", [
    ({"name": "nope"}, "unknown sweep"), ({"name": "lr", "scale": "huge"}, "--scale"),
    ({"name": "lr", "seeds": 0}, "--seeds"), ({"name": "lr", "epochs": 0}, "--epochs"),
])
def test_bad_grid_requests_are_usage_errors(kw, match):
    with pytest.raises(UsageError, match=match):
        sweep.grid_runs(**kw)


def test_dry_run_lists_runs_and_launches_nothing(tmp_path, capsys):
    trainer = FakeTrainer()
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=1, dry_run=True), runner=trainer) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert trainer.calls == [] and not (tmp_path / "batch").exists()
    assert len(out) == 4 and all(line.startswith("new") and "--train_bs" in line for line in out)


# --- running, skipping and resuming ------------------------------------------------------

def test_interrupted_sweep_restarts_without_repeating_runs(tmp_path, capsys):
    specs = sweep.grid_runs("batch", "small", seeds=2)
    first = FakeTrainer(die_at=3)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(_sweep_args("batch", tmp_path, seeds=2), runner=first)
    assert len(first.calls) == 3
    killed = Path(_flags(first.calls[2])["out"]).name
    assert sweep.run_state(tmp_path / "batch" / killed) == "resume"

    second = FakeTrainer()
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=2), runner=second) == 0
    started = [Path(_flags(c)["out"]).name for c in second.calls]
    # the two finished runs are skipped; the killed one is resumed; the rest start fresh
    assert len(started) == len(specs) - 2
    assert set(started) == {s.name for s in specs} - {Path(_flags(c)["out"]).name for c in first.calls[:2]}
    resumed = [Path(_flags(c)["out"]).name for c in second.calls if "--resume" in c]
    assert resumed == [killed]
    assert all(sweep.run_state(tmp_path / "batch" / s.name) == "done" for s in specs)

    third = FakeTrainer()
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=2), runner=third) == 0
    assert third.calls == []
    table = capsys.readouterr().out
    assert "| bs32 | 2/2 |" in table and "| bs4096 | 2/2 |" in table


def test_records_keep_each_finished_run_without_its_checkpoint_and_render_the_same_page(tmp_path, capsys):
    root, records = tmp_path / "runs", tmp_path / "records"
    first = FakeTrainer(die_at=3)  # two runs finish, the third is killed mid-run
    with pytest.raises(KeyboardInterrupt):
        sweep.run(_sweep_args("batch", root, seeds=2, records=records), runner=first)
    kept = sorted(p.name for p in (records / "batch").iterdir() if p.is_dir())
    assert kept == sorted(Path(_flags(c)["out"]).name for c in first.calls[:2])  # not the killed one
    # a run finished before --records was given is kept by the next sweep that has it
    assert sweep.run(_sweep_args("batch", root, seeds=2), runner=FakeTrainer()) == 0
    assert len([p for p in (records / "batch").iterdir() if p.is_dir()]) == 2
    assert sweep.run(_sweep_args("batch", root, seeds=2, records=records), runner=FakeTrainer()) == 0
    names = {s.name for s in sweep.grid_runs("batch", "small", seeds=2)}
    assert {p.name for p in (records / "batch").iterdir() if p.is_dir()} == names
    for name in names:
        assert sorted(p.name for p in (records / "batch" / name).iterdir()) == sorted(sweep.RECORD_FILES)
        for file in sweep.RECORD_FILES:
            assert (records / "batch" / name / file).read_bytes() == (root / "batch" / name / file).read_bytes()
    assert rundirs.read_manifest(records / "batch") == rundirs.read_manifest(root / "batch")
    page = {}
    for where in (root, records):
        grids = results.read_grids(where)
        page[where] = results.render_markdown(Path("runs"), grids, {"batch": "figures/batch.png"}, ["batch"])
    assert page[root] == page[records] and "Not yet run" not in page[records]


def test_a_fresh_checkout_runs_only_what_its_records_lack(tmp_path, capsys):
    # ROOT (checkpoints) is not versioned: a new checkout has the committed records and no runs
    root, records = tmp_path / "runs", tmp_path / "records"
    first = FakeTrainer(die_at=3)  # two runs finish (and are recorded), the third is killed
    with pytest.raises(KeyboardInterrupt):
        sweep.run(_sweep_args("batch", root, seeds=2, records=records), runner=first)
    recorded = {Path(_flags(c)["out"]).name for c in first.calls[:2]}
    shutil.rmtree(root)
    capsys.readouterr()
    assert sweep.run(_sweep_args("batch", root, seeds=2, records=records, dry_run=True), runner=FakeTrainer()) == 0
    states = {line.split()[-1].split("/")[-1]: line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert {name for name, state in states.items() if state == "kept"} == recorded and len(states) == 8
    second = FakeTrainer()
    assert sweep.run(_sweep_args("batch", root, seeds=2, records=records), runner=second) == 0
    started = {Path(_flags(c)["out"]).name for c in second.calls}
    names = {s.name for s in sweep.grid_runs("batch", "small", seeds=2)}
    assert started == names - recorded and len(started) == len(names) - 2
    out = capsys.readouterr().out
    assert f"2 already finished (2 of them only in {records / 'batch'})" in out
    assert "| bs32 | 2/2 |" in out and "| bs4096 | 2/2 |" in out  # the summary reads the records too
    # without --records nothing is known to be finished: every run that ROOT lacks runs again
    shutil.rmtree(root)
    third = FakeTrainer()
    assert sweep.run(_sweep_args("batch", root, seeds=2), runner=third) == 0
    assert len(third.calls) == len(names)


def test_failed_runs_are_reported_and_retried(tmp_path, capsys):
    def failing(argv, log_path):
        return 3

    assert sweep.run(_sweep_args("batch", tmp_path, seeds=1), runner=failing) == 1
    assert "4 run(s) failed" in capsys.readouterr().err
    trainer = FakeTrainer()
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=1), runner=trainer) == 0
    assert len(trainer.calls) == 4


def test_parallel_jobs_run_every_run_once(tmp_path):
    trainer = FakeTrainer()
    assert sweep.run(_sweep_args("shape", tmp_path, seeds=1, jobs=2), runner=trainer) == 0
    names = sorted(Path(_flags(c)["out"]).name for c in trainer.calls)
    assert names == sorted(s.name for s in sweep.grid_runs("shape", "small", seeds=1))


def test_a_sweep_with_other_settings_in_the_same_root_is_refused(tmp_path):
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=1), runner=FakeTrainer()) == 0
    trainer = FakeTrainer()
    with pytest.raises(UsageError, match="other flags"):
        sweep.run(_sweep_args("batch", tmp_path, seeds=1, epochs=7), runner=trainer)
    assert trainer.calls == []
    # more seeds of the same settings are fine: only the new runs start
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=2), runner=trainer) == 0
    assert {_flags(c)["seed"] for c in trainer.calls} == {1}


def test_subprocess_runner_uses_one_thread_and_logs(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, stdout, stderr, env):
        seen.update(cmd=cmd, env=env)
        stdout.write("trained\n")
        return argparse.Namespace(returncode=0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    log = tmp_path / "logs" / "x.log"
    assert sweep.SubprocessRunner(threads=1)(["--epochs", "1"], log) == 0
    assert seen["cmd"][1:] == ["-m", "torch_agd", "train", "--epochs", "1"]
    assert seen["env"]["OMP_NUM_THREADS"] == "1"
    assert log.read_text().splitlines() == ["$ agd train --epochs 1", "trained"]


# --- figures -------------------------------------------------------------------------------

def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _synthetic_sweep(root: Path, name: str, seeds=3) -> list:
    specs = sweep.grid_runs(name, "small", seeds=seeds)
    for spec in specs:
        config = _flags(spec.argv)
        write_run(root / name / spec.name, config, 3, _fake_acc(config),
                  eta=config["optimizer"] == "agd")
    return specs


def test_plot_draws_one_line_per_group_and_an_eta_band(tmp_path):
    specs = _synthetic_sweep(tmp_path, "lr", seeds=3)
    runs = rundirs.find_runs([tmp_path / "lr"])
    fig = plot.make_figure(runs)
    axes = fig.axes
    groups = {s.group for s in specs}
    eta_ax, train_loss_ax = axes[0], axes[1]
    assert len(train_loss_ax.get_lines()) == len(groups) == 11
    assert train_loss_ax.get_yscale() == "log" and train_loss_ax.get_xlabel() == "epoch"
    assert len(eta_ax.get_lines()) == 1  # only AGD has an eta
    assert len(eta_ax.collections) == 1  # its min-max band
    assert [t.get_text() for t in fig.legends[0].get_texts()][0] == "agd"
    assert sweep_panel_is(axes[5], xscale="log", xlabel="learning rate")
    out = plot.save_figure(fig, tmp_path / "lr.png")
    width, height = _png_size(out)
    assert width > 500 and height > 300 and out.stat().st_size < 200_000


def sweep_panel_is(ax, xscale, xlabel):
    return ax.get_xscale() == xscale and ax.get_xlabel() == xlabel


def test_plot_shape_sweep_has_a_depth_by_width_heatmap(tmp_path):
    _synthetic_sweep(tmp_path, "shape", seeds=1)
    runs = rundirs.find_runs([tmp_path / "shape"])
    assert plot.sweep_kind(runs) == "shape"
    fig = plot.make_figure(runs)
    heat = fig.axes[5]
    image = heat.get_images()[0].get_array()
    s = sweep.SCALES["small"]
    assert image.shape == (len(s.shape_depths), len(s.shape_widths))
    # row i is depth shape_depths[i]: the fake accuracy grows with depth and width
    assert image[0, 0] < image[-1, -1]
    assert heat.get_xlabel() == "width" and heat.get_ylabel() == "depth"


def test_plot_batch_sweep_is_accuracy_against_batch_size(tmp_path, capsys):
    _synthetic_sweep(tmp_path, "batch", seeds=2)
    runs = rundirs.find_runs([tmp_path / "batch"])
    assert plot.sweep_kind(runs) == "batch"
    ax = plot.make_figure(runs).axes[5]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "batch size"
    xs = list(ax.get_lines()[0].get_xdata())
    assert xs == [32, 128, 1024, 4096]
    # the CLI writes a PNG
    parser = argparse.ArgumentParser()
    plot.add_arguments(parser)
    assert plot.run(parser.parse_args([str(tmp_path / "batch"), "--out", str(tmp_path / "b.png")])) == 0
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_plot_overlays_several_run_dirs(tmp_path):
    write_run(tmp_path / "a", {"optimizer": "agd", "seed": 0}, 4, 0.8)
    write_run(tmp_path / "b", {"optimizer": "adam", "lr": 1e-3, "seed": 0}, 2, 0.7, eta=False)
    runs = rundirs.find_runs([tmp_path / "a", tmp_path / "b"])
    fig = plot.make_figure(runs)
    lines = fig.axes[4].get_lines()  # test accuracy
    assert [len(line.get_xdata()) for line in lines] == [4, 2]
    assert math.isclose(lines[0].get_ydata()[-1], 80.0)
    assert len(fig.axes[5].patches) == 2  # final accuracy bars


def test_plot_rejects_bad_input(tmp_path):
    parser = argparse.ArgumentParser()
    plot.add_arguments(parser)
    with pytest.raises(UsageError, match="no runs"):
        plot.run(parser.parse_args([str(tmp_path)]))
    with pytest.raises(UsageError, match="not a directory"):
        plot.run(parser.parse_args([str(tmp_path / "missing")]))
    write_run(tmp_path / "r", {"optimizer": "agd"}, 1, 0.5)
    with pytest.raises(UsageError, match=".png"):
        plot.run(parser.parse_args([str(tmp_path / "r"), "--out", str(tmp_path / "x.pdf")]))


# --- results -------------------------------------------------------------------------------

def test_summary_table_gives_mean_and_spread_over_seeds(tmp_path):
    for seed, acc in enumerate([0.80, 0.84, 0.82]):
        write_run(tmp_path / f"agd-s{seed}", {"optimizer": "agd", "seed": seed}, 2, acc)
    write_run(tmp_path / "sgd-s0", {"optimizer": "sgd", "seed": 0}, 2, 0.5, finished=False)
    table = sweep.summary_table(rundirs.find_runs([tmp_path]))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "| 3/3 | 82.0 ± 2.0 | 80.0–84.0 |" in rows["agd"]
    assert "| 0/1 | 50.0 |" in rows["sgd"]


def test_a_torn_metrics_line_and_a_diverged_run_are_handled(tmp_path):
    write_run(tmp_path / "r", {"optimizer": "sgd"}, 2, 0.5, finished=False)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "test_a')  # killed mid-write
    run = rundirs.load_run(tmp_path / "r")
    assert len(run.metrics) == 2 and not run.finished
    assert rundirs.stat([math.nan, math.nan]).fmt() == "diverged"
    assert rundirs.stat([1.0, math.nan, 3.0]).n == 2


def test_results_page_renders_every_grid_with_figures(tmp_path):
    for name in results.GRID_ORDER:
        _synthetic_sweep(tmp_path / "runs", name, seeds=3)
    page = tmp_path / "docs" / "results.md"
    assert results.main([str(tmp_path / "runs"), "--out", str(page),
                         "--figures", str(tmp_path / "docs" / "figures")]) == 0
    text = page.read_text()
    for name in results.GRID_ORDER:
        png = tmp_path / "docs" / "figures" / f"{name}.png"
        assert f"](figures/{name}.png)" in text and 10_000 < png.stat().st_size < 200_000
    assert "52.7%" in text and "63.7%" in text and "| 4096 | 3 |" in text
    # the fake AGD (depth 8, width 128) is worse than the fake Adam at any lr: the page says so
    assert "**AGD loses to tuned Adam**" in text
    # ...and lists it again at the top, where a reader looks first
    top = text.split("## Where AGD loses")[1].split("\n## ")[0]
    assert "- Peers: AGD loses to tuned Adam by 5.0 points" in top
    assert "AGD ranks" in text and "± " in text


# A small sweep of every grid whose numbers reach every branch of the page: AGD losing, tying
# and beating, a diverged run, a shape that did not train, a batch size that falls off, and an
# unfinished run. Accuracy by (group, seed); the page of these runs is pinned byte for byte.
PINNED_ACC = {
    "agd": 0.80, "adam-lr1e-04": 0.78, "adam-lr1e-03": 0.84, "adam-lr1e-02": 0.70,
    "sgd-lr1e-05": None, "sgd-lr1e-01": 0.79, "prodigy": 0.82, "dadapt-adam": 0.80, "dog": 0.75,
    "schedulefree": None, "d16-w32": 0.15, "bs4096": 0.55,
}
OLD_GRIDS = ("lr", "shape", "batch", "peers")  # pinned first; their configs are the flags alone
# The grids added since, by grid: batch size holding up at equal steps; momentum winning in two
# settings of three, AGD losing to tuned Adam in one (within the spread), tying and beating in
# others, a diverged Adam; a vision model missing the target and one meeting it, the LM
# missing it while beating Prodigy (lower loss is better), a diverged peer, and both counts of L.
# The LM's accuracies become validation losses (write_run: 0.4 + 1 - acc after two epochs).
PINNED_MORE = {
    "batch-steps": {"bs4096": 0.655},
    "momentum": {
        "fcn-e3-agd": 0.80, "fcn-e3-agd-m0.9": 0.83, "fcn-e3-agd-m0.9-hb": 0.82, "fcn-e3-adam-lr1e-04": 0.78,
        "fcn-e3-adam-lr3e-04": 0.84, "fcn-e3-adam-lr1e-03": 0.81, "fcn-e3-adam-lr3e-03": None,
        "fcn-e10-agd": 0.86, "fcn-e10-agd-m0.9": 0.85, "fcn-e10-agd-m0.9-hb": 0.87,
        "cnn-e3-agd": 0.70, "cnn-e3-agd-m0.9": 0.72, "cnn-e3-agd-m0.9-hb": 0.72, "cnn-e3-adam-lr1e-03": 0.60,
    },
    "models": {
        "tv-resnet18-agd": 0.83, "tv-resnet18-agd-L-weights": 0.80, "tv-resnet18-adamw-lr3e-04": 0.86,
        "tv-resnet18-adamw-lr1e-03": 0.855, "tv-resnet18-adamw-lr3e-03": 0.84, "tv-resnet18-adamw-lr1e-02": 0.70,
        "tv-resnet18-prodigy": 0.87, "tv-resnet18-schedulefree": 0.83, "tv-resnet18-agd+adamw": 0.81,
        "tv-vit-agd": 0.80, "tv-vit-agd-L-weights": 0.70, "tv-vit-adamw-lr3e-04": 0.79,
        "tv-vit-adamw-lr1e-03": 0.805, "tv-vit-adamw-lr3e-03": 0.78, "tv-vit-adamw-lr1e-02": 0.60,
        "tv-vit-prodigy": 0.78, "tv-vit-schedulefree": 0.79, "tv-vit-agd+adamw": 0.75,
        "charlm-agd": 0.60, "charlm-agd-L-weights": 0.61, "charlm-adamw-lr3e-04": 0.58,
        "charlm-adamw-lr1e-03": 0.62, "charlm-adamw-lr3e-03": 0.605, "charlm-adamw-lr1e-02": 0.50,
        "charlm-prodigy": 0.59, "charlm-schedulefree": None, "charlm-agd+adamw": 0.55,
        "resnet18-agd-L-weights": 0.70, "resnet18-agd-L-auto": 0.75,
    },
    "libraries": {  # AGD misses the target on the timm model and meets it on the LM
        "timm-resnet18-agd": 0.82, "timm-resnet18-agd-m0.9": 0.86, "timm-resnet18-adamw-lr1e-04": 0.80,
        "timm-resnet18-adamw-lr3e-04": 0.84,
        "timm-resnet18-adamw-lr1e-03": 0.85, "timm-resnet18-adamw-lr3e-03": 0.83,
        "hf-llama-agd": 0.61, "hf-llama-agd-m0.9": 0.63, "hf-llama-adamw-lr3e-04": 0.58, "hf-llama-adamw-lr1e-03": 0.60,
        "hf-llama-adamw-lr3e-03": 0.62, "hf-llama-adamw-lr1e-02": 0.55,
    },
    "compare": {},  # every config at its default value (0.60 + 0.01 per character of its group)
}
# The L that AGD uses on each model (measured: AGD(model).depth), as the trainer records it.
PINNED_L = {("tv-resnet18", "auto"): 10, ("tv-resnet18", "weights"): 21, ("tv-vit", "auto"): 10,
            ("tv-vit", "weights"): 18, ("charlm", "auto"): 10, ("charlm", "weights"): 18,
            ("resnet18", "auto"): 10, ("resnet18", "weights"): 21, ("fcn", "weights"): 8,
            ("cnn", "auto"): 4, ("tv-resnet18", "agd+adamw"): 21, ("tv-vit", "agd+adamw"): 18,
            ("charlm", "agd+adamw"): 17, ("timm:resnet18", "auto"): 10, ("hf:llama", "auto"): 10}


def pinned_config(name: str, argv) -> dict:
    if name in OLD_GRIDS:
        return {**_flags(argv), "version": "0.1.0", "git_commit": "0123abc"}
    config = trainer_config(argv)
    if config["optimizer"] in ("agd", "agd+adamw"):
        how = config["agd_depth"] if config["optimizer"] == "agd" else "agd+adamw"
        config["agd_L"] = PINNED_L[(config["arch"], how)]
    return config


def write_pinned_runs(root: Path) -> None:
    """ROOT/<grid> for every grid: two seeds of each grid's runs, as `agd train` leaves them."""
    for name in results.GRID_ORDER:
        for spec in sweep.grid_runs(name, "small", seeds=2):
            config = pinned_config(name, spec.argv)
            accs = PINNED_ACC if name in OLD_GRIDS else PINNED_MORE[name]
            acc = accs.get(spec.group, 0.60 + 0.01 * len(spec.group))
            run_dir = root / name / spec.name
            write_run(run_dir, config, 2, 0.5 if acc is None else acc + 0.01 * spec.seed,
                      finished=spec.name != "dog-s1", eta=config["optimizer"] in ("agd", "agd+adamw"))
            if acc is None:  # diverged: no finite test accuracy or loss
                diverge(run_dir)


PINNED_PAGE = Path(__file__).parent / "data" / "results_page.md"


def test_results_page_of_a_pinned_sweep_is_unchanged(tmp_path):
    write_pinned_runs(tmp_path)
    grids = results.read_grids(tmp_path)
    page = results.render_markdown(Path("runs"), grids, {g: f"figures/{g}.png" for g in grids})
    assert page == PINNED_PAGE.read_text()  # regenerate only for a change meant to show on the page


def test_where_agd_loses_lists_the_findings_the_sections_state(tmp_path):
    write_pinned_runs(tmp_path)
    sections = {g: results.RENDERERS[g](runs) for g, runs in results.read_grids(tmp_path).items()}
    worse = [(g, f.text) for g, section in sections.items() for f in section.findings if f.worse]
    assert [g for g, _ in worse] == ["lr", "lr", "shape", "batch", "peers", "peers", "momentum", "momentum",
                                     "models", "models", "models", "models", "models", "models", "libraries",
                                     "libraries", *["compare"] * 68]  # 6 of them against the tuned ones with the decay
    assert worse[2][1] == "AGD did not train (test accuracy under twice chance) at: depth 16 width 32"
    peers = [f.text for f in sections["peers"].findings]
    assert peers[2:] == ["AGD ties with dadapt-adam (test accuracy 80.5%)",
                         "AGD beats dog by 5.0 points of test accuracy (beyond the seed spread)",
                         "AGD vs schedulefree: not comparable (a run diverged)"]
    for section in sections.values():  # each finding is in its section's text, bold where worse
        assert all(f.markdown in section.text for f in section.findings)


def test_results_page_names_the_runs_a_sweep_under_way_has_not_started(tmp_path):
    # run every batch run, then delete one: sweep.json still lists it
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=1), runner=FakeTrainer()) == 0
    grids = results.read_grids(tmp_path)
    page = results.render_markdown(Path("runs"), grids, {g: f"figures/{g}.png" for g in grids})
    assert "Not yet run" not in page
    shutil.rmtree(tmp_path / "batch" / "bs4096-s0")
    grids = results.read_grids(tmp_path)
    page = results.render_markdown(Path("runs"), grids, {g: f"figures/{g}.png" for g in grids})
    assert "Not yet run (1 of the grid's runs that sweep.json lists; `agd sweep batch` runs them): bs4096-s0." in page


def test_results_page_without_runs_is_an_error(tmp_path, capsys):
    assert results.main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 2
    assert "run the sweeps first" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_peers_sweep_is_drawn_as_final_accuracies_not_an_lr_curve(tmp_path):
    specs = _synthetic_sweep(tmp_path, "peers", seeds=1)
    (tmp_path / "peers" / "sweep.json").write_text(json.dumps({"grid": "peers", "runs": {}}))
    runs = rundirs.find_runs([tmp_path / "peers"])
    assert plot.sweep_kind(runs) == "final"
    fig = plot.make_figure(runs)
    assert len(fig.axes[5].patches) == len(specs)  # one bar per optimizer / Adam lr
    assert plot._recorded_kind([tmp_path / "peers"]) == "final"
    assert plot._recorded_kind([tmp_path / "peers", tmp_path]) is None
    with pytest.raises(UsageError, match="figure kind"):
        plot.make_figure(runs, kind="pie")


def test_a_diverging_run_does_not_flatten_the_loss_axes(tmp_path):
    write_run(tmp_path / "agd-s0", {"optimizer": "agd", "seed": 0}, 3, 0.8)
    write_run(tmp_path / "adam-s0", {"optimizer": "adam", "lr": 0.1, "seed": 0}, 3, 0.1, eta=False)
    rows = [json.loads(line) for line in (tmp_path / "adam-s0" / "metrics.jsonl").read_text().splitlines()]
    rows[0]["train_loss"] = 1e11
    (tmp_path / "adam-s0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ax = plot.make_figure(rundirs.find_runs([tmp_path])).axes[1]
    assert ax.get_ylim()[1] < 100
    assert any("capped" in t.get_text() for t in ax.texts)


def test_a_run_killed_before_its_first_checkpoint_is_resumed(tmp_path):
    # the trainer writes config.json first and refuses a directory holding one unless --resume
    killed = tmp_path / "batch" / "bs128-s0"
    killed.mkdir(parents=True)
    rundir.write_json(killed / rundir.CONFIG, {"arch": "fcn"})
    assert sweep.run_state(killed) == "resume"
    trainer = FakeTrainer()
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=1), runner=trainer) == 0
    resumed = [Path(_flags(c)["out"]).name for c in trainer.calls if "--resume" in c]
    assert resumed == ["bs128-s0"]


def test_a_finished_run_without_metrics_is_resumed_not_skipped(tmp_path):
    # summary.json alone is not enough: the page needs metrics.jsonl, and `agd train --resume`
    # rebuilds it from the checkpoint
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=1), runner=FakeTrainer()) == 0
    (tmp_path / "batch" / "bs128-s0" / "metrics.jsonl").unlink()
    assert sweep.run_state(tmp_path / "batch" / "bs128-s0") == "resume"
    trainer = FakeTrainer()
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=1), runner=trainer) == 0
    assert [Path(_flags(c)["out"]).name for c in trainer.calls] == ["bs128-s0"]
    assert "--resume" in trainer.calls[0]


def test_a_page_of_some_grids_shows_those_alone_and_names_its_command(tmp_path):
    write_pinned_runs(tmp_path)
    grids = {g: runs for g, runs in results.read_grids(tmp_path).items() if g == "libraries"}
    page = results.render_markdown(Path("runs"), grids, {"libraries": "figures/libraries.png"}, ["libraries"])
    assert "`python -m torch_agd.experiments.results runs --grids libraries`" in page
    assert page.count("\n## ") == 2 and "## AGD(model) on a timm model" in page and "Not run" not in page
    full = results.render_markdown(Path("runs"), grids, {"libraries": "figures/libraries.png"})
    assert full.count("Not run: no runs under") == len(results.GRID_ORDER) - 1
    with pytest.raises(UsageError, match="unknown grid in --grids nope"):
        results.render_page(tmp_path, tmp_path / "page.md", tmp_path / "figures", ["nope"])


def test_only_runs_the_matching_runs_in_the_grids_order_and_refuses_a_pattern_matching_none(tmp_path, capsys):
    trainer = FakeTrainer()
    assert sweep.run(_sweep_args("batch", tmp_path, seeds=2, only="bs4096-s1"), runner=trainer) == 0
    assert [call[-1].rsplit("/", 1)[-1] for call in trainer.calls] == ["bs4096-s1"]
    # the rest of the grid stays listed in sweep.json, so a results page names them as not run yet
    listed = json.loads((tmp_path / "batch" / sweep.SWEEP_MANIFEST).read_text())["runs"]
    assert sorted(listed) == sorted(s.name for s in sweep.grid_runs("batch", "small", seeds=2)) and len(listed) == 8
    names = [s.name for s in sweep.only(sweep.grid_runs("batch", "small", seeds=2), ["bs1*-s0", "*-s1"])]
    assert names == ["bs128-s0", "bs1024-s0", "bs32-s1", "bs128-s1", "bs1024-s1", "bs4096-s1"]
    with pytest.raises(UsageError, match=r"^--only 'bs64-\*' matches none of the grid's 8 runs \(names like bs32-s0\)"):
        sweep.only(sweep.grid_runs("batch", "small", seeds=2), ["bs1*", "bs64-*"])
