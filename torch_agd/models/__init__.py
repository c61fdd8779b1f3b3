"""The paper's networks, by name: ``build_model(arch, info, depth=..., width=...)``.

Every network is bias-free and its BatchNorms have no affine parameters, so every
parameter is a >=2-D weight that AGD has a rule for. The (arch, dataset) pairs are
the ones the published code defines: the fully-connected network on any dataset,
the convolutional networks on CIFAR, and ResNet-50 in torchvision's layout on ImageNet.
"""

from __future__ import annotations

from torch import nn

from torch_agd.errors import UsageError

ARCHS = ("fcn", "vgg", "resnet18", "resnet50")

_CIFAR = ("cifar10", "cifar100")
# arch -> datasets it is defined for (None: every dataset).
_DEFINED_FOR = {"fcn": None, "vgg": _CIFAR, "resnet18": _CIFAR, "resnet50": _CIFAR + ("imagenet",)}


def build_model(arch: str, info, *, depth: int = 10, width: int = 256) -> nn.Module:
    """The network ``arch`` for a dataset described by ``info`` (a DatasetInfo).

    ``depth`` and ``width`` only shape the fully-connected network, as in the paper.
    Returns a module mapping (B, *info.in_shape) float inputs to (B, info.num_classes) logits.
    """
    if arch not in ARCHS:
        raise UsageError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    datasets = _DEFINED_FOR[arch]
    if datasets is not None and info.name not in datasets:
        raise UsageError(
            f"--arch {arch} is not defined for --dataset {info.name} (the paper uses it on "
            f"{', '.join(datasets)}); use --arch fcn for {info.name}"
        )
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
    if arch == "vgg":
        from torch_agd.models.vgg import vgg16

        return vgg16(info.num_classes)
    if info.name == "imagenet":
        from torch_agd.models.resnet import resnet50_imagenet

        return resnet50_imagenet(info.num_classes)
    from torch_agd.models.resnet import preact_resnet18, preact_resnet50

    return (preact_resnet18 if arch == "resnet18" else preact_resnet50)(info.num_classes)


__all__ = ["ARCHS", "build_model"]
