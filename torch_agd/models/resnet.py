"""Residual networks of the paper, bias-free with affine-free BatchNorm.

- CIFAR: pre-activation ResNet-18 (basic blocks) and ResNet-50 (bottlenecks) with a
  3x3 stem, four stages of 64/128/256/512 channels, a 4x4 average pool and a linear
  head. As in the published networks, the stem feeds the first block directly and the
  last block feeds the pool directly (no extra BN-ReLU), and a 1x1 shortcut conv is used
  wherever a block changes the shape: 21 weight tensors for ResNet-18, 54 for ResNet-50.
- ImageNet: ResNet-50 in torchvision's layout and module names (v1.5: the stride sits on
  the 3x3 conv of a bottleneck), so its state_dict keys are torchvision's minus the
  BatchNorm affine parameters and the head's bias.
"""

from __future__ import annotations

from torch import Tensor, nn


def _conv(d_in: int, d_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(d_in, d_out, kernel, stride=stride, padding=kernel // 2, bias=False)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, affine=False)


# ---------------------------------------------------------------- CIFAR, pre-activation


def _shortcut(d_in: int, d_out: int, stride: int) -> nn.Conv2d | None:
    """The 1x1 conv wherever a block changes the shape; None where the input is added as it is."""
    return _conv(d_in, d_out, 1, stride) if stride != 1 or d_in != d_out else None


class _PreAct(nn.Module):
    """What both pre-activation blocks share: BN-ReLU of the input feeds conv1 and the shortcut
    conv (if any); each later (bn, conv) pair is BN-ReLU-conv. Subclasses register their layers
    in the published order (bn1, conv1, ..., shortcut), which init_weights_ draws in."""

    def later(self) -> tuple:
        """The (bn, conv) pairs after conv1, in order."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(x).relu()
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        for bn, conv in self.later():
            out = conv(bn(out).relu())
        return out + shortcut


class PreActBlock(_PreAct):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input (or a 1x1 conv of the activated input)."""

    expansion = 1

    def __init__(self, d_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = _bn(d_in)
        self.conv1 = _conv(d_in, planes, 3, stride)
        self.bn2 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.shortcut = _shortcut(d_in, planes * self.expansion, stride)

    def later(self) -> tuple:
        return ((self.bn2, self.conv2),)


class PreActBottleneck(_PreAct):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1 to 4x the planes, plus shortcut."""

    expansion = 4

    def __init__(self, d_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = _bn(d_in)
        self.conv1 = _conv(d_in, planes, 1)
        self.bn2 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn3 = _bn(planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1)
        self.shortcut = _shortcut(d_in, planes * self.expansion, stride)

    def later(self) -> tuple:
        return ((self.bn2, self.conv2), (self.bn3, self.conv3))


class PreActResNet(nn.Module):
    def __init__(self, block: type[nn.Module], blocks_per_stage: tuple[int, ...], num_classes: int,
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = _conv(in_channels, 64, 3)
        d_in = 64
        stages = []
        for i, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            layers = []
            for j in range(num_blocks):
                # The first block of every stage but the first halves the resolution.
                layers.append(block(d_in, planes, stride=2 if i > 0 and j == 0 else 1))
                d_in = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AvgPool2d(4)  # 32x32 (or 28x28) input -> 4x4 after three stride-2 stages
        self.linear = nn.Linear(d_in, num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.pool(out).flatten(1))


def preact_resnet18(num_classes: int, in_channels: int = 3) -> PreActResNet:
    return PreActResNet(PreActBlock, (2, 2, 2, 2), num_classes, in_channels)


def preact_resnet50(num_classes: int, in_channels: int = 3) -> PreActResNet:
    return PreActResNet(PreActBottleneck, (3, 4, 6, 3), num_classes, in_channels)


# ---------------------------------------------------------------- ImageNet, torchvision layout


class Bottleneck(nn.Module):
    """Post-activation bottleneck, v1.5: conv1x1-BN-ReLU, conv3x3 (strided)-BN-ReLU, conv1x1-BN, add, ReLU."""

    expansion = 4

    def __init__(self, d_in: int, planes: int, stride: int = 1):
        super().__init__()
        d_out = planes * self.expansion
        self.conv1 = _conv(d_in, planes, 1)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = _bn(planes)
        self.conv3 = _conv(planes, d_out, 1)
        self.bn3 = _bn(d_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(_conv(d_in, d_out, 1, stride), _bn(d_out)) if stride != 1 or d_in != d_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = _conv(3, 64, 7, stride=2)
        self.bn1 = _bn(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        d_in = 64
        stages = []
        for i, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            layers = []
            for j in range(num_blocks):
                layers.append(Bottleneck(d_in, planes, stride=2 if i > 0 and j == 0 else 1))
                d_in = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(d_in, num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.avgpool(out).flatten(1))


def resnet50_imagenet(num_classes: int = 1000) -> ResNet50:
    return ResNet50(num_classes)
