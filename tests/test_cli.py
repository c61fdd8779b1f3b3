"""`agd train | sweep | plot`, `python -m torch_agd` and `python main.py`: flags and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import needs_fashion
from torch_agd import cli
from torch_agd.cli import main
from torch_agd.train import config as run_module

REPO = Path(__file__).resolve().parents[1]


def _parse(*argv):
    parser, module = cli.build_parser("train")
    return parser.parse_args(["train", *argv])


@pytest.mark.parametrize("spelling", [
    ["--train_bs", "64", "--test_bs", "32", "--data-dir", "/d"],
    ["--train-bs", "64", "--test-bs", "32", "--data_dir", "/d"],
])
def test_flags_accept_underscores_and_dashes(spelling):
    args = _parse(*spelling)
    assert (args.train_bs, args.test_bs, args.data_dir) == (64, 32, "/d")


def test_published_flags_and_defaults():
    args = _parse()
    config, resuming = run_module.resolve_config(args)
    published = dict(arch="fcn", dataset="cifar10", loss="mse", train_bs=128, test_bs=128, epochs=200,
                     depth=10, width=256, gain=1.0, distribute=False, cpu=False)
    assert {k: getattr(config, k) for k in published} == published and not resuming
    assert config.optimizer == "agd" and config.lr is None and config.nesterov and config.agd_depth == "weights"
    assert run_module.resolve_config(_parse("--optimizer", "sgd"))[0].lr == 0.1
    assert not run_module.resolve_config(_parse("--momentum", "0.9", "--momentum-form", "heavy-ball"))[0].nesterov


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for dest in run_module.FLAGS:
        assert run_module._flag(dest) in text
    assert "--resume" in text and "(default 128)" in text


@pytest.mark.parametrize("argv, fragment", [
    (["--arch", "vgg", "--dataset", "mnist"], "--arch vgg is not defined for --dataset mnist"),
    (["--arch", "transformer"], "unknown --arch 'transformer'; choose one of fcn"),
    (["--arch", "timm:resnet18", "--dataset", "stdlib"], "--arch timm:resnet18 is an image model"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--train_bs", "0"], "--train_bs must be at least 1, got 0"),
    (["--test-bs", "-2"], "--test_bs must be at least 1, got -2"),
    (["--workers", "-1"], "--workers must be 0 or more, got -1"),
    (["--train_bs", "ten"], "invalid int value: 'ten'"),
    (["--optimizer", "agd", "--lr", "0.1"], "--lr does not apply to --optimizer agd"),
    (["--optimizer", "adam", "--gain", "10"], "--gain only applies to --optimizer agd"),
    (["--optimizer", "sgd", "--lr", "-1"], "--lr must be positive"),
    (["--gain", "-1"], "gain must be a positive finite number"),
    (["--resume"], "--resume needs --out DIR"),
    (["--resume", "--out", "/nonexistent/run"], "nothing to resume"),
    (["--distribute", "--cpu", "--dataset", "mnist"], "torchrun --nproc_per_node"),
])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, monkeypatch):
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["train", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("agd: error: ") and err.count("\n") == 1 and fragment in err, err
    assert captured.out == ""


def test_a_missing_subcommand_module_says_it_is_unavailable(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "plot", ("torch_agd.experiments.no_such_module", "plot"))
    assert main(["plot", "runs/x"]) == 2
    assert "agd plot is unavailable" in capsys.readouterr().err


def test_subcommand_is_required(capsys):
    assert main([]) == 2
    assert "agd: error:" in capsys.readouterr().err


def _run(argv, env=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("entry", [["main.py"], ["-m", "torch_agd", "train"]])
def test_entry_points_print_errors_without_a_traceback(entry):
    result = _run([*entry, "--arch", "resnet50", "--dataset", "fashion-mnist"])
    assert result.returncode == 2
    assert result.stderr.startswith("agd: error: --arch resnet50 is not defined")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow
@needs_fashion
def test_main_py_trains_on_real_fashion_mnist(tmp_path):
    out = tmp_path / "run"
    # the default data dir (here $AGD_DATA, empty) lets Debian's copy stand in; a named one would not
    result = _run(["main.py", "--dataset", "fashion-mnist", "--depth", "3", "--width", "32", "--epochs", "1",
                   "--train-bs", "250", "--cpu", "--out", str(out)], env={"AGD_DATA": str(tmp_path / "data")})
    assert result.returncode == 0, result.stderr
    assert "data: fashion-mnist from /usr/share/datasets/fashion-mnist (Debian package" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["test_acc"] > 0.6  # chance is 0.1
    assert "done: 1 epochs" in result.stdout and str(out) in result.stdout
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.gz"))  # nothing downloaded
