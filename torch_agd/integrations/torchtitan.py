"""AGD as torchtitan's optimizer: ``AGDOptimizers``, an OptimizersContainer holding one AGD.

torchtitan builds its optimizer from ``Trainer.Config.optimizer`` after it has applied its
parallelisms: ``config.optimizer.build(model_parts=...)``. That field takes any
``OptimizersContainer.Config``, and a subclass of the container with its own ``Config`` is
torchtitan's documented way to change the optimizer (OptimizersContainer's docstring): its
``build`` then constructs the subclass. ``AGDOptimizers`` builds ``AGD(model)`` on the model as
torchtitan hands it over, so every parameter gets the rule of its module's type: torchtitan's
Linear, Embedding and RMSNorm subclass torch's, whose rules AGD already has; its experts'
stacked matrices get theirs from the register_rule below.

How to run it (docs/integrations.md, "torchtitan")::

    torchrun --nproc_per_node=8 -m torchtitan.train \\
        --module torch_agd.integrations.torchtitan --config llama3_debugmodel_agd

or, in a config function of your own: ``config = with_agd(llama3_8b())``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.optimizer.utils import init_optim_state
from torchtitan.models.common.moe import GroupedExperts

from torch_agd import AGD, init_weights_, register_rule
from torch_agd.errors import UsageError

__all__ = ["AGDOptimizers", "with_agd", "llama3_debugmodel_agd"]

# torchtitan's mixture-of-experts layers (Qwen3-MoE, DeepSeek-V3, ...) hold their experts' matrices
# stacked as (experts, out, in) (w1, w3: dim -> hidden; w2: hidden -> dim; the forward multiplies by
# their transposes): each expert's matrix is a block of its own, as E separate linear weights would
# be. Nothing in the module's structure says so, and without this rule they would be raw slots.
register_rule(GroupedExperts, {"w1_EFD": "stacked", "w2_EDF": "stacked", "w3_EFD": "stacked"})


def _check_one_whole_model(model_parts: list[nn.Module]) -> None:
    """AGD's step size sums the gradient norms of every block of the whole model, so one AGD
    must see all of it: pipeline parallelism gives a rank only its stages (and sets the modules
    of the other stages to None), whose G would be a part of the model's."""
    missing = [name for name, m in model_parts[0]._modules.items() if m is None] if len(model_parts) == 1 else []
    if len(model_parts) != 1 or missing:
        held = f"{len(model_parts)} model parts" if len(model_parts) != 1 else f"a model without {', '.join(missing)}"
        raise UsageError(f"AGD in torchtitan needs the whole model on every rank (eta sums over every block), got "
                         f"{held}: pipeline parallelism is not supported, set parallelism.pipeline_parallel_degree = 1")


class AGDOptimizers(OptimizersContainer):
    """torchtitan's optimizer container with one AGD over the whole model, by AGD's rules.

    The Config's own fields are AGD's arguments (``lr`` multiplies every update, for
    torchtitan's lr scheduler). ``init_weights``: redraw the weights with AGD's initialisation
    (``torch_agd.init_weights_``) when the optimizer is built, over torchtitan's own; on a
    sharded (FSDP2) model that needs init_weights_ on DTensor shards. The base Config's
    ``param_groups`` must stay empty (AGD takes every parameter, each by its module's rule) and
    ``implementation`` is not used (AGD's step is its own foreach).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        lr: float = 1.0
        gain: float = 1.0
        depth: int | str | None = None
        momentum: float | None = None  # AGD's: 0.9 under the orthogonal direction, 0 under "frobenius"
        nesterov: bool = True
        direction: str = "orthogonal"  # AGD's default; "frobenius" is the paper's rule
        init_weights: bool = False

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        if config.param_groups:
            raise UsageError("AGDOptimizers.Config takes no param_groups: AGD trains every parameter by its "
                             "module's rule (torch_agd.register_rule for a module type it does not know)")
        _check_one_whole_model(model_parts)
        model = model_parts[0]
        if config.init_weights:
            init_weights_(model)
        agd = AGD(model, lr=config.lr, gain=config.gain, depth=config.depth, momentum=config.momentum,
                  nesterov=config.nesterov, direction=config.direction)
        for group in agd.param_groups:
            # torchtitan keys its checkpoints by names without its wrappers' segments
            # (activation checkpointing adds "_checkpoint_wrapped_module"); the joins of biases
            # read the names too, and a wrapper's segment never separates a bias from its weight.
            group["param_names"] = [canonical_fqn(name) for name in group["param_names"]]
        self.model_parts = model_parts
        self.optimizers = [agd]
        self._validate_params([p for group in agd.param_groups for p in group["params"]])
        self._post_init([p for group in agd.param_groups for p in group["params"]])

    @property
    def agd(self) -> AGD:
        return self.optimizers[0]

    def _materialise_state(self) -> None:
        """torchtitan creates an optimizer's state, for a checkpoint saved or loaded before any
        step, by one step on zero gradients at lr 0 (init_optim_state). For AGD that step moves no
        weight (eta is 0) but counts itself in ``steps``: uncounted here."""
        fresh = not self.agd.state
        init_optim_state(self.agd)
        if fresh and self.agd.steps is not None:
            self.agd.steps.zero_()

    def state_dict(self) -> dict:
        self._materialise_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._materialise_state()
        super().load_state_dict(state_dict)


def with_agd(config, **agd):
    """``config`` (a torchtitan Trainer.Config) set to train with AGD: AGDOptimizers with the
    keyword arguments ``agd`` (AGDOptimizers.Config's fields), no gradient clipping (clipping
    shrinks the gradient, and AGD's eta with it) and a constant lr multiplier (no warmup, no
    decay: AGD's step size is its own). Returns ``config``."""
    from torchtitan.components.optimizer import LRSchedulersContainer

    config.optimizer = AGDOptimizers.Config(**agd)
    config.training.max_norm = math.inf  # clip_grad_norm_ then multiplies every gradient by 1.0
    config.lr_scheduler = LRSchedulersContainer.Config(warmup_steps=0, decay_ratio=0.0)
    return config


def llama3_debugmodel_agd():
    """torchtitan's llama3 debug model with AGD: ``--module torch_agd.integrations.torchtitan
    --config llama3_debugmodel_agd``."""
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    return with_agd(llama3_debugmodel())
