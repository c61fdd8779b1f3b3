"""The batch-steps, momentum and models grids (issues 10 and 13): their runs, and the depth L
that the trainer records for them."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest

from torch_agd.cli import main
from torch_agd.errors import UsageError
from torch_agd.experiments import grids, sweep
from torch_agd.train.config import add_arguments, check_split, resolve_config

from fakedata import install_fake_idx


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
    assert settings == (("fcn", 3), ("fcn", 10), ("cnn", 3))
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
    configs = ["agd", "agd-L-weights", "adamw-lr3e-04", "adamw-lr1e-03", "adamw-lr3e-03", "adamw-lr1e-02",
               "prodigy", "schedulefree", "agd+adamw"]
    expected = [f"{m}-{c}" for m in ("tv-resnet18", "tv-vit", "charlm") for c in configs]
    expected += ["resnet18-agd-L-weights", "resnet18-agd-L-auto"]
    assert [s.group for s in specs if s.seed == 0] == expected and len(specs) == 3 * 29
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


@pytest.mark.parametrize("name, count", [("batch-steps", 12), ("momentum", 63), ("models", 87)])
def test_dry_run_lists_the_new_grids(tmp_path, capsys, name, count):
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    assert sweep.run(parser.parse_args([name, "--root", str(tmp_path), "--dry-run"]), runner=None) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == count and all(line.startswith("new     agd train ") for line in lines)
    assert not (tmp_path / name).exists()


# --- the depth L in config.json -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("flags, L", [
    (("--arch", "fcn", "--depth", "3", "--width", "8", "--optimizer", "agd"), 3),
    (("--arch", "tv-vit", "--optimizer", "agd"), 10),  # auto: layers in series
    (("--arch", "tv-vit", "--optimizer", "agd", "--agd-depth", "weights"), 18),
    (("--arch", "tv-vit", "--optimizer", "agd+adamw"), 18),  # the fallback: one per weight matrix
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
