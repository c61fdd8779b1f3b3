"""The paper's networks: parameter shapes, outputs, and the (arch, dataset) pairs they exist for."""

import math

import pytest
import torch
from torch import nn

from torch_agd import AGD, UsageError
from torch_agd.data import DATASETS
from torch_agd.models import ARCHS, build_model

# (arch, dataset, fcn depth, width) -> (weight tensors, parameters). The counts are those of the
# usual definitions minus the biases and BatchNorm affine parameters that these networks drop:
# - FCN 8x256 on 28x28: 784*256 + 6*256*256 + 256*10.
# - VGG-16 (CIFAR): 13 convs + 1 linear; kuangliu/pytorch-cifar's VGG16 has 14,728,266 with
#   4,224 conv biases, 2*4,224 BN affine and 10 head biases: 14,728,266 - 12,682.
# - PreAct-ResNet-18 (CIFAR): 1 stem + 16 block convs + 3 shortcuts + 1 linear = 21 tensors;
#   kuangliu's 11,171,146 minus 2*3,392 BN affine minus 10 head biases.
# - PreAct-ResNet-50 (CIFAR): 1 + 48 + 4 shortcuts + 1 = 54.
# - ResNet-50 (ImageNet): torchvision's 25,557,032 minus BN affine and the head's 1,000 biases.
SIZES = {
    ("fcn", "fashion-mnist", 8, 256): (8, 596_480),
    ("fcn", "cifar10", 16, 512): (16, 3072 * 512 + 14 * 512 * 512 + 512 * 10),
    ("vgg", "cifar10", None, None): (14, 14_715_584),
    ("vgg", "cifar100", None, None): (14, 14_715_584 + 512 * 90),
    ("resnet18", "cifar10", None, None): (21, 11_164_352),
    ("resnet50", "cifar100", None, None): (54, 23_467_712 + 2048 * 90),
    ("resnet50", "imagenet", None, None): (54, 25_502_912),
}


def _build(arch, dataset, depth=None, width=None):
    kwargs = {} if depth is None else dict(depth=depth, width=width)
    return build_model(arch, DATASETS[dataset], **kwargs)


@pytest.mark.parametrize("key", SIZES, ids=lambda k: f"{k[0]}-{k[1]}")
def test_parameter_and_tensor_counts(key):
    model = _build(*key)
    params = list(model.parameters())
    assert (len(params), sum(p.numel() for p in params)) == SIZES[key]


@pytest.mark.parametrize("key", SIZES, ids=lambda k: f"{k[0]}-{k[1]}")
def test_every_parameter_is_a_weight_agd_can_step(key):
    model = _build(*key)
    assert all(p.dim() >= 2 for p in model.parameters())
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert m.bias is None
        if isinstance(m, nn.BatchNorm2d):
            assert not m.affine
    assert AGD(model, depth="weights").depth == SIZES[key][0]  # the paper's L counts them all


@pytest.mark.parametrize("arch, dataset, hw", [
    ("fcn", "mnist", None), ("fcn", "cifar100", None), ("vgg", "cifar10", None),
    ("resnet18", "cifar100", None), ("resnet50", "cifar10", None),
    ("resnet50", "imagenet", (64, 64)),  # adaptive pooling: any size works, 64x64 keeps it quick
])
def test_output_shape(arch, dataset, hw):
    info = DATASETS[dataset]
    model = build_model(arch, info, depth=3, width=16).eval()
    shape = info.in_shape if hw is None else (info.in_shape[0], *hw)
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, info.num_classes)
    assert torch.isfinite(out).all()


def test_fcn_is_linear_layers_with_relu_times_sqrt2():
    torch.manual_seed(0)
    model = build_model("fcn", DATASETS["mnist"], depth=3, width=5)
    x = torch.randn(4, 1, 28, 28)
    w1, w2, w3 = (m.weight for m in model.modules() if isinstance(m, nn.Linear))
    h = torch.relu(x.flatten(1) @ w1.T) * math.sqrt(2)
    h = torch.relu(h @ w2.T) * math.sqrt(2)
    torch.testing.assert_close(model(x), h @ w3.T)
    assert [tuple(w.shape) for w in (w1, w2, w3)] == [(5, 784), (5, 5), (10, 5)]


def test_imagenet_resnet50_has_torchvisions_layout():
    torchvision = pytest.importorskip("torchvision")
    ours = {k: v.shape for k, v in _build("resnet50", "imagenet").state_dict().items()}
    theirs = torchvision.models.resnet50().state_dict()
    # Same names and shapes, minus what AGD has no rule for: BN weight/bias and the head's bias.
    dropped = {k for k in theirs if k == "fc.bias" or (k.endswith((".weight", ".bias")) and theirs[k].dim() == 1)}
    assert ours == {k: v.shape for k, v in theirs.items() if k not in dropped}
    # v1.5: the stride of a downsampling bottleneck sits on its 3x3 conv.
    block = _build("resnet50", "imagenet").layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


def _published_order(convs_per_block: int, blocks_per_stage: tuple) -> list[str]:
    """Weight names of a CIFAR pre-activation ResNet in the published registration order: stem,
    then per block conv1.. and the 1x1 shortcut (first block of every stage but the first, and
    every block's first only), then the head."""
    names = ["conv1.weight"]
    for stage, blocks in enumerate(blocks_per_stage, 1):
        for j in range(blocks):
            names += [f"layer{stage}.{j}.conv{k}.weight" for k in range(1, convs_per_block + 1)]
            if j == 0 and (stage > 1 or convs_per_block == 3):  # a bottleneck widens stage 1 too
                names.append(f"layer{stage}.{j}.shortcut.weight")
    return names + ["linear.weight"]


@pytest.mark.parametrize("arch, convs, blocks", [("resnet18", 2, (2, 2, 2, 2)), ("resnet50", 3, (3, 4, 6, 3))])
def test_preact_weights_are_registered_in_the_published_order(arch, convs, blocks):
    # Registration order is the order init_weights_ draws each weight from the seed in, and the
    # order of parameters() and of state_dict keys: another order would give other initial weights.
    model = _build(arch, "cifar10")
    assert [name for name, _ in model.named_parameters()] == _published_order(convs, blocks)
    block = model.layer2[0]  # within a block, each BN comes before the conv it feeds
    expected = ["bn1", "conv1", "bn2", "conv2"] + (["bn3", "conv3"] if convs == 3 else []) + ["shortcut"]
    assert [name for name, _ in block.named_children()] == expected


def test_preact_blocks_add_the_input_or_a_1x1_conv_of_the_activated_input():
    model = _build("resnet18", "cifar10").eval()
    shortcuts = [n for n, m in model.named_modules() if n.endswith("shortcut") and m is not None]
    assert shortcuts == ["layer2.0.shortcut", "layer3.0.shortcut", "layer4.0.shortcut"]
    # Pre-activation: a block with an identity shortcut adds its input unchanged to the branch.
    block = model.layer1[0]
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        branch = block.conv2(block.bn2(block.conv1(block.bn1(x).relu())).relu())
        torch.testing.assert_close(block(x), branch + x)
        # ...and a block that changes the shape adds the 1x1 conv of the same activated input.
        block = model.layer2[0]
        out = block.bn1(x).relu()
        branch = block.conv2(block.bn2(block.conv1(out)).relu())
        torch.testing.assert_close(block(x), branch + block.shortcut(out))


@pytest.mark.parametrize("arch, dataset", [
    ("vgg", "mnist"), ("resnet50", "fashion-mnist"), ("resnet50", "mnist"), ("tv-vit", "stdlib"),
    ("vgg", "imagenet"), ("resnet18", "imagenet"),
])
def test_combination_the_paper_does_not_define_is_a_one_line_usage_error(arch, dataset):
    with pytest.raises(UsageError) as err:
        build_model(arch, DATASETS[dataset])
    message = str(err.value)
    assert "\n" not in message and f"--arch {arch}" in message and dataset in message


@pytest.mark.parametrize("depth, width", [(1, 256), (0, 256), (4, 0)])
def test_fcn_shape_out_of_range_is_a_usage_error(depth, width):
    with pytest.raises(UsageError, match="--depth|--width"):
        build_model("fcn", DATASETS["mnist"], depth=depth, width=width)


def test_unknown_arch_is_a_usage_error():
    with pytest.raises(UsageError, match="fcn, cnn, vgg, resnet18, resnet50, tv-resnet18, tv-vit, charlm, charlm-tied"):
        build_model("transformer", DATASETS["cifar10"])
    assert ARCHS == ("fcn", "cnn", "vgg", "resnet18", "resnet50", "tv-resnet18", "tv-vit", "charlm", "charlm-tied")
