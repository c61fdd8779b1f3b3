"""Models from the libraries people train with, by name: ``timm:NAME`` (any timm model) and
``hf:NAME`` (a Hugging Face transformers causal LM built from its config class), always with
random initialisation: nothing is downloaded. timm and transformers are optional
(``pip install "torch-agd[models]"``), imported only when such a model is built.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from torch_agd.errors import UsageError

HINT = 'pip install "torch-agd[models]"'
# --width and --depth of an hf: model when not given: a model that trains on a CPU, of the size
# of this project's own byte-level LM (charlm: width 128, 4 layers).
HF_WIDTH, HF_DEPTH = 128, 4
HEAD_DIM = 32  # attention heads of an hf: model: its width / 32


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"--arch {module}:NAME needs the {module} package ({exc.name or module} is missing): "
                         f"{HINT}") from None


def timm_model(name: str, info) -> nn.Module:
    """timm's ``name`` with random weights, its stem and head set from the dataset: in_chans and
    num_classes always, img_size where the model takes one (vision transformers fix it)."""
    timm = _load("timm")
    if name not in timm.list_models():
        raise UsageError(f"timm has no model {name!r} (timm.list_models() lists them; e.g. --arch timm:resnet18)")
    channels, size = info.in_shape[0], info.in_shape[1]
    kwargs = dict(pretrained=False, num_classes=info.num_classes, in_chans=channels)
    try:
        model = timm.create_model(name, img_size=size, **kwargs)
    except TypeError:  # a convolutional network: it takes no img_size
        model = timm.create_model(name, **kwargs)
    try:  # one image through it now, rather than a traceback at the first step
        with torch.no_grad():
            model.eval()(torch.zeros(1, *info.in_shape))
    except (RuntimeError, AssertionError, ValueError) as exc:  # what timm's layers raise for a bad size
        raise UsageError(f"timm's {name} does not take {info.name}'s {'x'.join(map(str, info.in_shape))} images "
                         f"({str(exc).splitlines()[0]}); pick a model that downsamples less") from None
    return model.train()


class CausalLM(nn.Module):
    """A transformers causal LM as the trainer's text models are: (B, T) ids -> (B, T, V) logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(input_ids=idx, use_cache=False).logits


def hf_causal_lm(name: str, info, *, width: int, depth: int) -> nn.Module:
    """transformers' causal LM of model type ``name`` (llama, mistral, qwen2, gemma, gpt2,
    mixtral, ...), built from its config class with ``width`` hidden units, ``depth`` layers,
    width / 32 heads, the dataset's vocabulary and context, and its own defaults otherwise."""
    transformers = _load("transformers")
    if width < HEAD_DIM or width % HEAD_DIM:
        raise UsageError(f"--width of an hf: model must be a multiple of {HEAD_DIM} (its head size), got {width}")
    if depth < 1:
        raise UsageError(f"--depth of an hf: model must be at least 1, got {depth}")
    heads = width // HEAD_DIM
    sizes = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=heads,
                 intermediate_size=4 * width, vocab_size=info.num_classes, max_position_embeddings=info.in_shape[0],
                 head_dim=HEAD_DIM, num_local_experts=8, num_experts=8, num_experts_per_tok=2,  # mixtures of experts
                 moe_intermediate_size=width, pad_token_id=None, bos_token_id=None, eos_token_id=None)  # ids of a larger vocabulary
    try:
        config = transformers.AutoConfig.for_model(name, **sizes)
    except ValueError:
        raise UsageError(f"transformers has no model type {name!r} (e.g. --arch hf:llama, hf:gpt2, hf:mixtral)") from None
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:
        raise UsageError(f"transformers' {name} is not a causal LM; --arch hf:NAME takes one (e.g. hf:llama)") from None
    return CausalLM(model)
