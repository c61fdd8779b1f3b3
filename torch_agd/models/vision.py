"""Vision models that nobody on this project wrote: torchvision's, built as torchvision builds them.

AGD(model) trains them with no change to the model. Only the input is adapted: a grayscale image
is shown to their three-channel stems as three equal channels (`ToRGB`, no parameters).
"""

from __future__ import annotations

from torch import Tensor, nn


class ToRGB(nn.Module):
    """(B, 1, H, W) -> (B, 3, H, W) by repeating the channel; three-channel inputs pass through."""

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _rgb(model: nn.Module, channels: int) -> nn.Module:
    return model if channels == 3 else nn.Sequential(ToRGB(), model)


def tv_resnet18(info) -> nn.Module:
    """torchvision.models.resnet18(num_classes=...): biases in fc, affine BatchNorm, 7x7 stem."""
    import torchvision

    return _rgb(torchvision.models.resnet18(num_classes=info.num_classes), info.in_shape[0])


def tv_vit(info) -> nn.Module:
    """torchvision's VisionTransformer in a configuration that trains on a CPU: 4x4 patches
    (49 for 28x28 images), 4 encoder blocks of width 64 with 4 heads, MLP width 128. It holds a
    class token, positional embeddings, packed attention, LayerNorms and biases."""
    import torchvision

    size = info.in_shape[1]
    model = torchvision.models.VisionTransformer(image_size=size, patch_size=4, num_layers=4, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=info.num_classes)
    return _rgb(model, info.in_shape[0])
