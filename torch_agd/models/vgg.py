"""VGG-16 for 32x32 CIFAR images: 13 conv3x3 + BN + ReLU blocks, five max-pools, a linear head.

After the fifth pool a 32x32 image is 512 x 1 x 1, so the head is a single
bias-free Linear(512, classes): 14 weight tensors in all.
"""

from __future__ import annotations

from torch import nn

# Output channels of each conv, "M" for a 2x2 max-pool (the usual VGG-16 configuration "D").
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(num_classes: int, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers += [
            nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(item, affine=False),
            nn.ReLU(inplace=True),
        ]
        channels = item
    layers += [nn.Flatten(), nn.Linear(channels, num_classes, bias=False)]
    return nn.Sequential(*layers)
