"""The networks, by name: ``build_model(arch, info, depth=..., width=...)``.

The paper's networks (fcn, vgg, resnet18, resnet50), and a small CNN in their style (cnn), are bias-free and their BatchNorms have no
affine parameters, as the paper's are; the (arch, dataset) pairs are the ones the published code
defines, plus the CIFAR ResNet-18 on the 28x28 grayscale datasets (its stem takes one channel
there), which train offline. The others are models nobody here wrote, for AGD(model) on the
models people have: torchvision's ResNet-18 and a small VisionTransformer (models/vision.py) on
images, and a character-level transformer LM (models/charlm.py) on text; and any timm model or
Hugging Face causal LM by name (models/libraries.py: --arch timm:NAME, --arch hf:NAME).
"""

from __future__ import annotations

from torch import nn

from torch_agd.errors import UsageError

ARCHS = ("fcn", "cnn", "vgg", "resnet18", "resnet50", "tv-resnet18", "tv-vit", "charlm", "charlm-tied")
PAPER_ARCHS = ("fcn", "vgg", "resnet18", "resnet50")
# Any model of these libraries by name (models/libraries.py): --arch timm:resnet18, --arch hf:llama.
LIBRARIES = ("timm", "hf")

_CIFAR = ("cifar10", "cifar100")
_IMAGES = ("mnist", "fashion-mnist") + _CIFAR
TEXT_ONLY = "text"
# arch -> image datasets it is defined for (None: every image dataset), or TEXT_ONLY: any text
# dataset (the data package lists those; a model knows text by its 1-D inputs, below).
_DEFINED_FOR = {"fcn": None, "cnn": _IMAGES, "vgg": _CIFAR, "resnet18": _IMAGES, "resnet50": _CIFAR + ("imagenet",),
                "tv-resnet18": _IMAGES + ("imagenet",), "tv-vit": _IMAGES, "charlm": TEXT_ONLY,
                "charlm-tied": TEXT_ONLY}


def _is_text(info) -> bool:
    """Text datasets feed windows of bytes, (T,); image datasets (C, H, W)."""
    return len(info.in_shape) == 1


def check_arch(arch: str) -> None:
    """A one-line error for an --arch that names no network (before any data is loaded)."""
    library, _, name = arch.partition(":")
    if not (arch in ARCHS or library in LIBRARIES and name):
        raise UsageError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}, timm:NAME or hf:NAME")


def build_model(arch: str, info, *, depth: int = 10, width: int = 256) -> nn.Module:
    """The network ``arch`` for a dataset described by ``info`` (a DatasetInfo).

    ``depth`` and ``width`` only shape the fully-connected network, as in the paper.
    Returns a module mapping (B, *info.in_shape) float inputs to (B, info.num_classes) logits.
    """
    check_arch(arch)
    library, _, name = arch.partition(":")
    if library in LIBRARIES:
        return _library_model(library, name, info, depth=depth, width=width)
    datasets = _DEFINED_FOR[arch]
    fits = _is_text(info) if datasets == TEXT_ONLY else not _is_text(info) and (datasets is None or info.name in datasets)
    if not fits:
        takes = ("a text dataset" if datasets == TEXT_ONLY else ", ".join(datasets or _IMAGES + ("imagenet",)))
        instead = "charlm" if _is_text(info) else "fcn"
        raise UsageError(f"--arch {arch} is not defined for --dataset {info.name} (it takes {takes}); "
                         f"use --arch {instead} for {info.name}")
    if arch == "fcn":
        from torch_agd.models.fcn import FCN

        if depth < 2:
            raise UsageError(f"--depth must be at least 2 (an input and an output layer), got {depth}")
        if width < 1:
            raise UsageError(f"--width must be at least 1, got {width}")
        in_features = 1
        for size in info.in_shape:
            in_features *= size
        return FCN(in_features, info.num_classes, depth=depth, width=width)
    if arch == "cnn":
        from torch_agd.models.cnn import small_cnn

        return small_cnn(info)
    if arch in ("tv-resnet18", "tv-vit"):
        from torch_agd.models import vision

        return (vision.tv_resnet18 if arch == "tv-resnet18" else vision.tv_vit)(info)
    if arch.startswith("charlm"):
        from torch_agd.models.charlm import CharLM

        return CharLM(info.num_classes, context=info.in_shape[0], tied=arch == "charlm-tied")
    if arch == "vgg":
        from torch_agd.models.vgg import vgg16

        return vgg16(info.num_classes)
    if info.name == "imagenet":
        from torch_agd.models.resnet import resnet50_imagenet

        return resnet50_imagenet(info.num_classes)
    from torch_agd.models.resnet import preact_resnet18, preact_resnet50

    return (preact_resnet18 if arch == "resnet18" else preact_resnet50)(info.num_classes, info.in_shape[0])


def _library_model(library: str, name: str, info, *, depth: int, width: int) -> nn.Module:
    from torch_agd.models import libraries

    if library == "timm":
        if _is_text(info):
            raise UsageError(f"--arch timm:{name} is an image model; use --arch hf:NAME for --dataset {info.name}")
        return libraries.timm_model(name, info)
    if not _is_text(info):
        raise UsageError(f"--arch hf:{name} is a causal LM for a text dataset; use --arch timm:NAME for {info.name}")
    return libraries.hf_causal_lm(name, info, width=width, depth=depth)


__all__ = ["ARCHS", "LIBRARIES", "PAPER_ARCHS", "build_model", "check_arch"]
