"""The batch-steps, momentum and models grids: their runs, their sections of
the results page, and the depth L that the trainer records for them.

Run directories are written by fakeruns (config.json as the trainer resolves it); nothing here
trains a network except the last test, which trains three tiny ones to read their config.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from torch_agd.cli import main
from torch_agd.errors import UsageError
from torch_agd.experiments import findings, grids, results, results_models, results_momentum, sweep
from torch_agd.experiments.runs import find_runs
from torch_agd.train.config import add_arguments, check_split, resolve_config

from fakedata import install_fake_idx
from fakeruns import diverge, trainer_config, write_run


def _arg(spec, flag):
    return spec.argv[spec.argv.index(flag) + 1]


# --- grids ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scale, steps", [("small", 3 * (60_000 // 128)), ("paper", 200 * (50_000 // 128))])
def test_batch_steps_is_the_batch_grid_at_the_steps_of_its_batch_128_run(scale, steps):
    by_epochs, by_steps = grids.grid_runs("batch", scale, seeds=3), grids.grid_runs("batch-steps", scale, seeds=3)
    assert grids.batch_steps(grids.SCALES[scale], by_steps[0].argv[3]) == steps
    assert [s.name for s in by_steps] == [s.name for s in by_epochs] and len(by_steps) == 12
    for e, s in zip(by_epochs, by_steps):
        assert _arg(s, "--steps") == str(steps) and "--epochs" not in s.argv
        assert [a for a in e.argv if a not in ("--epochs", _arg(e, "--epochs") if "--epochs" in e.argv else "")] \
            == [a for a in s.argv if a not in ("--steps", str(steps))]


def test_batch_steps_follow_the_epochs_and_dataset_of_the_batch_grid():
    assert {_arg(s, "--steps") for s in grids.grid_runs("batch-steps", "small", epochs=5)} == {str(5 * 468)}
    assert {_arg(s, "--steps") for s in grids.grid_runs("batch-steps", "small", dataset="cifar10")} == {str(3 * 390)}
    with pytest.raises(UsageError, match="training-set size of --dataset imagenet"):
        grids.grid_runs("batch-steps", "small", dataset="imagenet")


def test_momentum_grid_has_three_agd_configs_and_adam_per_setting_over_seeds():
    specs = grids.grid_runs("momentum", "small", seeds=3)
    settings = grids.SCALES["small"].momentum_settings
    assert settings == (("fcn", 3), ("fcn", 10), ("cnn", 2))
    per_setting = len(grids.MOMENTUM_CONFIGS) + len(grids.MOMENTUM_ADAM_LRS)
    assert per_setting == 7 and len(specs) == 3 * 3 * per_setting
    assert [s.seed for s in specs] == [0] * 21 + [1] * 21 + [2] * 21
    assert {s.name for s in specs if s.seed == 0} == {
        f"{arch}-e{epochs}-{config}-s0" for arch, epochs in settings
        for config in ("agd", "agd-m0.9", "agd-m0.9-hb", "adam-lr1e-04", "adam-lr3e-04", "adam-lr1e-03", "adam-lr3e-03")}
    for spec in specs:
        arch, epochs = _arg(spec, "--arch"), int(_arg(spec, "--epochs"))
        assert spec.group.startswith(f"{arch}-e{epochs}-") and (arch, epochs) in settings
        assert _arg(spec, "--seed") == str(spec.seed) and _arg(spec, "--dataset") == "fashion-mnist"
        if arch == "fcn":
            assert (_arg(spec, "--depth"), _arg(spec, "--width")) == ("8", "256")
        else:
            assert "--depth" not in spec.argv
        momentum = _arg(spec, "--momentum") if "--momentum" in spec.argv else None
        form = _arg(spec, "--momentum-form") if "--momentum-form" in spec.argv else None
        kind = spec.group.removeprefix(f"{arch}-e{epochs}-")
        assert (momentum, form) == {"agd": (None, None), "agd-m0.9": ("0.9", None),
                                    "agd-m0.9-hb": ("0.9", "heavy-ball")}.get(kind, (None, None))
        assert (_arg(spec, "--optimizer") == "adam") == kind.startswith("adam-")
    adam_lrs = {float(_arg(s, "--lr")) for s in specs if _arg(s, "--optimizer") == "adam"}
    assert adam_lrs == {1e-4, 3e-4, 1e-3, 3e-3}
    with pytest.raises(UsageError, match="--epochs does not apply to sweep momentum"):
        grids.grid_runs("momentum", "small", epochs=4)


def test_models_grid_runs_every_config_on_each_model_at_the_scales_step_budgets(monkeypatch):
    monkeypatch.setitem(grids.SCALES, "small", replace(grids.SCALES["small"], models_steps=123, lm_steps=45,
                                                       paper_resnet_steps=6))
    specs = grids.grid_runs("models", "small", seeds=3)
    configs = ["agd", "agd-L-weights", "agd-m0.9", "adamw-lr3e-04", "adamw-lr1e-03", "adamw-lr3e-03",
               "adamw-lr1e-02", "prodigy", "schedulefree", "agd+adamw"]
    expected = [f"{m}-{c}" for m in ("tv-resnet18", "tv-vit", "charlm") for c in configs]
    expected += ["resnet18-agd-L-weights", "resnet18-agd-L-auto"]
    assert [s.group for s in specs if s.seed == 0] == expected and len(specs) == 3 * 32
    for spec in specs:
        arch = _arg(spec, "--arch")
        assert spec.group.startswith(f"{arch}-") and _arg(spec, "--test_bs") == "500"
        assert _arg(spec, "--seed") == str(spec.seed) and "--epochs" not in spec.argv
        steps, dataset, batch, loss = {"charlm": ("45", "stdlib", "32", "xent"),
                                       "resnet18": ("6", "fashion-mnist", "128", "mse")}.get(
            arch, ("123", "fashion-mnist", "128", "xent"))
        assert (_arg(spec, "--steps"), _arg(spec, "--dataset"), _arg(spec, "--train_bs"), _arg(spec, "--loss")) \
            == (steps, dataset, batch, loss)
        config = spec.group.removeprefix(f"{arch}-")
        if config.startswith("adamw-"):
            assert (_arg(spec, "--optimizer"), float(_arg(spec, "--lr"))) == ("adamw", float(config[8:]))
        elif config.startswith("agd-L-"):
            assert (_arg(spec, "--optimizer"), _arg(spec, "--agd-depth")) == ("agd", config[6:])
        elif config == "agd-m0.9":
            assert (_arg(spec, "--optimizer"), _arg(spec, "--momentum")) == ("agd", "0.9")
        elif config == "agd+adamw":  # one layer per matrix, the L of the published runs
            assert (_arg(spec, "--optimizer"), _arg(spec, "--agd-depth")) == ("agd+adamw", "weights")
        else:
            assert _arg(spec, "--optimizer") == config and "--lr" not in spec.argv and "--agd-depth" not in spec.argv
    assert {_arg(s, "--dataset") for s in grids.grid_runs("models", "small", seeds=1, dataset="mnist")} \
        == {"mnist", "stdlib"}
    with pytest.raises(UsageError, match="--epochs does not apply to sweep models"):
        grids.grid_runs("models", "small", epochs=2)


@pytest.mark.parametrize("scale", sorted(grids.SCALES))
def test_the_trainer_accepts_every_run_of_every_grid(scale):
    for name in grids.GRIDS:
        for spec in grids.grid_runs(name, scale, seeds=1):
            parser = argparse.ArgumentParser()
            add_arguments(parser)
            config, _ = resolve_config(parser.parse_args([*spec.argv, "--out", "unused"]))
            check_split(config, world_size=1)


@pytest.mark.parametrize("name, count", [("batch-steps", 12), ("momentum", 63), ("models", 96)])
def test_dry_run_lists_the_new_grids(tmp_path, capsys, name, count):
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    assert sweep.run(parser.parse_args([name, "--root", str(tmp_path), "--dry-run"]), runner=None) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == count and all(line.startswith("new     agd train ") for line in lines)
    assert not (tmp_path / name).exists()


# --- findings --------------------------------------------------------------------------------

def _runs(tmp_path, name, values, key="test_acc"):
    """Runs of group ``name``, one per value, whose final ``key`` is that value."""
    out = []
    for seed, value in enumerate(values):
        run_dir = tmp_path / f"{name}-s{seed}"
        write_run(run_dir, {"optimizer": "agd", "seed": seed}, 1, 0.5)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows[-1][key] = value
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out += find_runs([run_dir])
    return out


def test_compare_knows_which_way_is_better_and_whether_the_seeds_overlap(tmp_path):
    loss = findings.VALIDATION_LOSS
    low, high, mid = (_runs(tmp_path, n, v, "test_loss") for n, v in
                      (("low", [1.00, 1.01]), ("high", [1.10, 1.12]), ("mid", [1.005, 1.20])))
    assert findings.compare(low, high, "AGD", "X", metric=loss).text == \
        "AGD beats X by 9.5% in validation loss (beyond the seed spread)"  # 1.005 is 9.5% below 1.11
    lost = findings.compare(high, low, "AGD", "X", metric=loss)
    assert lost.worse == "AGD loses to X" and lost.tail == " by 10.4% in validation loss (beyond the seed spread)"
    assert "within the seed spread" in findings.compare(mid, low, "AGD", "X", metric=loss).text
    assert findings.compare(low, low, "AGD", "X", metric=loss).text == "AGD ties with X (validation loss 1.0050)"
    neutral = findings.compare(high, low, "A", "B", metric=loss, worse=False)
    assert not neutral.worse and neutral.text.startswith("A loses to B by 10.4%")
    acc_hi, acc_lo = _runs(tmp_path, "ahi", [0.9, 0.91]), _runs(tmp_path, "alo", [0.8, 0.95])
    assert findings.compare(acc_lo, acc_hi, "AGD", "Y").text == \
        "AGD loses to Y by 3.0 points of test accuracy (within the seed spread)"
    one = _runs(tmp_path, "one", [0.5])  # a single seed is never "beyond" anything
    assert findings.compare(one, acc_hi, "AGD", "Y").tail == \
        " by 40.5 points of test accuracy (one seed: no spread measured)"


# --- the batch section ---------------------------------------------------------------------------

def _write_grid(root: Path, name: str, acc: dict, seeds=2, L=None):
    """ROOT/NAME with the grid's small runs; ``acc``: final test accuracy by group (default 0.8;
    None: diverged); ``L``: agd_L by (arch, agd_depth or optimizer)."""
    for spec in grids.grid_runs(name, "small", seeds=seeds):
        config = trainer_config(spec.argv)
        if L and config["optimizer"] in ("agd", "agd+adamw"):
            config["agd_L"] = L.get((config["arch"], config["agd_depth"] if config["optimizer"] == "agd"
                                     else "agd+adamw"))
        value = acc.get(spec.group, 0.8)
        write_run(root / name / spec.name, config, 2, 0.5 if value is None else value + 0.01 * spec.seed)
        if value is None:
            diverge(root / name / spec.name)


def _page(root: Path) -> str:
    grids = results.read_grids(root)
    return results.render_markdown(Path("runs"), grids, {g: f"figures/{g}.png" for g in grids})


def test_batch_section_shows_equal_epochs_and_equal_steps_each_with_its_verdict(tmp_path):
    _write_grid(tmp_path, "batch", {"bs32": 0.86, "bs128": 0.85, "bs1024": 0.78, "bs4096": 0.65})
    _write_grid(tmp_path, "batch-steps", {"bs32": 0.80, "bs128": 0.85, "bs1024": 0.86, "bs4096": 0.855})
    steps = results.render_batch_steps(find_runs([tmp_path / "batch-steps"]))
    assert [f.text for f in steps.findings] == [
        "As in the paper, at batch 4096 AGD's test accuracy is 0.5 points below its best "
        "(the paper's holds from 1024 to 4096)"]
    assert "Every run takes the same 1404 steps" in steps.text and "| batch size | epochs |" in steps.text
    assert "That the paper's comparison is at equal steps is a claim made here" in steps.text
    page = _page(tmp_path)
    batch = page.split("## Batch size under AGD (paper fig. 4)")[1].split("\n## ")[0]
    assert batch.index("same number of epochs") < batch.index("### Batch size at equal steps") \
        < batch.index("same 1404 steps")
    assert batch.count("| paper test acc % (CIFAR-10) |") == 2
    top = page.split("## Where AGD loses")[1].split("\n## ")[0]
    assert "- Batch size: Unlike the paper's, at batch 4096 AGD's test accuracy is 21.0 points below" in top
    assert "Batch size at equal steps:" not in top
    _write_grid(tmp_path, "batch-steps", {"bs4096": 0.70})  # at equal steps too, it falls off
    assert "- Batch size at equal steps: Unlike the paper's, at batch 4096 AGD's test accuracy is 10.0 points" \
        in _page(tmp_path)


# --- the momentum section ------------------------------------------------------------------------

MOMENTUM_WINS = {f"{s}-agd-m0.9": 0.84 for s in ("fcn-e3", "fcn-e10", "cnn-e2")}


def test_momentum_verdict_when_momentum_wins_everywhere_and_when_it_does_not(tmp_path):
    _write_grid(tmp_path, "momentum", {**MOMENTUM_WINS, "cnn-e2-agd-m0.9": 0.805})
    section = results_momentum.render_momentum(find_runs([tmp_path / "momentum"]))
    assert section.findings[-1].text == ("Momentum 0.9 (Nesterov) beat momentum 0 in 3 of 3 settings (2 beyond "
                                         "the seed spread): momentum won everywhere measured, yet the default "
                                         "stays --momentum 0, the paper's exact rule with no optimizer state "
                                         "(momentum holds a buffer the size of the weights); turn it on with "
                                         "--momentum 0.9")
    _write_grid(tmp_path, "momentum", {**MOMENTUM_WINS, "fcn-e10-agd-m0.9": 0.79})
    section = results_momentum.render_momentum(find_runs([tmp_path / "momentum"]))
    assert section.findings[-1].text == ("Momentum 0.9 (Nesterov) beat momentum 0 in 2 of 3 settings (not in: "
                                         "FCN depth 8 width 256, 10 epochs), so the default stays 0")
    assert section.text.endswith(f"Verdict: {section.findings[-1].markdown}.")


def test_momentum_tables_and_findings_per_setting(tmp_path):
    _write_grid(tmp_path, "momentum", {"fcn-e3-agd-m0.9": 0.83, "fcn-e3-agd-m0.9-hb": 0.82,
                                       "fcn-e3-adam-lr3e-04": 0.86, "fcn-e3-adam-lr3e-03": None,
                                       "cnn-e2-agd-m0.9-hb": 0.81, "cnn-e2-adam-lr1e-04": 0.70})
    section = results_momentum.render_momentum(find_runs([tmp_path / "momentum"]))
    titles = [line for line in section.lines if line.startswith("### ")]
    assert titles == ["### FCN depth 8 width 256, 3 epochs", "### FCN depth 8 width 256, 10 epochs",
                      "### small CNN (--arch cnn), 2 epochs"]
    assert "| adam, lr 0.0003 (tuned Adam: best of lr 0.0001, 0.0003, 0.001, 0.003) | 2 | 86.5 ± 0.7 |" \
        in section.text
    assert "| adam, lr 0.003 | 2 | diverged |" in section.text
    fcn3 = [f for f in section.findings if f.topic == "FCN depth 8 width 256, 3 epochs"]
    assert [f.text for f in fcn3] == [
        "AGD with momentum 0.9 (Nesterov) beats momentum 0 by 3.0 points of test accuracy (beyond the seed spread)",
        "AGD's best (momentum 0.9, Nesterov) loses to tuned Adam (lr 0.0003) by 3.0 points of test accuracy "
        "(beyond the seed spread)",
        "AGD with Nesterov momentum beats heavy-ball momentum by 1.0 points of test accuracy (within the seed spread)"]
    assert [bool(f.worse) for f in fcn3] == [False, True, False]
    cnn = [f.text for f in section.findings if f.topic.startswith("small CNN")]
    assert cnn[1] == ("AGD's best (momentum 0.9, heavy ball) beats tuned Adam (lr 0.0003) by 1.0 points of test "
                      "accuracy (within the seed spread)")
    top = _page(tmp_path).split("## Where AGD loses")[1].split("\n## ")[0]
    assert top.strip().splitlines() == [
        "- Momentum: FCN depth 8 width 256, 3 epochs: AGD's best (momentum 0.9, Nesterov) loses to tuned Adam "
        "(lr 0.0003) by 3.0 points of test accuracy (beyond the seed spread)"]


# --- the models section --------------------------------------------------------------------------

MODEL_L = {("tv-resnet18", "auto"): 10, ("tv-resnet18", "weights"): 21, ("tv-vit", "auto"): 10,
           ("tv-vit", "weights"): 18, ("charlm", "auto"): 10, ("charlm", "weights"): 18,
           ("resnet18", "auto"): 10, ("resnet18", "weights"): 21, ("tv-resnet18", "agd+adamw"): 21,
           ("tv-vit", "agd+adamw"): 18, ("charlm", "agd+adamw"): 17}


def _models_section(tmp_path, acc, L=MODEL_L):
    _write_grid(tmp_path, "models", acc, L=L)
    return results_models.render_models(find_runs([tmp_path / "models"]))


def test_models_target_is_a_finding_that_lists_a_miss_under_where_agd_loses(tmp_path):
    section = _models_section(tmp_path, {"tv-resnet18-adamw-lr1e-03": 0.82, "tv-vit-agd": 0.79})
    targets = {f.topic: f for f in section.findings if "the target" in f.text}
    assert targets["tv-resnet18"].worse == "AGD loses to tuned AdamW (lr 0.001)"
    assert targets["tv-resnet18"].tail == (" by 2.0 points of test accuracy (beyond the seed spread); the target "
                                           "(within 1 point of test accuracy) is missed")
    # 1.0 points (1.0000000000000009 in floating point) is within 1 point: judged as the page shows it
    assert targets["tv-vit"].text == ("AGD loses to tuned AdamW (lr 0.0003) by 1.0 points of test accuracy (within "
                                      "the seed spread); the target (within 1 point of test accuracy) is met")
    assert targets["charlm"].text == ("AGD ties with tuned AdamW (lr 0.01) (validation loss 0.5950); the target "
                                      "(within 2% of the validation loss) is met")
    assert "resnet18" not in targets  # the paper's network has no AdamW runs: only the depth question
    top = _page(tmp_path).split("## Where AGD loses")[1].split("\n## ")[0]
    assert ("- Models: tv-resnet18: AGD loses to tuned AdamW (lr 0.001) by 2.0 points of test accuracy (beyond "
            "the seed spread); the target (within 1 point of test accuracy) is missed") in top


def test_models_lm_is_judged_by_validation_loss_lower_is_better(tmp_path):
    section = _models_section(tmp_path, {"charlm-agd": 0.80, "charlm-adamw-lr1e-02": 0.81})
    lm = [f for f in section.findings if f.topic == "charlm"]
    assert lm[0].text == ("AGD loses to tuned AdamW (lr 0.01) by 1.7% in validation loss (within the seed spread); "
                          "the target (within 2% of the validation loss) is met")
    assert lm[1].text == "AGD ties with the AGD+AdamW fallback (validation loss 0.5950)"
    assert "| validation loss | validation loss (min–max) |" in section.text
    # next-byte accuracy and validation loss disagree: tuned AdamW is the lowest loss, AGD is
    # judged by its loss (lower is better), and losing by over 2% misses the target
    for seed in (0, 1):
        run = tmp_path / "models" / f"charlm-adamw-lr3e-04-s{seed}"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows[-1].update(test_loss=0.50 + 0.001 * seed, test_acc=0.10)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = results_models.render_models(find_runs([tmp_path / "models"]))
    target = [f for f in section.findings if f.topic == "charlm"][0]
    assert target.worse == "AGD loses to tuned AdamW (lr 0.0003)"
    assert target.tail.endswith("the target (within 2% of the validation loss) is missed")
    assert "| adamw-lr3e-04 (tuned AdamW: best of lr 0.0003, 0.001, 0.003, 0.01) | - | 2 | 0.5005 ± 0.0007 |" \
        in section.text


def test_models_show_the_L_that_agd_used_and_compare_both_counts(tmp_path):
    section = _models_section(tmp_path, {"resnet18-agd-L-weights": 0.70, "tv-vit-agd-L-weights": 0.70})
    titles = [line for line in section.lines if line.startswith("### ")]
    assert [t.split()[1] for t in titles] == ["tv-resnet18", "tv-vit", "charlm", "resnet18"]
    assert "| agd | 10 | 2 | 80.5 ± 0.7 |" in section.text and "| agd+adamw | 21 |" in section.text
    depth = {f.topic: f.text for f in section.findings if "L = " in f.text}
    assert depth["resnet18"] == ("AGD with L = 10 (auto: layers in series) beats L = 21 (weights: one per weight "
                                 "tensor, the paper's count) by 10.0 points of test accuracy (beyond the seed spread)")
    assert depth["tv-vit"].startswith("AGD with L = 10 (auto: layers in series) beats L = 18")
    assert not any(f.worse for f in section.findings if "L = " in f.text)
    others = [f.text for f in section.findings if f.topic == "tv-resnet18"][1:4]
    assert others == ["AGD ties with the AGD+AdamW fallback (test accuracy 80.5%)",
                      "AGD ties with Prodigy (test accuracy 80.5%)",
                      "AGD ties with Schedule-Free AdamW (test accuracy 80.5%)"]
    section = _models_section(tmp_path, {}, L={})  # runs from before the trainer recorded L
    assert "| agd | - | 2 |" in section.text
    assert "AGD with L unrecorded (auto: layers in series) ties with L unrecorded (weights" in section.text


def test_new_figures_have_a_panel_per_setting_and_per_model(tmp_path):
    _write_grid(tmp_path, "momentum", {})
    fig = results_momentum.figure(find_runs([tmp_path / "momentum"]), "m")
    assert [ax.get_title() for ax in fig.axes] == ["FCN depth 8 width 256, 3 epochs",
                                                   "FCN depth 8 width 256, 10 epochs", "small CNN (--arch cnn), 2 epochs"]
    assert [len(ax.get_lines()) for ax in fig.axes] == [4, 4, 4]  # AGD's three and tuned Adam
    _write_grid(tmp_path, "models", {}, L=MODEL_L)
    fig = results_models.figure(find_runs([tmp_path / "models"]), "m")
    assert [len(ax.patches) for ax in fig.axes] == [10, 10, 10, 2]
    assert fig.axes[2].get_ylabel() == "validation loss (nats per byte)"


# --- the depth L in config.json -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("flags, L", [
    (("--arch", "fcn", "--depth", "3", "--width", "8", "--optimizer", "agd"), 3),
    (("--arch", "tv-vit", "--optimizer", "agd"), 10),  # auto: layers in series
    (("--arch", "tv-vit", "--optimizer", "agd", "--agd-depth", "weights"), 18),
    (("--arch", "tv-vit", "--optimizer", "agd+adamw", "--agd-depth", "weights"), 18),  # one per weight matrix
    (("--arch", "tv-vit", "--optimizer", "agd+adamw"), 10),  # auto: the matrices in series
    (("--arch", "fcn", "--depth", "3", "--width", "8", "--optimizer", "adam"), None),
])
def test_the_trainer_records_the_L_that_agd_used(monkeypatch, tmp_path, one_thread, flags, L):
    install_fake_idx(monkeypatch, tmp_path / "data", "fashion-mnist", n_train=64, n_test=16)
    out = tmp_path / "run"
    argv = ["train", *flags, "--dataset", "fashion-mnist", "--train_bs", "32", "--test_bs", "16", "--steps", "1",
            "--cpu", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config.get("agd_L") == L and ("agd_L" in config) == (L is not None)


def test_make_results_runs_every_grid_that_the_page_shows():
    script = (Path(__file__).parents[1] / "scripts" / "make_results.sh").read_text()
    default = next(line for line in script.splitlines() if line.startswith("GRIDS="))
    listed = default.split(":-", 1)[1].rstrip("}").split()
    assert listed == list(results.GRID_ORDER) and set(listed) == set(grids.GRIDS) - set(grids.NOT_ON_PAGE)
    assert set(results.RENDERERS) == set(results.TITLES) == set(results.SHORT) == set(listed)
