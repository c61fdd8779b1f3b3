"""The trainer on models nobody here wrote: torchvision's ResNet-18 and ViT, a character-level LM on
text that exists on every machine, the AGD + AdamW fallback, step budgets and AGD's depth flag."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from helpers import bitwise_equal, metrics_rows
from fakedata import install_fake_idx
from torch_agd.cli import main
from torch_agd.data import DATASETS
from torch_agd.data.text import CONTEXT, TextSplit, load_text, stdlib_files
from torch_agd.models import build_model
from torch_agd.optim.rules import module_param_groups
from torch_agd.train.optimizers import AGDWithAdamW

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake_fashion(monkeypatch, tmp_path):
    install_fake_idx(monkeypatch, tmp_path / "data", "fashion-mnist", n_train=192, n_test=40)
    return tmp_path / "data"


@pytest.fixture
def text_file(tmp_path):
    # Real text: some of this Python's own sources, as the stdlib corpus uses.
    _, files = stdlib_files()
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"".join(f.read_bytes() for f in files[:3])[:60_000])
    return path


def _train(*argv):
    return main(["train", "--cpu", *map(str, argv)])


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ["tv-resnet18", "tv-vit", "resnet18", "cnn"])
def test_image_models_take_the_28x28_grayscale_datasets(arch):
    pytest.importorskip("torchvision")
    model = build_model(arch, DATASETS["fashion-mnist"])
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_the_charlm_predicts_every_next_byte():
    model = build_model("charlm-tied", DATASETS["stdlib"])
    assert model.head.weight is model.embed.weight
    assert model(torch.randint(0, 256, (2, CONTEXT))).shape == (2, CONTEXT, 256)


def test_models_and_datasets_that_do_not_go_together_are_one_line_errors(capsys):
    assert main(["train", "--arch", "charlm", "--dataset", "fashion-mnist", "--epochs", "1", "--cpu"]) == 2
    err = capsys.readouterr().err
    assert "--arch charlm is not defined for --dataset fashion-mnist" in err and "--arch fcn" in err
    assert err.count("\n") == 1


# ---------------------------------------------------------------- text data


def test_stdlib_corpus_is_split_by_file():
    root, files = stdlib_files()
    assert Path(sysconfig.get_paths()["stdlib"]) == root and len(files) > 50
    train, val, source = load_text("stdlib", None)
    assert val.startswith(files[0].read_bytes()) and files[10].read_bytes() in val
    assert files[1].read_bytes() in train and files[1].read_bytes() not in val
    assert "Python" in source and str(root) in source


def test_text_windows_predict_the_next_byte_and_validation_tiles_the_text():
    data = bytes(range(256)) * 10
    train = TextSplit(data, train=True, context=16)
    x, y = next(iter(train.batches(4, epoch=0, seed=1)))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal((x[:, 0] + 1) % 256, y[:, 0])
    val = TextSplit(data, train=False, context=16)
    seen = torch.cat([x for x, _ in val.batches(7)])
    assert torch.equal(seen.flatten(), torch.tensor(list(data[:len(seen) * 16])))
    assert len(seen) == (len(data) - 1) // 16


def test_text_ranks_together_see_what_one_process_sees():
    train = TextSplit(bytes(range(256)) * 20, train=True, context=8)
    whole = [x for x, _ in train.batches(6, epoch=2, seed=3)]
    parts = [[x for x, _ in train.batches(6, epoch=2, seed=3, rank=r, world_size=3)] for r in range(3)]
    assert len(whole) > 1 and all(len(p) == len(whole) for p in parts)
    for i, x in enumerate(whole):
        assert torch.equal(x, torch.cat([p[i] for p in parts]))


def test_a_text_dataset_needs_a_file_or_directory(tmp_path, capsys):
    assert _train("--arch", "charlm", "--dataset", "text", "--epochs", "1") == 2
    assert "--data-dir FILE" in capsys.readouterr().err
    assert _train("--arch", "charlm", "--dataset", "text", "--data-dir", tmp_path / "nothing", "--epochs", "1",
                  "--out", tmp_path / "run") == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- runs


@pytest.mark.slow
def test_a_language_model_trains_from_one_command(text_file, tmp_path):
    out = tmp_path / "lm"
    assert _train("--arch", "charlm", "--dataset", "text", "--data-dir", text_file, "--steps", 3,
                  "--train_bs", 4, "--test_bs", 64, "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "xent" and config["agd_depth"] == "auto"
    [row] = metrics_rows(out)
    # cross-entropy per byte of the validation text: below a uniform guess over 256 bytes
    assert 0 < row["test_loss"] < torch.log(torch.tensor(256.0)).item()
    state = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["state"][0]
    assert state["steps"].item() == 3


@pytest.mark.slow
def test_a_step_budget_stops_after_exactly_that_many_steps(fake_fashion, tmp_path, capsys):
    # 192 training images in batches of 32: 6 steps an epoch, so 8 steps are 1 epoch and 2 steps
    out = tmp_path / "run"
    argv = ["--arch", "fcn", "--dataset", "fashion-mnist", "--depth", 3, "--width", 16, "--train_bs", 32,
            "--data-dir", fake_fashion, "--out", out]
    assert _train(*argv, "--steps", 8) == 0
    assert [r["epoch"] for r in metrics_rows(out)] == [1, 2]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["state"][0]["steps"].item() == 8
    assert _train(*argv[:-2], "--out", tmp_path / "both", "--steps", 8, "--epochs", 2) == 2
    assert "--epochs or --steps" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,extra", [("agd+adamw", ()), ("agd", ("--momentum", "0.9"))])
def test_resume_continues_the_fallback_and_momentum_bit_for_bit(fake_fashion, tmp_path, optimizer, extra):
    argv = ["--arch", "fcn", "--dataset", "fashion-mnist", "--depth", 3, "--width", 16, "--train_bs", 32,
            "--data-dir", fake_fashion, "--optimizer", optimizer, *extra]
    assert _train(*argv, "--epochs", 3, "--out", tmp_path / "whole") == 0
    assert _train(*argv, "--epochs", 1, "--out", tmp_path / "cut") == 0
    # the cut run continues with --epochs 3: only the run's length differs, as after a kill
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    config["epochs"] = 3
    (tmp_path / "cut" / "config.json").write_text(json.dumps(config))
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["model"] and bitwise_equal(a["model"], b["model"])
    # tensor by tensor: eta, the step counters, the momentum buffers (this FCN's parameters are
    # all weight matrices, so the fallback's AdamW holds none and has no state)
    agd = a["optimizer"]["agd"] if optimizer == "agd+adamw" else a["optimizer"]
    assert agd["state"] and bitwise_equal(a["optimizer"], b["optimizer"])


def test_the_fallback_splits_matrices_from_everything_else():
    pytest.importorskip("torchvision")
    model = build_model("tv-vit", DATASETS["fashion-mnist"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AGDWithAdamW(model)
    kinds = {n: g["kind"] for g in module_param_groups(model) for n, _ in g["params"]}
    on_agd = {id(p) for g in opt.agd.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in on_agd) == (kinds[name] in ("weight", "attention")), name
        assert torch.equal(p, before[name])  # every parameter keeps its module's initialisation
    assert opt.agd.depth == sum(kinds[n] in ("weight", "attention") for n in kinds)
    assert opt.adamw.param_groups[0]["lr"] == 1e-3 and opt.adamw.param_groups[0]["weight_decay"] == 0.01


def test_agd_depth_defaults_to_the_papers_count_on_the_papers_networks(fake_fashion, tmp_path, capsys):
    from torch_agd.train.config import resolve_config
    from torch_agd.cli import build_parser

    def config_of(*argv):
        parser, _ = build_parser("train")
        return resolve_config(parser.parse_args(["train", *argv]))[0].flag_values()

    assert config_of("--arch", "resnet18")["agd_depth"] == "weights"
    assert config_of("--arch", "tv-resnet18")["agd_depth"] == "auto"
    assert config_of("--arch", "tv-resnet18", "--agd-depth", "7")["agd_depth"] == "7"
    assert config_of("--dataset", "stdlib", "--arch", "charlm")["loss"] == "xent"
    assert config_of("--arch", "fcn")["loss"] == "mse"
    assert _train("--agd-depth", "zero", "--epochs", 1) == 2
    assert "--agd-depth must be auto, weights or a positive integer" in capsys.readouterr().err
    assert _train("--optimizer", "adam", "--momentum", "0.9", "--epochs", 1) == 2
    assert "--momentum only applies" in capsys.readouterr().err
