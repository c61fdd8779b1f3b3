"""``--optimizer muon``: torch.optim.Muon on the hidden weight matrices, AdamW on the rest, as one
torch Optimizer (MuonWithAdamW) that schedulers, checkpoints and resume treat like any other.

Which parameters are "hidden matrices" comes from the model's structure, not from names: the
parameters whose AGD rule (torch_agd.optim.rules, by module type) is a matrix of a linear map
(kinds weight, weight_t, attention, stacked, stacked_t), less the output head's. Embeddings
(embedding, tied), norms and gains, biases and raw parameters (positional embeddings, class
tokens) go to AdamW, as Muon's authors prescribe.

The output head is found by running the model once, in eval mode and without gradients, on one
example input (``example``: what a training batch of one looks like; the trainer makes it from
the dataset): forward hooks on every module that owns a linear map's weight record which one
finished last, and that module is the head. This is the "last linear map before the output"
whatever the modules' registration order or names, and it covers a tied head (a Linear sharing
the embedding's table: AdamW already holds it) and Hugging Face and timm models alike. As a
check, the head's output width must equal the model output's last dimension (the classes or the
vocabulary); a model whose last linear map does not produce its output is refused in one line
rather than guessed at.

Shapes torch.optim.Muon does not take (it takes 2-D (out, in) tensors only) go to MatrixMuon,
which runs the same step with torch's own Newton-Schulz iteration and lr adjustment on each
linear map the tensor holds, as a 2-D (out, in) matrix:
- a conv filter (out, in/g, k...) is flattened to (out, in/g * k...), each filter a row, as
  Muon's authors run convolutions; a grouped conv is g such matrices, one per group (its map is
  block-diagonal; flattening the whole tensor would mix the groups' blocks);
- a transposed layout (ConvTranspose, Hugging Face's Conv1D: weight_t) is transposed first, so
  that the lr adjustment sees (fan-out, fan-in) as for any other layer;
- a packed (3d, d) attention in_proj_weight is q, k and v, three (d, d) matrices, each
  orthogonalised on its own (Muon's authors found separate q, k, v better);
- stacked experts (E, out, in) are E matrices (stacked_t (E, in, out) transposed first).
Momentum and weight decay are elementwise, so they run on the whole tensor exactly as torch's
step does; a plain 2-D weight goes to torch.optim.Muon itself.

The Newton-Schulz precision (``ns_dtype``, --muon-ns-dtype): torch's iteration runs in bfloat16,
fast on a GPU but slow on a CPU without bfloat16 matrix units: on this project's 2-core CPU one
512 x 4608 filter bank of a ResNet-18 takes 12 s in bfloat16 (a float32 matmul of that size is
8 times faster than a bfloat16 one), about a minute a step for the whole network. "float32" runs
the same quintic (Jordan et al.'s coefficients, 5 steps, X first divided by its Frobenius norm)
in float32 with torch_agd.optim.orthogonalize.newton_schulz, on every hidden matrix (the 2-D
ones too, through MatrixMuon): a baseline at least as precise, not a different method.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torch_agd.errors import UsageError
from torch_agd.optim.orthogonalize import NS_COEFFICIENTS, newton_schulz
from torch_agd.optim.rules import Tied, Weight, group_rule, module_param_groups, rule_for

# torch.optim.Muon's defaults: Keller Jordan's Newton-Schulz coefficients, 5 steps, momentum 0.95
# with Nesterov. Only the learning rate, its adjustment and the weight decay are set here.
ADJUST_LR = ("original", "match_rms_adamw")  # --muon-adjust-lr: torch's default, Moonshot's
# --lr without a value: Keller Jordan's 0.02 at torch's default adjustment; at match_rms_adamw
# the update has AdamW's RMS, so AdamW's default lr (Moonshot reuse AdamW's tuned lr).
DEFAULT_MUON_LR = {"original": 0.02, "match_rms_adamw": 1e-3}
NS_DTYPES = ("bfloat16", "float32")  # --muon-ns-dtype: torch's own, or float32 (fast on a CPU)


def check_ns_dtype(ns_dtype: str) -> None:
    """A one-line UsageError unless ``ns_dtype`` is one of NS_DTYPES: the one check for the flag,
    whether it reaches MuonWithAdamW (which may build no MatrixMuon) or a MatrixMuon param group."""
    if ns_dtype not in NS_DTYPES:
        raise UsageError(f"--muon-ns-dtype must be one of {', '.join(NS_DTYPES)}, got {ns_dtype!r}")


def _torch_muon():
    """torch's Muon module (torch.optim._muon, torch >= 2.9): its Newton-Schulz iteration, lr
    adjustment and default coefficients, used as they are; or a one-line UsageError."""
    try:
        return importlib.import_module("torch.optim._muon")
    except ImportError:
        raise UsageError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); this is torch "
                         f"{torch.__version__}") from None


class MatrixMuon(Optimizer):
    """torch.optim.Muon's step for tensors that hold their linear maps in another layout than one
    2-D (out, in) matrix: conv filters, transposed weights, packed attention, stacked experts.
    Each param group names the AGD ``kind`` of its tensors (and ``conv_groups``). Per tensor, as
    torch's ``_single_tensor_muon``: the momentum buffer and the Nesterov mix on the whole tensor,
    torch's Newton-Schulz on each of its matrices (the kind's Rule.flat_matrices), torch's lr adjustment for one
    matrix's shape (all of a tensor's matrices have one shape), decoupled weight decay, update.
    ``ns_dtype`` "float32" runs the iteration in float32 (see the module's docstring)."""

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, adjust_lr_fn: str | None = None, ns_dtype: str = "bfloat16"):
        tm = _torch_muon()
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=(tm.DEFAULT_A, tm.DEFAULT_B, tm.DEFAULT_C), eps=tm.EPS, ns_steps=tm.DEFAULT_NS_STEPS,
                        adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, kind="weight", conv_groups=1)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict) -> None:
        """Each group's own values, not only the defaults: whether built here, added later or
        read from a checkpoint (step would otherwise run torch's bfloat16 branch without a word)."""
        ns_dtype = group.get("ns_dtype", "bfloat16")  # a checkpoint from before ns_dtype existed
        check_ns_dtype(ns_dtype)
        if ns_dtype == "float32" and tuple(group["ns_coefficients"]) != NS_COEFFICIENTS:
            raise ValueError("MatrixMuon's float32 iteration has Jordan et al.'s coefficients only")
        rule = rule_for(group["kind"], group["conv_groups"])
        if not rule.matrix:
            raise ValueError(f"MatrixMuon takes the kinds of matrix rules, not {group['kind']!r}")
        for p in group["params"]:
            rule.flat_matrices(p)  # a shape it cannot cut fails here

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # fills in the defaults first
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # a refused group is not kept
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        # checked before anything is loaded, so a refused checkpoint leaves this optimizer as it was;
        # torch's own load refuses a group count or size that does not match
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            self._check_group({**saved, "params": group["params"]})
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        tm = _torch_muon()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            rule = rule_for(group["kind"], group["conv_groups"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                matrices = rule.flat_matrices(update)
                # (.get: a checkpoint saved before ns_dtype existed ran torch's bfloat16 iteration)
                if group.get("ns_dtype", "bfloat16") == "float32":  # the tensor's matrices in one batch
                    ortho = newton_schulz(matrices.float(), group["ns_steps"]).to(matrices.dtype)
                else:
                    ortho = torch.stack([tm._zeropower_via_newtonschulz(m, group["ns_coefficients"], group["ns_steps"],
                                                                        group["eps"]) for m in matrices.unbind(0)])
                adjusted = tm._adjust_lr(lr, group["adjust_lr_fn"], ortho.shape[1:])
                p.mul_(1 - lr * decay)
                p.add_(rule.from_flat_matrices(ortho, p), alpha=-adjusted)
        return loss


# ---------------------------------------------------------------- which parameters get Muon


class MuonSplit(NamedTuple):
    """The parameters of a model by optimizer, each as (name, tensor): ``muon`` the 2-D (out, in)
    hidden weights (torch.optim.Muon), ``matrix`` the other hidden matrices as (name, tensor,
    kind, conv_groups) (MatrixMuon), ``adamw`` the rest; ``head`` the output head module's name."""

    muon: list[tuple[str, Tensor]]
    matrix: list[tuple[str, Tensor, str, int]]
    adamw: list[tuple[str, Tensor]]
    head: str


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)  # a Hugging Face ModelOutput
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def output_head(model: nn.Module, example: Tensor) -> str:
    """The name of the module that computes ``model``'s output: of the modules owning a linear
    map's weight (a matrix or tied AGD rule), the one whose forward finished last on ``example``
    (run once in eval mode without gradients, the random state left as it was). A one-line
    UsageError if that module's output width is not the model output's last dimension."""
    kinds = {id(p): (g["kind"], g.get("conv_groups", 1)) for g in module_param_groups(model) for _, p in g["params"]}
    maps = {}  # module name -> (module, weight, kind, groups) of the linear map it owns
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            kind, groups = kinds[id(p)]
            rule = rule_for(kind, groups)
            if rule.matrix or isinstance(rule, Tied):
                maps.setdefault(name, (module, p, kind, groups))
    finished: list[str] = []
    hooks = [module.register_forward_hook(lambda *_, name=name: finished.append(name))
             for name, (module, *_rest) in maps.items()]
    training = model.training
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            output = _first_tensor(model.eval()(example.to(device)))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    if not finished:
        raise UsageError("--optimizer muon cannot find the output head: no linear layer ran in a forward pass")
    if output is None:
        raise UsageError("--optimizer muon cannot find the output head: the model's output is not a tensor")
    head = finished[-1]
    module, weight, kind, groups = maps[head]
    width = rule_for(kind, groups).out_width(tuple(weight.shape))
    if width != output.shape[-1]:
        raise UsageError(f"--optimizer muon cannot find the output head: the last linear layer to run, {head or 'the model'} "
                         f"({type(module).__name__}), has {width} outputs but the model gives {output.shape[-1]}")
    return head


def muon_split(model: nn.Module, example: Tensor) -> MuonSplit:
    """``model``'s parameters by optimizer (see MuonSplit and the module docstring)."""
    head = output_head(model, example)
    head_params = {id(p) for p in model.get_submodule(head).parameters(recurse=False)}
    muon, matrix, adamw = [], [], []
    for group in module_param_groups(model):
        kind, groups, rule = group["kind"], group.get("conv_groups", 1), group_rule(group)
        for name, p in group["params"]:
            if not rule.matrix or id(p) in head_params:
                adamw.append((name, p))
            elif type(rule) is Weight and groups == 1 and p.dim() == 2:  # a plain (out, in) weight
                muon.append((name, p))
            else:
                matrix.append((name, p, kind, groups))
    order = {id(p): i for i, p in enumerate(model.parameters())}  # each list in the model's own order
    for part in (muon, matrix, adamw):
        part.sort(key=lambda item: order[id(item[1])])
    return MuonSplit(muon, matrix, adamw, head)


def example_input(info) -> Tensor:
    """One input of the dataset ``info`` describes, as the trainer feeds the model: a (1, T)
    sequence of token ids for text, a (1, C, H, W) image of zeros otherwise."""
    from torch_agd.data import TEXT

    if info.name in TEXT:
        return torch.zeros(1, *info.in_shape, dtype=torch.long)
    return torch.zeros(1, *info.in_shape)
