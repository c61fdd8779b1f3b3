"""How a parameter is cut into blocks, and how a bias joins its layer's blocks.

AGD normalises every block B on its own: B <- B - (eta / L) * s(B) * g(B) / ||g(B)||_F. A rule
(rules.py) says what a parameter's blocks are; this module holds the description they share
(``Blocks``) and numbers the blocks of all parameters in one flat range, which is where the step
keeps their norms. A bias named like its layer's weight (``conv1.bias`` beside ``conv1.weight``)
is not a block of its own: [W | b] acts on [x; 1], so it joins W's blocks, sharing their norms
and factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Blocks:
    """How one parameter's (global) tensor is cut into blocks, all of scale ``scale``.

    The tensor is read as ``rows`` rows (its first ``row_dims`` dims flattened) of ``inner`` x
    ``k`` entries; consecutive runs of ``rows // row_blocks`` rows form a row block, and each of
    the ``k`` kernel positions of a row block is one block. A bias joined to a layer with k > 1
    kernel positions has no kernel of its own but sits in each of the layer's k blocks
    (``in_every_kernel_position``).
    """
    rows: int
    row_blocks: int
    inner: int
    k: int
    scale: float
    row_dims: int = 1       # leading dims that index rows (0 for a 0-d parameter)
    kernel_dims: int = 0    # trailing dims that index kernel positions (a conv weight's k1, k2...)
    in_every_kernel_position: bool = False
    transposed: bool = False  # blocks stored as the transpose of their maps, (in, out) (weight_t, stacked_t)
    joined: bool = False      # a bias's: the constant input's column of its partner's blocks

    @property
    def count(self) -> int:
        return self.row_blocks * self.k

    @property
    def rows_per_block(self) -> int:
        return self.rows // self.row_blocks


def joined_to(partner: Blocks, shape: tuple) -> Blocks:
    """The blocks of a bias of ``shape`` that joins ``partner``'s: one entry per row of the
    partner, in its row blocks and (spread over them) kernel positions, at its scale."""
    return Blocks(math.prod(shape), partner.row_blocks, 1, partner.k, partner.scale, row_dims=len(shape),
                  in_every_kernel_position=partner.k > 1, joined=True)


def partner_names(name: str) -> list[str]:
    """Names of the tensors a bias called ``name`` may join, most likely first."""
    stem, _, attr = name.rpartition(".")
    prefix = stem + "." if stem else ""
    if attr == "in_proj_bias":
        return [prefix + "in_proj_weight"]
    if attr == "bias":
        return [prefix + "weight"]
    if attr.endswith("_bias"):  # stacked experts' gate_up_proj_bias beside gate_up_proj
        return [prefix + attr[:-len("_bias")]]
    return []


def split_partner_names(name: str) -> list[str]:
    """Separate q/k/v weights that an attention's in_proj_bias joins, a third each."""
    stem, _, attr = name.rpartition(".")
    prefix = stem + "." if stem else ""
    return [prefix + f"{c}_proj_weight" for c in "qkv"] if attr == "in_proj_bias" else []


@dataclass(frozen=True)
class Placement:
    """One tensor of a step as the step sees it: its blocks, where they start in the flat vector
    of block norms, and which rows of it this process holds (all of them unless sharded)."""
    blocks: Blocks
    base: int
    r0: int            # first (flattened) row held here
    n: int             # rows held here
    contributes: bool  # False for a replica whose copy another process counts
    held_inner: int | None = None  # entries of a row held here per kernel position, if not all
                                   # (a tensor-parallel shard of an inner dim: partial sums)

    @property
    def inner(self) -> int:
        return self.blocks.inner if self.held_inner is None else self.held_inner


@dataclass(frozen=True)
class Assigned:
    """One parameter's blocks and where they start in the flat numbering; ``rows`` selects the
    part of the parameter they cover (a third of a split in_proj_bias), None for all of it."""
    blocks: Blocks
    base: int
    rows: slice | None = None


def assign_blocks(named: list[tuple[str, torch.Tensor, "object"]]) -> tuple[dict[int, list[Assigned]], int]:
    """Blocks of every parameter, given as (name, tensor, rule), numbered in one flat range.

    Returns ({id(tensor): [Assigned, ...]}, number of blocks). A parameter whose rule joins a
    partner (rules.Rule.joins) named like it takes the partner's blocks as its own; the partner's
    scale then counts the constant input, and nothing new is numbered. An in_proj_bias of
    separate q, k, v weights joins each of them with a third of its rows.
    """
    by_name, rule_of = {}, {}
    for name, p, rule in named:
        by_name.setdefault(name, p)
        rule_of[id(p)] = rule
    partners: dict[int, list[torch.Tensor]] = {}
    for name, p in by_name.items():
        rule = rule_of[id(p)]
        if not name.endswith("bias"):
            continue
        for candidate in partner_names(name):
            q = by_name.get(candidate)
            if q is not None and rule.joins(rule_of[id(q)], p, q):
                partners[id(p)] = [q]
                break
        else:  # an attention whose q, k and v maps are separate tensors: a third each
            thirds = [by_name.get(n) for n in split_partner_names(name)]
            if thirds and all(q is not None and rule.joins(rule_of[id(q)], p, q, split=True) for q in thirds):
                partners[id(p)] = thirds
    joined = {id(q) for qs in partners.values() for q in qs}
    own, base, n = {}, {}, 0
    for p in by_name.values():
        if id(p) not in partners:
            own[id(p)] = rule_of[id(p)].blocks(p.shape, joined=id(p) in joined)
            base[id(p)], n = n, n + own[id(p)].count
    out = {}
    for p in by_name.values():
        qs = partners.get(id(p))
        rule = rule_of[id(p)]
        if qs is None:
            out[id(p)] = [Assigned(own[id(p)], base[id(p)])]
        elif len(qs) == 1:
            out[id(p)] = [Assigned(rule.joined_blocks(p.shape, own[id(qs[0])]), base[id(qs[0])])]
        else:
            third = p.shape[0] // 3
            out[id(p)] = [Assigned(rule.joined_blocks((third,), own[id(q)]), base[id(q)],
                                   slice(j * third, (j + 1) * third)) for j, q in enumerate(qs)]
    return out, n
