"""The depth L of a module: the layers in series along its residual path.

In the paper L is the number of weight tensors, and G and every update are divided by it. In a
residual network most weights sit side by side on branches that add into one path, so
AGD(model) counts each residual branch as one layer in series instead, however many weights it
holds; a network without residual blocks keeps the paper's count.
"""
from __future__ import annotations

from torch import nn

from .rules import class_names

# Residual blocks by class name, with the number of residual branches each adds to its input:
# one per ResNet block; two per transformer layer (attention, then the MLP), three per decoder
# layer (self-attention, cross-attention, MLP).
RESIDUAL_BLOCKS = {
    "BasicBlock": 1, "Bottleneck": 1,                            # torchvision ResNets
    "PreActBlock": 1, "PreActBottleneck": 1,                     # this project's CIFAR ResNets
    "EncoderBlock": 2,                                           # torchvision ViT
    "TransformerEncoderLayer": 2, "TransformerDecoderLayer": 3,  # torch.nn
    "GPT2Block": 2, "BertLayer": 2, "LlamaDecoderLayer": 2, "ViTLayer": 2,  # Hugging Face
}


def _residual_branches(module: nn.Module) -> int | None:
    return next((RESIDUAL_BLOCKS[n] for n in class_names(module) if n in RESIDUAL_BLOCKS), None)


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or any(n.endswith("Attention") for n in class_names(module))


def _branches(block: nn.Module) -> int:
    """Residual branches of a block found by repetition: two if it holds an attention (an
    attention branch and an MLP branch, as transformer blocks have), else one."""
    return 2 if any(_is_attention(m) for m in block.modules()) else 1


def _layer_tensors(module: nn.Module, layer_ids: set[int]) -> int:
    return sum(1 for p in module.parameters() if id(p) in layer_ids)


def infer_depth(module: nn.Module, layer_ids: set[int]) -> int:
    """L for ``module``: the layers in series along its residual path.

    Each residual branch is one layer in series, however many weights it holds: a block whose
    class is in RESIDUAL_BLOCKS counts its branches; so does one of two or more modules of the
    same class side by side in an nn.Sequential / nn.ModuleList that each hold two or more
    layer tensors (repeated blocks: two branches if they hold an attention, else one). Every
    layer tensor (``layer_ids``: tensors whose rule is a layer, rules.Rule.layer) outside such
    blocks counts once, as in the paper, so a network without residual blocks keeps the paper's
    count.
    """
    depth, inside = 0, set()

    def visit(mod: nn.Module) -> None:
        nonlocal depth
        children = list(mod.children())
        counts: dict[type, int] = {}
        if isinstance(mod, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):  # torchtitan: a ModuleDict of layers
            for c in children:
                counts[type(c)] = counts.get(type(c), 0) + 1
        for child in children:
            known = _residual_branches(child)
            repeated = counts.get(type(child), 0) > 1 and _layer_tensors(child, layer_ids) > 1
            if known or repeated:
                held = {id(p) for p in child.parameters() if id(p) in layer_ids} - inside
                if held:
                    depth += known or _branches(child)
                    inside.update(held)
            else:
                visit(child)

    visit(module)
    return depth + len(set(layer_ids) - inside)
