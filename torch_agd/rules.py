"""One rule per kind of parameter: how AGD cuts it into blocks, how large each block is meant
to be, and whether it counts toward the depth L.

The paper bounds a layer's effect on its output by the operator norm of its weight, which the
initialisation sets to s(W) = sqrt(d_out / d_in) (divided by sqrt(k1*k2*...) for a conv), so that
every layer maps inputs of unit RMS to outputs of unit RMS. A step then moves every block B by
    B <- B - (eta / L) * s(B) * g(B) / ||g(B)||_F
(the Frobenius norm bounding the operator norm), and G = (1/L) * sum_B s(B) * ||g(B)||_F.
Every rule below is that rule, applied to what the parameter actually is as a map:

    kind        blocks (each normalised on its own)                 s(B)                    in L
    weight      (d_out/g x d_in/g) per conv group and kernel pos.   sqrt(d_out/d_in)/sqrt(K) yes
    weight_t    the same, stored (in, out/g, k...) (ConvTranspose,  sqrt(d_out/d_in)/sqrt(K) yes
                Hugging Face Conv1D)
    attention   q, k and v of a packed (3d, d) in_proj_weight       1                        yes
    embedding   each row: a map from one one-hot slot to R^d        sqrt(d) (unit RMS rows)  yes
    bias        joins its layer's blocks: [W | b] acts on [x; 1],   d_in counts the 1        no
                so W and b share one norm and one factor
    norm        a norm layer's [diag(gamma) | beta], one block       1 (gamma = 1 at init)    no
    raw         additive parameters (positional embeddings, class   sqrt(d) (one slot's      no
                tokens): every vector along the last dim is a slot   vector at unit RMS)

d_out, d_in count whole channels (d_in of [W | b] counts the constant input too); for a grouped
conv, d_out/d_in is the same per group as for the whole layer, so g only cuts the blocks. A conv's
bias acts like one more input channel held at 1, whose kernel is spread evenly over the K
positions: it joins each position's block and moves by the sum of their factors. A bias whose
layer weight is not trained by the same optimizer is a slot of its own (the raw rule).

L, in the paper, is the number of weight tensors. For a residual network AGD(model) instead
counts the layers in series along the residual path, one per residual branch (`infer_depth`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError

KINDS = ("weight", "weight_t", "attention", "embedding", "bias", "norm", "raw")
# Kinds that are layers of the network: the paper's L counts these tensors.
LAYER_KINDS = ("weight", "weight_t", "attention", "embedding")

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# Layers with >= 2-D weights that no rule describes yet: refused rather than guessed.
_UNSUPPORTED = (nn.RNNBase, nn.RNNCellBase, nn.Bilinear)


@dataclass(frozen=True)
class Blocks:
    """How one parameter's (global) tensor is cut into blocks, all of scale ``scale``.

    The tensor is read as ``rows`` rows (its leading dims flattened: dim 0 for every kind but raw
    and norm) of ``inner`` x ``k`` entries; consecutive runs of ``rows // row_blocks`` rows form a
    row block, and each of the ``k`` kernel positions of a row block is one block. A joined bias
    has k == 1 of its own but shares its partner's ``k`` positions (``spread``).
    """
    kind: str
    rows: int
    row_blocks: int
    inner: int
    k: int
    scale: float
    lead: int            # leading dims that index rows (1 for most; 0 for a 0-d raw parameter)
    spread: bool = False  # a bias joined to a layer with k kernel positions

    @property
    def count(self) -> int:
        return self.row_blocks * self.k

    @property
    def rows_per_block(self) -> int:
        return self.rows // self.row_blocks


def blocks(kind: str, shape, groups: int = 1, joined: bool = False, partner: Blocks | None = None) -> Blocks:
    """The blocks of a parameter of ``kind`` and ``shape``. ``joined``: a bias joins this layer's
    weight; ``partner``: for a bias, the Blocks of the weight it joins (None: a slot of its own)."""
    shape = tuple(shape)
    n = math.prod(shape)
    if kind in ("weight", "weight_t"):
        k = math.prod(shape[2:])
        # weight: (d_out, d_in/g, k...); weight_t: (d_in, d_out/g, k...); per group d_out/d_in is
        # the layer's own ratio.
        d_out, d_in = (shape[0] // groups, shape[1]) if kind == "weight" else (shape[1], shape[0] // groups)
        s = math.sqrt(d_out / (d_in + joined)) / math.sqrt(k)
        return Blocks(kind, shape[0], groups, shape[1], k, s, 1)
    if kind == "attention":
        d = shape[1]
        return Blocks(kind, shape[0], 3, d, 1, math.sqrt(d / (d + joined)), 1)
    if kind == "embedding":
        return Blocks(kind, shape[0], shape[0], shape[1], 1, math.sqrt(shape[1]), 1)
    if kind == "norm" or kind == "bias" and partner is not None and partner.kind == "norm":
        return Blocks(kind, n, 1, 1, 1, 1.0, len(shape))
    if kind == "bias" and partner is not None:
        return Blocks(kind, n, partner.row_blocks, 1, partner.k, partner.scale, 1, spread=partner.k > 1)
    # raw, or a bias on its own: every vector along the last dim is a slot of unit RMS
    d = shape[-1] if shape else 1
    rows = n // d
    return Blocks("raw" if kind == "raw" else kind, rows, rows, d, 1, math.sqrt(d), max(len(shape) - 1, 0))


def check(kind: str, p: torch.Tensor, name: str, groups: int = 1) -> None:
    """A one-line UsageError naming ``name`` if the rule ``kind`` cannot apply to ``p``."""
    if kind not in KINDS:
        raise UsageError(f"unknown AGD kind {kind!r} for {name}; choose one of {', '.join(KINDS)}")
    if not p.is_floating_point():
        raise UsageError(f"AGD cannot train {name}: dtype {p.dtype} is not floating point")
    if p.numel() == 0:
        raise UsageError(f"AGD cannot train the empty parameter {name} (shape {tuple(p.shape)})")
    if not (isinstance(groups, int) and groups >= 1):
        raise UsageError(f"conv_groups of {name} must be a positive integer, got {groups!r}")
    need = {"weight": "a >= 2-D (out, in, kernel...) weight", "weight_t": "a >= 2-D (in, out, kernel...) weight",
            "attention": "a packed (3d, d) in_proj_weight", "embedding": "a 2-D (num_embeddings, dim) table",
            "bias": "a 1-D bias"}
    ok = {"weight": p.dim() >= 2 and p.shape[0] % groups == 0,
          "weight_t": p.dim() >= 2 and p.shape[0] % groups == 0,
          "attention": p.dim() == 2 and p.shape[0] == 3 * p.shape[1],
          "embedding": p.dim() == 2, "bias": p.dim() == 1}.get(kind, True)
    if not ok:
        raise UsageError(f"AGD kind {kind!r} needs {need[kind]}, but {name} has shape {tuple(p.shape)}"
                         + (f" (conv_groups {groups})" if groups > 1 else ""))


def default_kind(p: torch.Tensor, name: str) -> str:
    """The kind of a tensor given without its module: the paper's rule for >= 2-D weights."""
    if p.dim() >= 2:
        return "weight"
    raise UsageError(f"AGD cannot tell what the {p.dim()}-D parameter {name} (shape {tuple(p.shape)}) is: "
                     "pass the model itself, AGD(model), or put it in a param group with "
                     "kind='bias', 'norm' or 'raw'")


# ---------------------------------------------------------------- from a module


def _kind_in(module: nn.Module, attr: str) -> tuple[str, int] | None:
    """(kind, conv groups) of ``module``'s own parameter ``attr``; None for a raw parameter."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        groups = getattr(module, "groups", 1)
        if attr == "weight":
            return ("weight_t" if transposed else "weight"), groups
        return "bias", 1
    if "Conv1D" in _class_names(module) and hasattr(module, "nf"):  # Hugging Face GPT-2 style: (in, out)
        return ("weight_t" if attr == "weight" else "bias"), 1
    if isinstance(module, _NORMS):
        return "norm", 1
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding", 1
    if isinstance(module, nn.MultiheadAttention):
        return {"in_proj_weight": ("attention", 1), "in_proj_bias": ("bias", 1),
                "q_proj_weight": ("weight", 1), "k_proj_weight": ("weight", 1),
                "v_proj_weight": ("weight", 1)}.get(attr)
    return None


def module_param_groups(module: nn.Module) -> list[dict]:
    """``module``'s parameters as AGD param groups, one per (kind, conv groups), in the order the
    kinds first appear; every group carries (name, tensor) pairs so that joins can be found.

    A tensor shared by an Embedding and a Linear head (tied weights) is an embedding.
    """
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, mod in module.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod, attr))
    groups: dict[tuple[str, int], list] = {}
    for name, p in module.named_parameters():
        mods = owners[id(p)]
        for mod, attr in mods:
            if isinstance(mod, _UNSUPPORTED):
                raise UsageError(f"AGD has no rule for {name} ({type(mod).__name__}) yet: give it to another "
                                 "optimizer, or put it in a param group with kind=... (see torch_agd.rules)")
        kinds = [_kind_in(mod, attr) for mod, attr in mods]
        if ("embedding", 1) in kinds:
            kind = ("embedding", 1)
        else:
            kind = next((k for k in kinds if k is not None), ("raw", 1))
        groups.setdefault(kind, []).append((name, p))
    out = []
    for (kind, conv_groups), params in groups.items():
        group = {"params": params, "kind": kind}
        if conv_groups > 1:
            group["conv_groups"] = conv_groups
        out.append(group)
    return out


def partner_name(name: str) -> list[str]:
    """Names of the tensors a bias called ``name`` may join, most likely first."""
    stem, _, attr = name.rpartition(".")
    prefix = stem + "." if stem else ""
    if attr == "in_proj_bias":
        return [prefix + "in_proj_weight"]
    if attr == "bias":
        return [prefix + "weight"]
    return []


def split_bias_of(name: str) -> list[str]:
    """Separate q/k/v weights that an attention's in_proj_bias joins, a third each."""
    stem, _, attr = name.rpartition(".")
    prefix = stem + "." if stem else ""
    return [prefix + f"{c}_proj_weight" for c in "qkv"] if attr == "in_proj_bias" else []


def assign_blocks(named: list[tuple[str, torch.Tensor, str, int]]) -> tuple[dict, int]:
    """Blocks of every parameter, given as (name, tensor, kind, conv groups), and where each
    tensor's blocks start in one flat numbering of all blocks.

    Returns ({id(tensor): [(Blocks, first block, rows or None)]}, number of blocks). A bias (or a
    norm layer's shift) named like its layer's weight joins that weight's blocks: it gets them
    as its own, the weight's scale counts the constant input, and nothing new is numbered. An
    in_proj_bias of separate q, k, v weights is three pieces, ``rows`` selecting each.
    """
    by_name, kinds = {}, {}
    for name, p, kind, groups in named:
        by_name.setdefault(name, p)
        kinds[id(p)] = (kind, groups)
    partners: dict[int, list[torch.Tensor]] = {}
    for name, p in by_name.items():
        kind = kinds[id(p)][0]
        if kind not in ("bias", "norm") or not name.endswith("bias"):
            continue
        want = ("norm",) if kind == "norm" else ("weight", "weight_t", "attention")
        for candidate in partner_name(name):
            q = by_name.get(candidate)
            if q is not None and kinds[id(q)][0] in want and (kind != "norm" or q.shape == p.shape):
                partners[id(p)] = [q]
                break
        else:  # an attention whose q, k and v maps are separate tensors: a third each
            thirds = [by_name.get(n) for n in split_bias_of(name)]
            if kind == "bias" and all(q is not None and kinds[id(q)][0] == "weight" for q in thirds):
                partners[id(p)] = thirds
    joined = {id(q) for qs in partners.values() for q in qs if kinds[id(q)][0] != "norm"}
    own, base, n = {}, {}, 0
    for p in by_name.values():
        if id(p) not in partners:
            kind, groups = kinds[id(p)]
            own[id(p)] = blocks(kind, p.shape, groups, joined=id(p) in joined)
            base[id(p)], n = n, n + own[id(p)].count
    out = {}
    for p in by_name.values():
        kind = kinds[id(p)][0]
        qs = partners.get(id(p))
        if qs is None:
            out[id(p)] = [(own[id(p)], base[id(p)], None)]
        elif len(qs) == 1:
            out[id(p)] = [(blocks(kind, p.shape, partner=own[id(qs[0])]), base[id(qs[0])], None)]
        else:
            third = p.shape[0] // 3
            out[id(p)] = [(blocks(kind, (third,), partner=own[id(q)]), base[id(q)], slice(j * third, (j + 1) * third))
                          for j, q in enumerate(qs)]
    return out, n


# ---------------------------------------------------------------- depth


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


def _class_names(module: nn.Module) -> list[str]:
    """The names of the module's class and its bases: fully_shard (FSDP2) turns a wrapped
    module's class into a subclass named FSDP<name>, so a name check reads the bases too."""
    return [cls.__name__ for cls in type(module).__mro__]


def _residual_branches(module: nn.Module) -> int | None:
    return next((RESIDUAL_BLOCKS[n] for n in _class_names(module) if n in RESIDUAL_BLOCKS), None)


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or any(n.endswith("Attention") for n in _class_names(module))


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
    layer tensor (``layer_ids``: weights, embeddings) outside such blocks counts once, as in the
    paper, so a network without residual blocks keeps the paper's count.
    """
    depth, inside = 0, set()

    def visit(mod: nn.Module) -> None:
        nonlocal depth
        children = list(mod.children())
        counts: dict[type, int] = {}
        if isinstance(mod, (nn.Sequential, nn.ModuleList)):
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
