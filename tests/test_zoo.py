"""A fast subset of the zoo (benchmarks/zoo.py): a few tiny timm and transformers models must be
accepted by AGD(model) with no override and train with a finite, falling loss; a refusal and a
crash must each be recorded as such; the page and its cache are written by the command."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from torch_agd import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_zoo():
    # benchmarks/ is not a package: load the runner from its path (it puts benchmarks/ on sys.path
    # itself, for zoo_models)
    spec = importlib.util.spec_from_file_location("zoo", BENCHMARKS / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo"] = module
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()
models = sys.modules["zoo_models"]

STEPS = 5
TIMM = ["test_resnet", "test_nfnet"]
TRANSFORMERS = ["gpt2 (tied)", "mixtral", "bert (masked LM)", "t5"]


def _entry(name):
    by_name = {e.name: e for e in models.timm_entries() + models.transformers_entries()}
    return by_name[name]


def _check_trains(name):
    row = zoo.run_entry(_entry(name), STEPS, momentum=False)
    assert row["status"] == "accepted", row.get("reason")
    assert row["finite"], row["agd"]["losses"]
    assert row["falling"], (row["agd"]["initial"], row["agd"]["final"])
    assert row["agd"]["final"] < row["agd"]["initial"]
    assert len(row["agd"]["losses"]) == STEPS and row["depth"] >= 1
    assert sum(row["kinds"].values()) == len(list(_entry(name).build()[0].parameters()))


@pytest.mark.parametrize("name", TIMM)
def test_timm_models_train_with_no_override(name):
    pytest.importorskip("timm")
    _check_trains(name)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformers_models_train_with_no_override(name):
    pytest.importorskip("transformers")
    _check_trains(name)


def _tiny_classifier_entry(model_fn, name="tiny"):
    def build():
        torch.manual_seed(0)
        return model_fn(), models.image_batch(8, channels=1), models.classify
    return models.Entry(name, "timm", build)


class WithLSTM(nn.Module):
    """A classifier holding an LSTM, which AGD refuses by name."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 8)
        self.head = nn.Linear(8 * 8, models.CLASSES)

    def forward(self, x):
        return self.head(self.rnn(x[:, 0])[0].flatten(1))


def test_a_refusal_is_its_one_line_reason_and_a_crash_its_type():
    row = zoo.run_entry(_tiny_classifier_entry(WithLSTM), STEPS, momentum=False)
    assert row["status"] == "refused" and "LSTM" in row["reason"] and "\n" not in row["reason"]
    assert "agd" not in row

    def broken():
        raise RuntimeError("no such layer\nsecond line")

    row = zoo.run_entry(models.Entry("broken", "timm", broken), STEPS, momentum=False)
    assert row["status"] == "crashed" and row["reason"] == "RuntimeError: no such layer second line"

    # a UsageError from building is no refusal by AGD: only init_weights_ / AGD(...) refuse
    def misbuilt():
        raise UsageError("not AGD's")

    assert zoo.run_entry(models.Entry("misbuilt", "timm", misbuilt), STEPS, momentum=False)["status"] == "crashed"


def test_an_override_trains_a_refused_model_and_leaves_the_registry_as_it_was():
    entry = _tiny_classifier_entry(WithLSTM)
    entry = models.Entry(entry.name, entry.library, entry.build, override=models.LSTM_OVERRIDE)
    row = zoo.run_entry(entry, STEPS, momentum=False)
    assert row["status"] == "refused" and row["override"] == models.LSTM_OVERRIDE[0]
    assert row["finite"] and row["falling"]
    # the override's register_rule is undone: the next model is refused again
    assert zoo.run_entry(entry, 1, momentum=False)["status"] == "refused"
    with pytest.raises(UsageError, match="LSTM"):
        zoo.AGD(WithLSTM())


def test_the_command_writes_the_page_and_keeps_other_rows(tmp_path):
    pytest.importorskip("timm")
    out, cache = tmp_path / "zoo.md", tmp_path / "zoo.json"
    # a row of an earlier run survives a run with --only
    cache.write_text(json.dumps({"rows": {"test_vit": {"name": "test_vit", "library": "timm", "steps": 1,
                                                        "status": "refused", "reason": "earlier"}},
                                 "real": {}}))
    zoo.main(["--only", "^test_convnext$", "--steps", "2", "--no-momentum", "--out", str(out), "--json", str(cache)])
    text = out.read_text()
    assert "| test_convnext | accepted |" in text
    assert "| test_vit | **refused**: earlier |" in text
    assert "2 models: 1 accepted with no override, 1 refused, 0 crashed" in text
    assert "torch " + torch.__version__ in text
    assert "- `python benchmarks/zoo.py --only '^test_convnext$' --steps 2 --no-momentum" in text
    assert "- AGD's loss not falling: 0" in text
    rows = json.loads(cache.read_text())["rows"]
    assert set(rows) == {"test_vit", "test_convnext"} and rows["test_convnext"]["steps"] == 2


def test_real_data_rows_train_on_the_stdlib_text_and_skip_missing_images(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    gpt2 = _entry("gpt2 (tied)")
    rows = zoo.real_rows([gpt2, _entry("resnet18")], 2, str(tmp_path / "empty"))
    text = rows["gpt2 (tied)"]
    assert text["data"] == "stdlib" and text["steps"] == 2 and "skipped" not in text
    assert all(0 < text[k] < 10 for k in ("agd", "adamw"))
    # no Fashion-MNIST in the named data dir, and the zoo never downloads: the row says why
    images = rows["resnet18"]
    assert images["data"] == "fashion-mnist" and "agd" not in images
    assert "fashion-mnist" in images["skipped"] and "\n" not in images["skipped"]
