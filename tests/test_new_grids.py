"""The depth L that the trainer records in config.json (agd_L), which the results page reads."""

from __future__ import annotations

import json

import pytest

from torch_agd.cli import main

from fakedata import install_fake_idx


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
