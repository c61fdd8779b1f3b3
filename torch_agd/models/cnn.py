"""A small convolutional network in the paper's style, sized to train on a CPU in minutes.

Three conv3x3 -> BatchNorm -> ReLU -> 2x2 max-pool stages (16, 32, 64 channels) and a linear
head: bias-free, BatchNorm without affine parameters, like the paper's VGG, so AGD's paper rule
covers every parameter. A 28x28 image leaves the stages as 64 x 3 x 3; a 32x32 one as 64 x 4 x 4.
"""

from __future__ import annotations

from torch import nn


def small_cnn(info) -> nn.Sequential:
    channels, size = info.in_shape[0], info.in_shape[1]
    layers: list[nn.Module] = []
    for width in (16, 32, 64):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, affine=False),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels, size = width, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size * size, info.num_classes, bias=False))
