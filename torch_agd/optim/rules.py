"""One rule per kind of parameter: how AGD cuts it into blocks, how large each block is meant
to be, how it starts, and whether it counts toward the depth L.

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
    tied        a table that is an embedding and an output head     1 (the head's rows)      yes
                at once (tied weights): each row
    stacked     E matrices in one (E, out, in) tensor (mixture-of-  sqrt(out/in) each        yes
                experts): each expert's matrix; stacked_t (E, in,
                out) likewise; stacked_bias (E, out) joins them
    gain        a per-channel gain outside torch's norm layers      1, as norm               no
                (custom RMSNorms, layer scales, a weight-
                standardised conv's gain): diag(gamma), one block

d_out, d_in count whole channels (d_in of [W | b] counts the constant input too); for a grouped
conv, d_out/d_in is the same per group as for the whole layer, so g only cuts the blocks. A conv's
bias acts like one more input channel held at 1, whose kernel is spread evenly over the K
positions: it joins each position's block and moves by the sum of their factors. A bias whose
layer weight is not trained by the same optimizer is a slot of its own (the raw rule).

Each kind is one class below. Which rule a module's parameter gets is looked up by the module's
type (``register_rule``; a subclass inherits its base's rules); a param group may also name a
kind itself (``{"params": [...], "kind": "bias"}``).
"""
from __future__ import annotations

import math
import re
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn

from ..errors import UsageError
from .blocks import Blocks, joined_to
from .orthogonal import directions_rows_, orthogonal_blocks, orthogonal_rows_


class Rule:
    """How AGD treats one kind of parameter. Subclasses set ``kind`` (the name a param group
    uses), ``layer`` (a layer of the network: the paper's L counts it) and ``needs`` (the shape
    it takes, for the error message), and define ``blocks``; a rule instance carries the conv
    groups of its parameter. ``matrix``: its blocks are the matrices of linear maps between
    hidden features (a linear or conv weight, q, k, v), not rows of a table or slots."""
    kind: ClassVar[str]
    layer: ClassVar[bool] = False
    matrix: ClassVar[bool] = False
    keeps_module_init: ClassVar[bool] = False  # init_ leaves the value the module's constructor set
    needs: ClassVar[str] = ""
    by_kind: ClassVar[dict[str, type[Rule]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Rule.by_kind[cls.kind] = cls

    def __init__(self, groups: int = 1):
        self.groups = groups

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.groups})" if self.groups != 1 else f"{type(self).__name__}()"

    def fits(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s shape is one this rule describes."""
        return True

    def check(self, p: torch.Tensor, name: str) -> None:
        """A one-line UsageError naming ``name`` if this rule cannot apply to ``p``."""
        if not p.is_floating_point():
            raise UsageError(f"AGD cannot train {name}: dtype {p.dtype} is not floating point")
        if p.numel() == 0:
            raise UsageError(f"AGD cannot train the empty parameter {name} (shape {tuple(p.shape)})")
        if not (isinstance(self.groups, int) and not isinstance(self.groups, bool) and self.groups >= 1):
            raise UsageError(f"conv_groups of {name} must be a positive integer, got {self.groups!r}")
        if self.groups != 1 and not isinstance(self, Weight):
            raise UsageError(f"conv_groups applies to kind 'weight' or 'weight_t', not {self.kind!r}")
        if not self.fits(p):
            raise UsageError(f"AGD kind {self.kind!r} needs {self.needs}, but {name} has shape {tuple(p.shape)}"
                             + (f" (conv_groups {self.groups})" if self.groups > 1 else ""))

    def blocks(self, shape: tuple, joined: bool = False) -> Blocks:
        """The blocks of a parameter of ``shape``; ``joined``: a bias joins them (the constant
        input counts in d_in)."""
        raise NotImplementedError

    def joins(self, partner: Rule, p: torch.Tensor, q: torch.Tensor, split: bool = False) -> bool:
        """Whether ``p`` (named like ``q``'s bias) joins the blocks of ``q``, which has rule
        ``partner``; ``split``: ``q`` is one of three separate q, k, v maps."""
        return False

    def joined_blocks(self, shape: tuple, partner: Blocks) -> Blocks:
        """The blocks of a parameter of ``shape`` that joins ``partner``'s."""
        return joined_to(partner, tuple(shape))

    def out_width(self, shape: tuple) -> int:
        """How many outputs the map a parameter of ``shape`` holds produces (a table: its rows)."""
        return shape[0]

    def flat_matrices(self, t: torch.Tensor) -> torch.Tensor:
        """A matrix rule's linear maps in ``t`` (the parameter or its gradient) as (n, out, in):
        whole, with each conv filter flattened to a row (out, in·k...) per group, as Muon's
        authors orthogonalise a conv (not AGD's blocks, one per kernel position)."""
        raise ValueError(f"AGD kind {self.kind!r} holds no linear maps")

    def from_flat_matrices(self, m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of flat_matrices: (n, out, in) back in the layout of ``like``."""
        return m.reshape(like.shape)

    def init_(self, p: torch.Tensor, blocks: Blocks, name: str, generator) -> None:
        """Set ``p`` as AGD starts it: for a matrix rule every block uniformly (semi-)orthogonal
        times its scale (the paper's initialisation); otherwise the module's own initialisation."""
        if self.matrix:
            p.copy_(orthogonal_blocks(p, blocks, generator))

    def init_rows_(self, local: torch.Tensor, shape: tuple, r0: int, blocks: Blocks, name: str, generator) -> None:
        """init_ for a process that holds only some rows of the parameter (an FSDP2 shard): set
        ``local``, the rows from r0 on (rows as ``blocks`` counts them) of a parameter of
        ``shape``, to those rows of what init_ gives the whole, drawing the same numbers."""
        if self.matrix:
            orthogonal_rows_(local, blocks, r0, generator)


class Weight(Rule):
    """A linear or conv weight (d_out, d_in/g, k...): the paper's rule."""
    kind = "weight"
    layer = True
    matrix = True
    needs = "a >= 2-D (out, in, kernel...) weight"
    transposed = False

    def fits(self, p):
        return p.dim() >= 2 and p.shape[0] % self.groups == 0

    def blocks(self, shape, joined=False):
        shape = tuple(shape)
        k = math.prod(shape[2:])
        # per group d_out/d_in is the layer's own ratio
        d_out, d_in = (shape[1], shape[0] // self.groups) if self.transposed else (shape[0] // self.groups, shape[1])
        s = math.sqrt(d_out / (d_in + joined)) / math.sqrt(k)
        return Blocks(shape[0], self.groups, shape[1], k, s, kernel_dims=len(shape) - 2, transposed=self.transposed)

    def out_width(self, shape):
        return shape[1] * self.groups if self.transposed else shape[0]

    def flat_matrices(self, t):
        g = self.groups
        if not self.transposed:  # (out, in/g, k...): each filter a row, per group
            return t.reshape(g, t.shape[0] // g, -1)
        rows, cols = t.shape[0] // g, t.shape[1]  # (in, out/g, k...): group g maps in/g to out/g
        return t.reshape(g, rows, cols, -1).permute(0, 2, 1, 3).reshape(g, cols, -1)

    def from_flat_matrices(self, m, like):
        if not self.transposed:
            return m.reshape(like.shape)
        rows, cols = like.shape[0] // self.groups, like.shape[1]
        return m.reshape(self.groups, cols, rows, -1).permute(0, 2, 1, 3).reshape(like.shape)


class WeightT(Weight):
    """A weight stored (d_in, d_out/g, k...): ConvTranspose, Hugging Face's Conv1D."""
    kind = "weight_t"
    needs = "a >= 2-D (in, out, kernel...) weight"
    transposed = True


class Attention(Rule):
    """nn.MultiheadAttention's packed (3d, d) in_proj_weight: q, k and v are three maps."""
    kind = "attention"
    layer = True
    matrix = True
    needs = "a packed (3d, d) in_proj_weight"

    def fits(self, p):
        return p.dim() == 2 and p.shape[0] == 3 * p.shape[1]

    def blocks(self, shape, joined=False):
        d = shape[1]
        return Blocks(shape[0], 3, d, 1, math.sqrt(d / (d + joined)))

    def flat_matrices(self, t):
        return t.reshape(3, t.shape[1], t.shape[1])  # q, k, v


class Embedding(Rule):
    """An embedding table (num_embeddings, dim): each row maps one one-hot slot to R^d."""
    kind = "embedding"
    layer = True
    needs = "a 2-D (num_embeddings, dim) table"

    def fits(self, p):
        return p.dim() == 2

    def blocks(self, shape, joined=False):
        return Blocks(shape[0], shape[0], shape[1], 1, math.sqrt(shape[1]))

    def init_(self, p, blocks, name, generator):
        rows = torch.randn(p.shape, dtype=torch.float64, generator=generator)  # a uniform direction per row
        p.copy_(self.normalise(rows))

    def init_rows_(self, local, shape, r0, blocks, name, generator):
        directions_rows_(local, tuple(shape), r0, self.normalise, generator)

    @staticmethod
    def normalise(rows: torch.Tensor) -> torch.Tensor:
        """Each row of a Gaussian table scaled to norm sqrt(d), in place (row by row)."""
        rows *= math.sqrt(rows.shape[1]) / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        return rows


class Raw(Rule):
    """An additive parameter (positional embedding, class token): every vector along the last
    dim is a slot of unit RMS."""
    kind = "raw"
    keeps_module_init = True

    def blocks(self, shape, joined=False):
        shape = tuple(shape)
        d = shape[-1] if shape else 1
        rows = math.prod(shape) // d
        return Blocks(rows, rows, d, 1, math.sqrt(d), row_dims=max(len(shape) - 1, 0))


class Bias(Raw):
    """A layer's bias: joins the blocks of the weight named beside it ([W | b] on [x; 1]);
    with no such weight in the optimizer, a slot of its own like a raw parameter."""
    kind = "bias"
    keeps_module_init = False
    needs = "a 1-D bias"

    def fits(self, p):
        return p.dim() == 1

    def joins(self, partner, p, q, split=False):
        if split:  # a third of an in_proj_bias for each of separate q, k, v weights
            return isinstance(partner, Weight) and not partner.transposed
        return isinstance(partner, (Weight, Attention))

    def init_(self, p, blocks, name, generator):
        p.zero_()

    def init_rows_(self, local, shape, r0, blocks, name, generator):
        local.zero_()


class Tied(Embedding):
    """A table that is both an embedding and an output head (an Embedding's weight that a Linear
    head shares). As the head it maps features of unit RMS to logits: rows of norm 1 give logits
    of unit RMS (the paper's s for a (V, d) head, sqrt(V/d) times a semi-orthogonal matrix, has
    rows of norm 1 on average), while the embedding's rows of norm sqrt(d) would give logits
    sqrt(d) times too large in every model that does not rescale them (GPT-2, BERT, Gemma). As an
    embedding the rows are then small, but those models put a norm layer (or Gemma's sqrt(d)
    factor) between the table and the first layer that reads it."""
    kind = "tied"

    def blocks(self, shape, joined=False):
        return Blocks(shape[0], shape[0], shape[1], 1, 1.0)

    @staticmethod
    def normalise(rows: torch.Tensor) -> torch.Tensor:
        """Each row of a Gaussian table scaled to norm 1 (row by row)."""
        return rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)


class Stacked(Rule):
    """E independent matrices stored as one (E, out, in) tensor, as mixture-of-experts layers
    hold their experts: each expert's matrix is a block with its own s = sqrt(out/in), drawn
    orthogonal at init, exactly as E separate linear weights would be."""
    kind = "stacked"
    layer = True
    matrix = True
    needs = "a 3-D (experts, out, in) tensor"
    transposed = False

    def fits(self, p):
        return p.dim() == 3

    def blocks(self, shape, joined=False):
        experts, rows, inner = shape
        d_out, d_in = (inner, rows) if self.transposed else (rows, inner)
        return Blocks(experts * rows, experts, inner, 1, math.sqrt(d_out / (d_in + joined)), row_dims=2,
                      transposed=self.transposed)

    def out_width(self, shape):
        return shape[2] if self.transposed else shape[1]

    def flat_matrices(self, t):
        return t.transpose(1, 2) if self.transposed else t

    def from_flat_matrices(self, m, like):
        return m.transpose(1, 2) if self.transposed else m.reshape(like.shape)


class StackedT(Stacked):
    """Stacked matrices stored (E, in, out): x @ W[e] rather than a linear map's W[e] @ x."""
    kind = "stacked_t"
    needs = "a 3-D (experts, in, out) tensor"
    transposed = True


class StackedBias(Bias):
    """The (E, out) biases of stacked experts: each expert's row joins that expert's matrix."""
    kind = "stacked_bias"
    needs = "a 2-D (experts, out) bias"

    def fits(self, p):
        return p.dim() == 2

    def joins(self, partner, p, q, split=False):
        return isinstance(partner, Stacked) and not split


class Norm(Rule):
    """A norm layer's affine part: [diag(gamma) | beta] is one block of scale 1 (gamma = 1 at
    init), so the shift joins the gain of the same shape."""
    kind = "norm"

    def blocks(self, shape, joined=False):
        return Blocks(math.prod(shape), 1, 1, 1, 1.0, row_dims=len(shape))

    def joins(self, partner, p, q, split=False):
        return isinstance(partner, Norm) and not split and q.shape == p.shape

    def joined_blocks(self, shape, partner):
        return self.blocks(shape)

    def init_(self, p, blocks, name, generator):
        p.fill_(0.0 if name.endswith("bias") else 1.0)  # beta = 0, gamma = 1

    def init_rows_(self, local, shape, r0, blocks, name, generator):
        self.init_(local, blocks, name, generator)  # no draw: every row alike


class Gain(Norm):
    """A per-channel gain that is not a torch norm layer's: the weight of a norm layer of another
    library's own (LlamaRMSNorm, T5LayerNorm, timm's RmsNorm), a layer scale, a weight-
    standardised conv's gain. diag(gamma) is one block of scale 1, as for a norm layer, but the
    module's own initialisation stays: such gains may start at 0 (GemmaRMSNorm multiplies by
    1 + gamma) or near 0 (a layer scale)."""
    kind = "gain"
    keeps_module_init = True

    def init_(self, p, blocks, name, generator):
        pass

    def init_rows_(self, local, shape, r0, blocks, name, generator):
        pass


KINDS = tuple(Rule.by_kind)


def rule_for(kind: str, groups: int = 1, name: str = "") -> Rule:
    """The rule of the kind a param group names, for its parameter ``name``, with its conv groups."""
    cls = Rule.by_kind.get(kind)
    if cls is None:
        where = f" for {name}" if name else ""
        raise UsageError(f"unknown AGD kind {kind!r}{where}; choose one of {', '.join(Rule.by_kind)}")
    return cls(groups)


def group_rule(group: dict) -> Rule:
    """The rule of an AGD param group (its ``kind``, default the paper's "weight")."""
    return rule_for(group.get("kind") or Weight.kind, group.get("conv_groups", 1))


def default_kind(p: torch.Tensor, name: str) -> str:
    """The kind of a tensor given without its module: the paper's rule for >= 2-D weights."""
    if p.dim() >= 2:
        return Weight.kind
    raise UsageError(f"AGD cannot tell what the {p.dim()}-D parameter {name} (shape {tuple(p.shape)}) is: "
                     "pass the model itself, AGD(model), or put it in a param group with "
                     "kind='bias', 'norm' or 'raw'")


# ---------------------------------------------------------------- from a module's type

# module type -> (module, attribute name) -> the rule of that parameter, or None (raw)
ModuleRules = Callable[[nn.Module, str], "Rule | None"]
_BY_TYPE: dict[type, ModuleRules] = {}


class NoRule(Exception):
    """Raised by a module's rules for a parameter no rule describes: refused rather than guessed."""


def register_rule(module_type: type, rules: Mapping[str, Rule | str] | ModuleRules) -> None:
    """Tell AGD(model) and init_weights_ how to treat the parameters of ``module_type`` (and of
    its subclasses): a mapping from attribute name to a Rule or kind name
    (``register_rule(MyLayer, {"weight": "weight", "scale": "gain"})``), or a function of
    (module, attribute name) returning a Rule, or None for the raw rule."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise UsageError(f"register_rule needs an nn.Module subclass, got {module_type!r}")
    if callable(rules):
        _BY_TYPE[module_type] = rules
        return
    table = {attr: rule if isinstance(rule, Rule) else rule_for(rule) for attr, rule in rules.items()}
    _BY_TYPE[module_type] = lambda module, attr: table.get(attr)


def _linear_or_conv(module: nn.Module, attr: str) -> Rule:
    """A linear or conv layer's weight and bias, and by its role any other parameter a subclass
    adds: a gain per output channel (timm's ScaledStdConv2d) is diag(gain) after the map."""
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    if attr == "weight":
        return (WeightT if transposed else Weight)(getattr(module, "groups", 1))
    if attr == "bias":
        return Bias()
    p, weight = getattr(module, attr), module.weight
    out_channels = weight.shape[1] * getattr(module, "groups", 1) if transposed else weight.shape[0]
    if p.numel() == out_channels and p.shape[0] == out_channels:
        return Gain()
    raise NoRule(f"it is neither the layer's weight nor its bias, nor a gain per output channel "
                 f"(shape {tuple(p.shape)})")


def _multihead_attention(module: nn.Module, attr: str) -> Rule | None:
    return {"in_proj_weight": Attention(), "in_proj_bias": Bias(), "q_proj_weight": Weight(),
            "k_proj_weight": Weight(), "v_proj_weight": Weight()}.get(attr)


def _refused(module: nn.Module, attr: str) -> Rule:
    raise NoRule("no rule describes this layer yet")


register_rule(nn.Linear, _linear_or_conv)
register_rule(nn.modules.conv._ConvNd, _linear_or_conv)
register_rule(nn.MultiheadAttention, _multihead_attention)
for _norm in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm):
    register_rule(_norm, lambda module, attr: Norm())
for _embedding in (nn.Embedding, nn.EmbeddingBag):
    register_rule(_embedding, lambda module, attr: Embedding())
for _layer in (nn.RNNBase, nn.RNNCellBase, nn.Bilinear):  # >= 2-D weights no rule describes yet
    register_rule(_layer, _refused)


def class_names(module: nn.Module) -> list[str]:
    """The names of the module's class and its bases: fully_shard (FSDP2) turns a wrapped
    module's class into a subclass named FSDP<name>, so a name check reads the bases too."""
    return [cls.__name__ for cls in type(module).__mro__]


# Layer scales by their attribute names in timm and transformers (ConvNeXt's gamma, ResMLP's ls1,
# CaiT's gamma_1, XCiT's gamma1, DINOv2's lambda1): a per-channel gain on a residual branch.
_LAYER_SCALE = re.compile(r"gamma\w*|ls\d|layer_scale\w*|lambda\d")


def _by_structure(module: nn.Module, attr: str) -> Rule | None:
    """Rules for the modules of libraries that are not dependencies (Hugging Face transformers,
    timm), read from what a module holds and, where nothing else tells, its class's name."""
    p, names = getattr(module, attr), class_names(module)
    if "Conv1D" in names and hasattr(module, "nf"):  # GPT-2's linear layer, stored (in, out)
        return WeightT() if attr == "weight" else Bias()
    if hasattr(module, "is_transposed") and hasattr(module, "num_experts"):  # transformers' stacked experts
        if p.dim() == 3:
            return StackedT() if module.is_transposed else Stacked()
        if p.dim() == 2 and attr.endswith("_bias"):
            return StackedBias()
    if p.dim() == 2 and attr == "weight" and any("Router" in n for n in names):  # logits = x @ weight.T
        return Weight()
    per_channel = p.numel() == max(p.shape, default=1)  # (d,), or (1, 1, d) and the like
    if per_channel and (any("Norm" in n or "LayerScale" in n or n == "Affine" for n in names)
                        or _LAYER_SCALE.fullmatch(attr)):
        return Gain()
    return None


def _rule_in(module: nn.Module, attr: str) -> Rule | None:
    """The rule of ``module``'s own parameter ``attr``: its type's (or nearest base's) registered
    rules, else what its structure shows; None for a raw parameter."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls](module, attr)
    return _by_structure(module, attr)


def module_param_groups(module: nn.Module) -> list[dict]:
    """``module``'s parameters as AGD param groups, one per (kind, conv groups), in the order the
    kinds first appear; every group carries (name, tensor) pairs so that joins can be found.

    A tensor shared by an Embedding and a Linear head (tied weights) is one tied table.
    """
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, mod in module.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod, attr))
    groups: dict[tuple[str, int], list] = {}
    for name, p in module.named_parameters():
        found = []
        for mod, attr in owners[id(p)]:
            try:
                rule = _rule_in(mod, attr)
            except NoRule as why:
                raise UsageError(f"AGD has no rule for {name} ({type(mod).__name__}): {why}; give it to another optimizer, put it in a "
                                 "param group with kind=..., or register_rule its module type "
                                 "(docs/rules.md)") from None
            if rule is not None:
                found.append(rule)
        embedding = any(isinstance(r, Embedding) for r in found)
        if embedding and any(r.matrix for r in found):  # an embedding that is also a head
            rule = Tied()
        else:
            rule = next((r for r in found if isinstance(r, Embedding)), found[0] if found else Raw())
        groups.setdefault((rule.kind, rule.groups), []).append((name, p))
    out = []
    for (kind, conv_groups), params in groups.items():
        group = {"params": params, "kind": kind}
        if conv_groups > 1:
            group["conv_groups"] = conv_groups
        out.append(group)
    return out
