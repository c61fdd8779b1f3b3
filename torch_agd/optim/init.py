"""AGD's initialisation: every parameter set by its rule's ``init_`` (rules.py):

- weight, weight_t, attention: every block uniformly (semi-)orthogonal, times s(B), so every
  singular value of every block equals s(B) (the paper's initialisation);
- embedding: every row a uniformly random direction of unit RMS (norm sqrt(d));
- bias: zero; norm: gamma = 1, beta = 0 (what the layer would do anyway, done explicitly);
- raw (positional embeddings, class tokens...): left as the module initialised it.

A parameter that FSDP2 has sharded (a DTensor, e.g. after building on the meta device and
``to_empty``) gets on each process exactly its rows of what the whole tensor would get from the
same generator: every process draws every number, in the same order, one block at a time
(orthogonal.py), so the result is the same on any number of processes.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import assign_blocks
from .rules import default_kind, module_param_groups, rule_for
from .sharding import is_sharded, rows_held


def named_rules(groups: list[dict]) -> list[tuple[str, torch.Tensor, object]]:
    """(name, tensor, rule) of every parameter of param groups holding (name, tensor) pairs, each
    checked against its rule (a one-line UsageError naming the parameter otherwise)."""
    named = []
    for group in groups:
        for name, p in group["params"]:
            rule = rule_for(group.get("kind") or default_kind(p, name), group.get("conv_groups", 1), name)
            rule.check(p, name)
            named.append((name, p, rule))
    return named


@torch.no_grad()
def init_weights_(module_or_params, generator: torch.Generator | None = None):
    """Initialise parameters in place as AGD expects and return the argument.

    Accepts an nn.Module (every parameter, by its rule) or an iterable of >= 2-D weight tensors
    laid out (out, in, kernel...). A parameter no rule covers is a UsageError naming it. FSDP2
    shards (DTensors sharded on dim 0, e.g. built on the meta device, sharded, then ``to_empty``)
    get bitwise their rows of what the unsharded model gets from the same generator.
    """
    if isinstance(module_or_params, nn.Module):
        groups = module_param_groups(module_or_params)
    else:
        groups = [{"params": [(f"params[{i}]", p) for i, p in enumerate(module_or_params)]}]
    named = named_rules(groups)
    structure, _ = assign_blocks(named)
    for name, p, rule in named:
        blocks = structure[id(p)][0].blocks
        if is_sharded(p):  # an FSDP2 shard: its rows of the same draw (docs/distributed.md, "meta device")
            local, r0 = rows_held(p, name, blocks.row_dims, blocks.kernel_dims)
            rule.init_rows_(local, tuple(p.shape), r0, blocks, name, generator)
        else:
            rule.init_(p, blocks, name, generator)
    return module_or_params
