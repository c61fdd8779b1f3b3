"""--arch timm:NAME and --arch hf:NAME: models of the libraries people train with, built by name
with random init, for every optimizer the trainer has."""
import math
import sys

import pytest
import torch

from torch_agd.data import DatasetInfo
from torch_agd.errors import UsageError
from torch_agd.models import build_model, check_arch
from torch_agd.train.optimizers import OPTIMIZERS, build_optimizer

IMAGES = DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.5,), (0.5,))
TEXT = DatasetInfo("stdlib", 256, (16,), (), ())


def test_names_are_checked_before_anything_loads():
    for arch in ("timm:resnet18", "hf:llama", "fcn"):
        check_arch(arch)
    for arch in ("timm:", "hf", "keras:resnet", "nope"):
        with pytest.raises(UsageError, match="unknown --arch"):
            check_arch(arch)


def test_a_timm_model_takes_the_datasets_channels_classes_and_size():
    pytest.importorskip("timm")
    model = build_model("timm:vit_tiny_patch16_224", IMAGES)  # a ViT: its image size is fixed at build
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    model = build_model("timm:test_resnet", IMAGES)  # a convnet: no img_size to pass
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10) and model.training


@pytest.mark.parametrize("arch, info, needle", [
    ("timm:resnet18", TEXT, "an image model; use --arch hf:NAME"),
    ("hf:llama", IMAGES, "a causal LM for a text dataset; use --arch timm:NAME for fashion-mnist"),
    ("timm:no_such_model", IMAGES, "timm has no model 'no_such_model'"),
    ("hf:no_such_type", TEXT, "transformers has no model type 'no_such_type'"),
    ("hf:t5", TEXT, "not a causal LM"),
    ("timm:convnext_atto", IMAGES, "does not take fashion-mnist's 1x28x28 images"),
    ("timm:test_vit", IMAGES, "does not take fashion-mnist's 1x28x28 images"),
])
def test_what_cannot_be_built_is_a_one_line_error(arch, info, needle):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    with pytest.raises(UsageError, match=needle) as err:
        build_model(arch, info, width=32, depth=1)
    assert "\n" not in str(err.value)


def test_a_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm imports
    with pytest.raises(UsageError, match=r'needs the timm package .* pip install "torch-agd\[models\]"'):
        build_model("timm:resnet18", IMAGES)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral"])
def test_an_hf_causal_lm_takes_width_depth_and_the_vocabulary(name):
    pytest.importorskip("transformers")
    model = build_model(f"hf:{name}", TEXT, width=96, depth=2)
    hf = model.model
    assert hf.config.vocab_size == 256 and hf.config.num_hidden_layers == 2 and hf.config.hidden_size == 96
    assert hf.config.num_attention_heads == 3
    assert model(torch.randint(0, 256, (3, 16))).shape == (3, 16, 256)


def test_an_hf_width_that_is_not_a_multiple_of_the_head_size_is_refused():
    pytest.importorskip("transformers")
    with pytest.raises(UsageError, match="multiple of 32"):
        build_model("hf:llama", TEXT, width=48, depth=1)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_an_hf_model(optimizer):
    pytest.importorskip("transformers")
    if optimizer in ("prodigy", "dadapt-adam", "dog", "schedulefree"):
        pytest.importorskip({"prodigy": "prodigyopt", "dadapt-adam": "dadaptation", "dog": "dog",
                             "schedulefree": "schedulefree"}[optimizer])
    torch.manual_seed(0)
    model = build_model("hf:llama", TEXT, width=32, depth=1)
    opt = build_optimizer(optimizer, model, agd_depth="auto", example=torch.zeros(1, 16, dtype=torch.long))
    if hasattr(opt, "train"):
        opt.train()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_the_trainer_gives_an_hf_model_its_own_size_unless_told():
    import argparse

    from torch_agd.train.config import add_arguments, resolve_config

    def config(*flags):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return resolve_config(parser.parse_args(list(flags)))[0]

    hf = ("--arch", "hf:llama", "--dataset", "stdlib")
    assert (config(*hf).width, config(*hf).depth) == (128, 4)
    assert (config(*hf, "--width", "64", "--depth", "2").width, config(*hf, "--depth", "2").depth) == (64, 2)
    fcn = config("--arch", "fcn", "--dataset", "fashion-mnist")
    assert (fcn.width, fcn.depth) == (256, 10)
