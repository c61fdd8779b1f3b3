"""`agd train --fsdp --optimizer agd` builds the model on the meta device (docs/distributed.md,
"Building on the meta device").

The whole model is never allocated: its constructors run on the meta device (shapes only),
fully_shard replaces the parameters with DTensor shards, `to_empty` allocates only this rank's
shards, and init_weights_ draws every number of the whole init but keeps only this rank's rows
(torch_agd/optim/orthogonal.py). What init_weights_ leaves alone is set again here: BatchNorm's
running statistics, and whatever a model of this project rebuilds in its `reset_constants()`
(CharLM: its positional parameter and causal mask). A model holding anything else that its
constructor sets (a buffer, a positional table drawn at random) is built whole, as before, and
`why_not` says why in one line; so are timm's and Hugging Face's models (run.py), whose
constructors may draw fewer numbers on the meta device (hf:gpt2 does).

The weights come out bitwise those of a build on the CPU followed by init_weights_, from the same
seed: a CPU build draws numbers in the constructors (torch's default init, which AGD's then
overwrites), which moves the generator; `Draws` draws as many numbers on the CPU while the meta
build runs, so that init_weights_ starts from the same generator state.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

CHUNK = 1 << 20  # numbers per draw when replaying uniform_ and normal_ (a multiple of 16)


def _draws(func) -> bool:
    """Whether an aten op takes a generator: the random ops."""
    return any("Generator" in str(arg.type) for arg in func._schema.arguments)


def _on_meta(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type == "meta"
    if isinstance(value, (list, tuple)):
        return any(_on_meta(v) for v in value)
    return isinstance(value, torch.device) and value.type == "meta"


def _on_cpu(value):
    """``value`` with every meta tensor replaced by a CPU one like it (ones: a valid probability,
    standard deviation or weight for any random op) and the meta device by the CPU."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return torch.ones_like(value, device="cpu")  # the same strides: a kernel may depend on them
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    if isinstance(value, torch.device) and value.type == "meta":
        return torch.device("cpu")
    return value


def _drain_uniform(t: torch.Tensor, low: float, high: float, generator) -> None:
    # The CPU kernel draws one number per element, one element after another: chunks draw alike.
    for start in range(0, t.numel(), CHUNK):
        chunk = torch.empty(min(CHUNK, t.numel() - start), dtype=t.dtype, device="cpu")
        chunk.uniform_(low, high, generator=generator)


def _drain_normal(t: torch.Tensor, generator) -> None:
    # The CPU kernel for 16 or more contiguous numbers draws one uniform each, plus 16 when the
    # count is not a multiple of 16 (see torch_agd/optim/orthogonal.py, normal_stream).
    n = t.numel()
    main = n - n % 16
    for start in range(0, main, CHUNK):
        torch.empty(min(CHUNK, main - start), dtype=t.dtype, device="cpu").normal_(generator=generator)
    if n % 16:
        torch.empty(n % 16, dtype=t.dtype, device="cpu").uniform_(generator=generator)
        torch.empty(16, dtype=t.dtype, device="cpu").normal_(generator=generator)


class Draws(TorchDispatchMode):
    """While a model is built on the meta device: every random op on a meta tensor is run on a
    CPU tensor like it, drawing from the same generator, and the result thrown away, so that the
    generator moves as a CPU build would move it. uniform_ and normal_ (torch.nn.init's, for every
    layer of torch.nn) draw a chunk at a time; other random ops draw a whole tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _draws(func) and (_on_meta(args) or _on_meta(tuple(kwargs.values()))):
            self.replay(func, args, kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def replay(func, args, kwargs) -> None:
        name = func.overloadpacket.__name__
        target, generator = args[0] if args else None, kwargs.get("generator")
        chunked = isinstance(target, torch.Tensor) and target.numel() >= 16 and target.is_contiguous()
        if name == "uniform_" and isinstance(target, torch.Tensor):
            low = args[1] if len(args) > 1 else kwargs.get("from", 0.0)
            high = args[2] if len(args) > 2 else kwargs.get("to", 1.0)
            _drain_uniform(target, low, high, generator)
        elif name == "normal_" and chunked:
            _drain_normal(target, generator)
        else:
            func(*_on_cpu(tuple(args)), **{k: _on_cpu(v) for k, v in kwargs.items()})


@contextlib.contextmanager
def _watching_trunc_normal(seen: list):
    """torch.nn.init.trunc_normal_ rejects and redraws the numbers outside its bounds, so how many
    it draws depends on their values, which a meta tensor has none of (it returns at once): a
    build that calls it cannot move the generator as a CPU build does. Noted here, by its name."""
    real = torch.nn.init._no_grad_trunc_normal_

    def watched(tensor, *args, **kwargs):
        if tensor.is_meta:
            seen.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    torch.nn.init._no_grad_trunc_normal_ = watched
    try:
        yield
    finally:
        torch.nn.init._no_grad_trunc_normal_ = real


def build_on_meta(build: Callable[[], nn.Module]) -> tuple[nn.Module, str | None]:
    """``build()`` on the meta device, the generator moved as a CPU build moves it; and why the
    generator could not be kept in step (one line), or None."""
    truncated: list = []
    with torch.device("meta"), Draws(), _watching_trunc_normal(truncated):
        model = build()
    why = None
    if truncated:
        why = (f"its constructor draws a {truncated[0]} tensor with trunc_normal_, whose count of numbers drawn "
               "depends on their values, so the generator cannot be kept in step on the meta device")
    return model, why


def _kept(model: nn.Module) -> set[str]:
    """The names of the parameters whose value AGD's init keeps from the constructor."""
    from torch_agd.optim.rules import group_rule, module_param_groups

    return {name for group in module_param_groups(model) if group_rule(group).keeps_module_init
            for name, _ in group["params"]}


def why_not(model: nn.Module) -> str | None:
    """None if, after to_empty, everything init_weights_ does not set can be set again here;
    otherwise the first tensor that cannot, in one line."""
    kept = _kept(model)
    for prefix, module in model.named_modules():
        if callable(getattr(module, "reset_constants", None)):
            continue
        where = f"{prefix or 'the model'} ({type(module).__name__})"
        batchnorm = isinstance(module, nn.modules.batchnorm._NormBase)  # reset_running_stats rebuilds them
        buffers = [] if batchnorm else list(module.named_buffers(recurse=False))
        if buffers:
            return f"{where} holds the buffer {buffers[0][0]!r}, which its constructor sets"
        for attr, _ in module.named_parameters(recurse=False):
            if (f"{prefix}.{attr}" if prefix else attr) in kept:
                return f"{where} holds {attr!r}, which AGD's init leaves as its constructor set it"
    return None


def reset_constants_(model: nn.Module) -> None:
    """After to_empty: BatchNorm's running statistics, and each module's reset_constants()."""
    for module in model.modules():
        if callable(getattr(module, "reset_constants", None)):
            module.reset_constants()
        elif isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            module.reset_running_stats()
