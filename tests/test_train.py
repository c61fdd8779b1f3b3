"""The trainer: losses, optimizers, one epoch, checkpoints, and whole runs that never lose work."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fakedata import install_fake_idx
from helpers import bitwise_equal, metrics_rows, needs_fashion
from torch_agd import AGD, UsageError
from torch_agd.cli import main
from torch_agd.data import DATASETS
from torch_agd.models import build_model
from torch_agd.train import checkpoint as ckpt
from torch_agd.train import config as train_config
from torch_agd.train import run as run_module
from torch_agd.train.dist import DistEnv
from torch_agd.train.loop import LOSSES, evaluate, mse_loss, train_epoch
from torch_agd.train.optimizers import PEER_CLASSES, PEERS, PIP_HINT, build_optimizer, build_peer
from torch_agd.train.schedule import build_scheduler, multiplier

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "eta_mean", "eta_min",
               "eta_max", "skipped_steps", "epoch_seconds", "train_samples_per_second"}
TIMING = set(train_config.TIMING_KEYS)
CPU = torch.device("cpu")


# ------------------------------------------------------------------ losses


def test_mse_is_the_papers_square_loss():
    logits, y = torch.randn(6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    target = torch.zeros(6, 5)
    target[torch.arange(6), y] = math.sqrt(5)
    expected = sum(((logits[i, c] - target[i, c]) ** 2).item() for i in range(6) for c in range(5)) / 30
    assert mse_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    assert LOSSES["xent"](logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item())


# ------------------------------------------------------------------ optimizers


def _fcn(seed=0):
    torch.manual_seed(seed)
    return build_model("fcn", DATASETS["mnist"], depth=3, width=32)


def test_agd_initialises_the_weights_orthogonally_and_scaled():
    model = _fcn()
    opt = build_optimizer("agd", model, gain=2.0)
    assert isinstance(opt, AGD) and opt.param_groups[0]["gain"] == 2.0
    for w in model.parameters():
        d_out, d_in = w.shape
        sv = torch.linalg.svdvals(w.detach().double())
        torch.testing.assert_close(sv, torch.full_like(sv, math.sqrt(d_out / d_in)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name, cls, lr", [("adam", torch.optim.Adam, 1e-3), ("sgd", torch.optim.SGD, 0.1)])
def test_baselines_keep_pytorchs_default_init_and_lr(name, cls, lr):
    reference = [p.detach().clone() for p in _fcn(seed=1).parameters()]
    model = _fcn(seed=1)
    opt = build_optimizer(name, model)
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == lr
    assert all(torch.equal(a, b) for a, b in zip(reference, model.parameters(), strict=True))
    assert build_optimizer(name, _fcn(), lr=0.5).param_groups[0]["lr"] == 0.5


def test_optimizer_usage_errors():
    with pytest.raises(UsageError, match="--lr does not apply"):
        build_optimizer("agd", _fcn(), lr=0.1)
    with pytest.raises(UsageError, match="choose one of"):
        build_optimizer("lion", _fcn())
    with pytest.raises(UsageError, match="unknown peer optimizer 'adamw'"):
        build_peer("adamw", _fcn().parameters())


@pytest.mark.parametrize("name", ["adam", "sgd", *PEERS])
@pytest.mark.parametrize("lr", [0.0, -1.0, math.inf, math.nan])
def test_every_optimizer_refuses_an_lr_that_is_not_positive_and_finite(name, lr):
    with pytest.raises(UsageError) as err:
        build_optimizer(name, _fcn(), lr=lr)
    assert str(err.value).startswith(f"--lr must be positive and finite, got {lr}")


def _peer_class(name):
    module, cls_name, _ = PEER_CLASSES[name]
    try:
        return getattr(importlib.import_module(module), cls_name)
    except ImportError:
        pytest.skip(f'{module} is not installed ({PIP_HINT})')


@pytest.mark.parametrize("name", sorted(PEERS))
def test_each_peer_is_built_at_its_published_defaults_and_trains(name, one_thread):
    cls, default_lr = _peer_class(name), PEER_CLASSES[name][2]
    # "published defaults": our default lr is the package's own constructor default
    assert inspect.signature(cls).parameters["lr"].default == default_lr
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    opt = build_optimizer(name, model)  # what --optimizer NAME builds
    assert type(opt) is cls and opt.param_groups[0]["lr"] == default_lr

    def loss():
        return torch.nn.functional.mse_loss(model(x), y)

    if hasattr(opt, "eval"):
        opt.eval()  # Schedule-Free: evaluate at the averaged weights
    with torch.no_grad():
        before = loss().item()
    for _ in range(100):
        if hasattr(opt, "train"):
            opt.train()
        opt.zero_grad()
        loss().backward()
        opt.step()
    if hasattr(opt, "eval"):
        opt.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.5 * before, (name, before, after)


@pytest.mark.parametrize("name", sorted(PEERS))
def test_a_missing_peer_package_is_a_one_line_error_naming_the_extra(name, monkeypatch):
    module = PEER_CLASSES[name][0]
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    with pytest.raises(UsageError) as err:
        build_optimizer(name, _fcn())
    assert str(err.value) == f"optimizer '{name}' needs the {module} package ({module} is missing): {PIP_HINT}"


# ------------------------------------------------------------------ the lr schedule


@pytest.mark.parametrize("schedule, mid, end", [("none", 1.0, 1.0), ("linear", 0.5, 1 / 8),
                                                ("cosine", 0.5, (1 + math.cos(7 * math.pi / 8)) / 2)])
def test_the_schedules_multiplier_warms_up_then_decays_to_zero_at_the_budget(schedule, mid, end):
    f = multiplier(schedule, total=10, warmup=2)
    assert (f(0), f(1)) == (0.5, 1.0)  # linear warmup: (t + 1) / W, no step at 0
    assert f(2) == 1.0 and f(6) == pytest.approx(mid) and f(9) == pytest.approx(end)  # p = (t - 2) / 8
    assert f(10) == pytest.approx(0.0 if schedule != "none" else 1.0, abs=1e-12)  # after the last step
    assert multiplier(schedule, total=4)(0) == 1.0  # no warmup: the first step at the full lr
    with pytest.raises(UsageError, match="^--warmup 10 leaves none of the run's 10 steps"):
        multiplier(schedule, total=10, warmup=10)


@pytest.mark.parametrize("name", ["agd", "agd+adamw", "adamw", "muon"])
def test_the_schedule_scales_every_optimizers_step(name):
    # AGD's lr is a multiplier on its own step (1 by default): the schedule scales it as any lr.
    def moved(factor):
        model = _fcn()
        opt = build_optimizer(name, model, example=torch.zeros(1, 1, 28, 28))
        build_scheduler(opt, "linear", total=2)  # multiplier 1 at step 0
        for group in opt.param_groups:
            group["lr"] *= factor
        start = [p.detach().clone() for p in model.parameters()]
        x, y = _batches(1)[0]
        mse_loss(model(x), y).backward()
        opt.step()
        return [p.detach() - s for p, s in zip(model.parameters(), start)]

    for whole, half in zip(moved(1.0), moved(0.5), strict=True):
        torch.testing.assert_close(half, 0.5 * whole, rtol=1e-4, atol=1e-7)
        assert whole.abs().sum() > 0


def test_the_schedule_and_muons_flags_in_the_config():
    config = _config("--optimizer", "muon", "--schedule", "cosine", "--warmup", "5")
    assert (config.schedule, config.warmup, config.lr, config.aux_lr, config.muon_adjust_lr) == \
        ("cosine", 5, 0.02, 1e-3, "original")
    assert config.muon_ns_dtype == "bfloat16"  # recorded: config.json says which iteration ran
    config = _config("--optimizer", "muon", "--muon-adjust-lr", "match_rms_adamw", "--aux-lr", "3e-3",
                     "--muon-ns-dtype", "float32")
    assert (config.lr, config.aux_lr, config.muon_adjust_lr, config.muon_ns_dtype) == \
        (1e-3, 3e-3, "match_rms_adamw", "float32")
    plain = _config("--optimizer", "adamw")
    assert (plain.schedule, plain.warmup, plain.aux_lr, plain.muon_adjust_lr, plain.muon_ns_dtype) == \
        ("none", 0, None, None, None)
    for flags, message in [(("--optimizer", "adam", "--muon-adjust-lr", "original"),
                            "--muon-adjust-lr only applies to --optimizer muon"),
                           (("--aux-lr", "0.1"), "--aux-lr only applies to --optimizer muon"),
                           (("--muon-ns-dtype", "float32"), "--muon-ns-dtype only applies to --optimizer muon"),
                           (("--warmup", "-1"), "--warmup must be 0 or more steps, got -1")]:
        with pytest.raises(UsageError) as err:
            _config(*flags)
        assert str(err.value) == message


@pytest.mark.slow
def test_a_scheduled_run_ends_at_lr_zero_and_records_its_schedule(fake_fashion, tmp_path, capsys):
    out = tmp_path / "run"  # 192 samples at batch 32: 6 steps an epoch, 12 in all
    assert main(_argv(fake_fashion, out, 2, "--optimizer", "muon", "--schedule", "linear", "--warmup", "2")) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["schedule"], config["warmup"], config["muon_adjust_lr"], config["aux_lr"]) == ("linear", 2, "original", 1e-3)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 12
    assert [g["lr"] for part in state["optimizer"].values() for g in part["param_groups"]] == [0.0, 0.0]
    assert main(_argv(fake_fashion, tmp_path / "long", 1, "--warmup", "6")) == 2  # 6 steps: nothing to decay
    assert capsys.readouterr().err.endswith("--warmup 6 leaves none of the run's 6 steps to decay over; "
                                            "warm up for fewer steps\n")


# ------------------------------------------------------------------ one epoch


def _batches(n=5, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 1, 28, 28, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def test_train_epoch_accumulates_what_a_step_by_step_loop_sees():
    batches = _batches()
    model = _fcn()
    opt = build_optimizer("agd", model)  # draws the init from the generator _fcn just seeded
    ref = _fcn()
    ref_opt = build_optimizer("agd", ref)
    stats = train_epoch(model, opt, batches, loss_fn=mse_loss, device=CPU)
    losses, correct, etas = [], 0, []
    for x, y in batches:  # the same epoch, read on the host after every step
        ref_opt.zero_grad()
        out = ref(x)
        loss = mse_loss(out, y)
        loss.backward()
        ref_opt.step()
        losses.append(loss.item())
        correct += (out.argmax(1) == y).sum().item()
        etas.append(ref_opt.eta.item())
    assert stats["count"] == 80 and stats["steps"] == 5 and stats["correct"].item() == correct
    assert stats["loss_sum"].item() == pytest.approx(16 * sum(losses), rel=1e-6)
    assert stats["eta_sum"].item() == pytest.approx(sum(etas), rel=1e-6)
    assert (stats["eta_min"].item(), stats["eta_max"].item()) == (min(etas), max(etas))
    assert len(set(etas)) > 1  # the min/max check means something
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))


def test_train_epoch_without_eta_and_evaluate_totals():
    model = _fcn()
    stats = train_epoch(model, build_optimizer("sgd", model), _batches(), loss_fn=mse_loss, device=CPU)
    assert "eta_sum" not in stats
    batches = _batches(n=3, bs=7, seed=1)
    totals = evaluate(model, batches, loss_fn=mse_loss, device=CPU)
    with torch.no_grad():
        loss = sum(mse_loss(model(x), y).item() * len(y) for x, y in batches)
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches)
    assert totals.tolist() == pytest.approx([loss, correct, 21])
    assert not model.training


# ------------------------------------------------------------------ files and processes


def test_dist_env_single_process_and_launcher_errors(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = DistEnv.create(cpu=True)
    assert (env.rank, env.world_size, env.is_master, env.device) == (0, 1, True, CPU)
    t = torch.ones(2)
    assert env.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]
    with pytest.raises(UsageError, match="torchrun --nproc_per_node"):
        DistEnv.create(cpu=True, distribute=True)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    assert DistEnv.create(cpu=True, distribute=True).world_size == 1  # launched by mpirun -n 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        DistEnv.create(cpu=True)


# ------------------------------------------------------------------ whole runs, in process


@pytest.fixture
def fake_fashion(monkeypatch, tmp_path):
    install_fake_idx(monkeypatch, tmp_path / "data", "fashion-mnist", n_train=192, n_test=40)
    return tmp_path / "data"


def _argv(data_dir, out, epochs=3, *extra):
    return ["train", "--arch", "fcn", "--dataset", "fashion-mnist", "--depth", "3", "--width", "16",
            "--train-bs", "32", "--test_bs", "16", "--epochs", str(epochs), "--cpu",
            "--data-dir", str(data_dir), "--out", str(out), *extra]


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _same_state(a: dict, b: dict):
    assert a["epoch"] == b["epoch"]
    assert bitwise_equal(a["model"], b["model"])
    assert bitwise_equal(a["optimizer"], b["optimizer"])  # AGD: eta and step counters too


def test_a_batch_larger_than_the_training_set_is_refused_before_the_run_starts(fake_fashion, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(fake_fashion, out, 1, "--train-bs", "256")) == 2
    err = capsys.readouterr().err
    assert err == "agd: error: --train_bs 256 is larger than the 192 training samples; use a smaller batch size\n"
    assert not out.exists()


@pytest.mark.slow
def test_run_directory_contents(fake_fashion, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(fake_fashion, out, 2)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]
    config = json.loads((out / "config.json").read_text())
    assert set(train_config.FLAGS) <= set(config) and {"version", "git_commit"} <= set(config)
    assert (config["train_bs"], config["test_bs"], config["width"], config["lr"]) == (32, 16, 16, None)
    rows = metrics_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(set(r) == METRIC_KEYS for r in rows)
    for r in rows:
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["train_loss"] > 0
        assert 0 < r["eta_min"] <= r["eta_mean"] <= r["eta_max"] and r["skipped_steps"] == 0
        assert r["train_samples_per_second"] > 0 and r["epoch_seconds"] > 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["metrics"] == rows
    model = build_model("fcn", DATASETS["fashion-mnist"], depth=3, width=16)
    model.load_state_dict(state["model"])  # 'model' is the bare network's state_dict
    # The reported test figures are those of the saved weights on every test sample.
    from torch_agd.data import load_data

    test = load_data("fashion-mnist", fake_fashion, "cpu", download=False).test
    x, y = map(torch.cat, zip(*test.batches(1000)))
    with torch.no_grad():
        logits = model.eval()(x)
    assert len(y) == 40 and rows[-1]["test_acc"] == (logits.argmax(1) == y).sum().item() / 40
    assert rows[-1]["test_loss"] == pytest.approx(mse_loss(logits, y).item(), rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] == rows[-1]["test_acc"] and summary["epochs"] == 2
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "done: 2 epochs" in printed and str(out) in printed


@pytest.mark.slow
def test_default_run_directory_is_named_after_the_run(fake_fashion, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in _argv(fake_fashion, "unused", 1) if a not in ("--out", "unused")]
    assert main(argv) == 0 and main(argv) == 0  # two runs, maybe in the same second: two directories
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("fcn-fashion-mnist-20") for r in runs)
    assert all((r / "summary.json").exists() for r in runs)


@pytest.mark.slow
def test_baseline_run_has_no_eta(fake_fashion, tmp_path):
    out = tmp_path / "adam"
    assert main(_argv(fake_fashion, out, 1, "--optimizer", "adam", "--lr", "0.01")) == 0
    (row,) = metrics_rows(out)
    assert row["eta_mean"] is None and row["skipped_steps"] is None
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01


@pytest.mark.slow
def test_the_agd_inside_agd_adamw_reports_its_eta_and_depth(fake_fashion, tmp_path):
    out = tmp_path / "fallback"
    assert main(_argv(fake_fashion, out, 1, "--optimizer", "agd+adamw")) == 0
    (row,) = metrics_rows(out)
    assert row["eta_mean"] > 0 and row["skipped_steps"] == 0
    assert json.loads((out / "config.json").read_text())["agd_L"] == 3  # the FCN's three weight matrices


def test_agd_adamw_takes_the_depth_it_is_given():
    from torch_agd.train.optimizers import build_optimizer

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), Block(), Block(), Block(), nn.Linear(4, 2))
    depth = {how: build_optimizer("agd+adamw", model, agd_depth=how, init=False).agd.depth
             for how in ("weights", "auto", "5")}
    # 8 matrices; auto: the first and last layers and one per residual block (the norm is AdamW's)
    assert depth == {"weights": 8, "auto": 5, "5": 5}
    assert build_optimizer("agd+adamw", model, init=False).agd.depth == 8  # the library's default


@pytest.mark.slow
def test_an_agd_adamw_run_saved_before_it_honoured_agd_depth_resumes_with_its_old_L(fake_fashion, tmp_path):
    """Before config_format 2, agd+adamw counted one layer per matrix whatever --agd-depth said,
    and config.json recorded the ignored value: such a run resumes with the L it ran with."""
    out = tmp_path / "old"
    assert main(_argv(fake_fashion, out, 1, "--optimizer", "agd+adamw", "--agd-depth", "weights")) == 0
    whole = torch.load(out / "checkpoint.pt", weights_only=True)
    assert whole["optimizer"]["agd"]["param_groups"][0]["depth"] == 3
    config = json.loads((out / "config.json").read_text())
    assert config["config_format"] == 2
    del config["config_format"]
    config["agd_depth"] = "2"  # given, recorded and ignored by the agd+adamw of format 1
    (out / "config.json").write_text(json.dumps(config))
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):  # resumed from its start
        (out / name).unlink()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    _same_state(torch.load(out / "checkpoint.pt", weights_only=True), whole)
    # the same config.json of format 2 means what it says
    (out / "config.json").write_text(json.dumps({**config, "config_format": 2}))
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):
        (out / name).unlink()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["agd"]["param_groups"][0]["depth"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["agd", "agd --momentum 0.9", "schedulefree", "muon",
                                       "muon --schedule cosine --warmup 3", "agd --schedule linear --warmup 2"])
def test_ctrl_c_keeps_the_last_checkpoint_and_resume_matches_an_uninterrupted_run(fake_fashion, tmp_path,
                                                                                  monkeypatch, capsys, optimizer):
    # AGD with momentum: the buffers must come back from the checkpoint exactly
    optimizer, *more = optimizer.split()
    if optimizer == "schedulefree":  # keeps train and eval weights: the switch must survive a resume
        pytest.importorskip("schedulefree", reason='needs pip install "torch-agd[peers]"')
    assert main(_argv(fake_fashion, tmp_path / "whole", 3, "--optimizer", optimizer, *more)) == 0

    calls = []
    real_evaluate = run_module.evaluate

    def evaluate_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during epoch 2's evaluation
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", evaluate_then_ctrl_c)
    cut = tmp_path / "cut"
    assert main(_argv(fake_fashion, cut, 3, "--optimizer", optimizer, *more)) == 130
    assert "--resume" in capsys.readouterr().err
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (cut / "summary.json").exists() and len(metrics_rows(cut)) == 1
    monkeypatch.setattr(run_module, "evaluate", real_evaluate)
    (cut / "metrics.jsonl").write_text("")  # as if killed between checkpoint.pt and metrics.jsonl

    assert main(["train", "--out", str(cut), "--resume"]) == 0  # everything else from config.json
    assert "resuming at epoch 2" in capsys.readouterr().out
    assert _without_timing(metrics_rows(cut)) == _without_timing(metrics_rows(tmp_path / "whole"))
    _same_state(torch.load(cut / "checkpoint.pt", weights_only=True),
                torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True))
    assert (cut / "summary.json").exists()
    # Killed after the last checkpoint, before metrics.jsonl and summary.json: nothing is lost.
    (cut / "summary.json").unlink()
    (cut / "metrics.jsonl").write_text("".join(line + "\n" for line in (cut / "metrics.jsonl").read_text().splitlines()[:2]))
    capsys.readouterr()
    assert main(["train", "--out", str(cut), "--resume"]) == 0  # finished: nothing left to train
    assert "already finished 3 epochs" in capsys.readouterr().out
    assert _without_timing(metrics_rows(cut)) == _without_timing(metrics_rows(tmp_path / "whole"))
    assert json.loads((cut / "summary.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_optimizer_train_eval_switch_brackets_training_and_evaluation(fake_fashion, tmp_path, monkeypatch):
    log = []

    class Switching(torch.optim.SGD):  # an optimizer with Schedule-Free's train()/eval() interface
        def train(self):
            log.append("train")

        def eval(self):
            log.append("eval")

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            log.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(run_module, "build_optimizer", lambda name, model, **kw: Switching(model.parameters(), lr=0.1))
    monkeypatch.setattr(run_module, "train_epoch", spy("train_epoch", run_module.train_epoch))
    monkeypatch.setattr(run_module, "evaluate", spy("evaluate", run_module.evaluate))
    monkeypatch.setattr(ckpt, "save_checkpoint", spy("save", ckpt.save_checkpoint))
    assert main(_argv(fake_fashion, tmp_path / "run", 2)) == 0
    assert log == ["train", "train_epoch", "eval", "evaluate", "save"] * 2


@pytest.mark.slow
def test_amp_keeps_float32_weights_and_compile_trains_the_same_network(fake_fashion, tmp_path):
    assert main(_argv(fake_fashion, tmp_path / "eager", 1)) == 0
    assert main(_argv(fake_fashion, tmp_path / "amp", 1, "--amp")) == 0
    state = torch.load(tmp_path / "amp" / "checkpoint.pt", weights_only=True)
    assert all(w.dtype == torch.float32 for w in state["model"].values())
    eager, amp = metrics_rows(tmp_path / "eager")[0], metrics_rows(tmp_path / "amp")[0]
    assert amp["train_loss"] != eager["train_loss"]  # bf16 activations really were used
    assert amp["train_loss"] == pytest.approx(eager["train_loss"], rel=0.05)

    assert main(_argv(fake_fashion, tmp_path / "compiled", 1, "--compile")) == 0
    compiled = metrics_rows(tmp_path / "compiled")[0]
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["eta_mean"] == pytest.approx(eager["eta_mean"], rel=1e-4)


@pytest.mark.slow
def test_progress_bars_on_a_terminal(fake_fashion, tmp_path, monkeypatch):
    pytest.importorskip("tqdm")
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(run_module.sys, "stderr", terminal)
    assert main(_argv(fake_fashion, tmp_path / "run", 2)) == 0
    shown = terminal.getvalue()
    assert "epochs: 100%" in shown and "2/2" in shown and "epoch 2" in shown and "batch" in shown


@pytest.mark.slow
def test_resume_before_the_first_checkpoint_starts_the_run(fake_fashion, tmp_path):
    # A kill during epoch 1 leaves config.json and nothing else; the run resumes as config.json
    # says (here heavy-ball momentum, which only config.json records then).
    out = tmp_path / "early"
    assert main(_argv(fake_fashion, out, 1, "--momentum", "0.9", "--momentum-form", "heavy-ball")) == 0
    whole = torch.load(out / "checkpoint.pt", weights_only=True)
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):
        (out / name).unlink()
    assert main(["train", "--out", str(out), "--resume", "--data-dir", str(fake_fashion)]) == 0
    _same_state(torch.load(out / "checkpoint.pt", weights_only=True), whole)


@pytest.mark.slow
def test_resume_with_differing_flags_names_them(fake_fashion, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(fake_fashion, out, 1)) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--width", "32", "--train_bs", "64", "--depth", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agd: error:") and "\n" not in err
    assert "--width 32 (the run has 16)" in err and "--train_bs 64 (the run has 32)" in err
    assert "--depth" not in err  # given again with the same value: fine
    # Starting a new run over an existing one is refused too.
    assert main(_argv(fake_fashion, out, 1)) == 2
    assert "--resume" in capsys.readouterr().err


def _config(*argv):
    parser = argparse.ArgumentParser()
    train_config.add_arguments(parser)
    return train_config.resolve_config(parser.parse_args(list(argv)))[0]


def test_the_config_is_one_frozen_record_that_config_json_holds_by_flag():
    config = _config("--momentum", "0.9", "--momentum-form", "heavy-ball", "--agd-depth", "7", "--depth", "4")
    assert (config.nesterov, config.agd_depth, config.depth, config.momentum) == (False, "7", 4, 0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.1
    saved = config.flag_values()  # config.json: the flags' names and values
    assert list(saved) == list(train_config.FLAGS) and saved["momentum_form"] == "heavy-ball"
    assert train_config.TrainConfig.from_flags(saved) == config
    # The default lr, resolved once: a baseline's is recorded, a peer keeps its package's own.
    assert (_config("--optimizer", "adamw").lr, _config("--optimizer", "sgd").lr) == (1e-3, 0.1)
    assert _config("--optimizer", "prodigy").lr is None and _config().lr is None


@pytest.mark.slow
def test_resume_reads_a_config_json_written_before_a_flag_existed(fake_fashion, tmp_path, capsys):
    out = tmp_path / "old"
    assert main(_argv(fake_fashion, out, 1)) == 0
    whole = torch.load(out / "checkpoint.pt", weights_only=True)
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):
        (out / name).unlink()
    config = json.loads((out / "config.json").read_text())
    for key in ("loss", "agd_depth", "momentum_form", "agd_L", "aux_lr", "muon_adjust_lr", "schedule",
                "warmup"):  # flags and records added since 0.1
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    assert main(["train", "--out", str(out), "--resume"]) == 0
    _same_state(torch.load(out / "checkpoint.pt", weights_only=True), whole)
    config["momentum_form"] = "polyak"  # a hand-edited value no run has: one line
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err == "agd: error: --momentum-form must be nesterov or heavy-ball, got 'polyak'\n"


@pytest.mark.slow
def test_under_fsdp_the_optimizer_is_built_once_on_the_shards(fake_fashion, tmp_path, monkeypatch):
    from torch.distributed.tensor import DTensor

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    built, real = [], run_module.build_optimizer

    def spy(name, model, **kwargs):
        built.append(all(isinstance(p, DTensor) for p in model.parameters()))
        return real(name, model, **kwargs)

    monkeypatch.setattr(run_module, "build_optimizer", spy)
    assert main(_argv(fake_fashion, tmp_path / "run", 1, "--fsdp")) == 0  # a 1-rank FSDP job
    assert built == [True]


@pytest.mark.slow
def test_an_fsdp_run_keeps_its_schedule_across_a_resume(fake_fashion, tmp_path, monkeypatch):
    # Under --fsdp the scheduler's state goes to train_state.pt beside the shards.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    flags = ("--fsdp", "--optimizer", "adamw", "--schedule", "cosine", "--warmup", "2")
    assert main(_argv(fake_fashion, tmp_path / "whole", 2, *flags)) == 0
    calls, real_evaluate = [], run_module.evaluate

    def evaluate_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", evaluate_then_ctrl_c)
    assert main(_argv(fake_fashion, tmp_path / "cut", 2, *flags)) == 130
    monkeypatch.setattr(run_module, "evaluate", real_evaluate)
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert _without_timing(metrics_rows(tmp_path / "cut")) == _without_timing(metrics_rows(tmp_path / "whole"))


# ------------------------------------------------------------------ real processes, real data


def _agd(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AGD_DATA": kwargs.pop("data_dir")}
    return subprocess.Popen([sys.executable, "-m", "torch_agd", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
@needs_fashion
def test_sigkill_then_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    flags = ["--arch", "fcn", "--dataset", "fashion-mnist", "--depth", "3", "--width", "64",
             "--train_bs", "200", "--test_bs", "1000", "--epochs", "3", "--cpu"]
    data_dir = str(tmp_path / "data")  # empty: the Debian copy is found without downloading
    whole = _agd(*flags, "--out", str(tmp_path / "whole"), data_dir=data_dir)
    killed = tmp_path / "killed"
    proc = _agd(*flags, "--out", str(killed), data_dir=data_dir)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert state["epoch"] < 3 and not (killed / "summary.json").exists()

    resumed = _agd("--out", str(killed), "--resume", data_dir=data_dir)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resuming at epoch {state['epoch'] + 1}" in out
    _, err = whole.communicate(timeout=120)
    assert whole.returncode == 0, err
    _same_state(torch.load(killed / "checkpoint.pt", weights_only=True),
                torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True))
    assert _without_timing(metrics_rows(killed)) == _without_timing(metrics_rows(tmp_path / "whole"))
    assert json.loads((killed / "summary.json").read_text())["test_acc"] == metrics_rows(killed)[-1]["test_acc"]
    assert metrics_rows(killed)[-1]["test_acc"] > 0.7  # real data: a small FCN learns in 3 epochs


def test_agd_direction_reaches_the_optimizer_and_old_runs_read_as_frobenius(tmp_path):
    import argparse

    from torch_agd.train.config import add_arguments, resolve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--arch", "fcn", "--dataset", "fashion-mnist", "--depth", "3", "--width", "8"]
    config, _ = resolve_config(parser.parse_args([*flags, "--agd-direction", "orthogonal"]))
    assert config.agd_direction == "orthogonal" and config.flag_values()["agd_direction"] == "orthogonal"
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = build_optimizer("agd", model, direction=config.agd_direction)
    assert [g["direction"] for g in opt.param_groups] == ["orthogonal"] * len(opt.param_groups) != []
    assert resolve_config(parser.parse_args(flags))[0].agd_direction == "frobenius"
    # a run directory written before the flag existed resumes with the paper's direction
    out = tmp_path / "old"
    out.mkdir()
    saved = resolve_config(parser.parse_args([*flags, "--out", str(out)]))[0].flag_values()
    del saved["agd_direction"]
    (out / "config.json").write_text(json.dumps(saved))
    resumed, resuming = resolve_config(parser.parse_args(["--out", str(out), "--resume"]))
    assert resuming and resumed.agd_direction == "frobenius"
