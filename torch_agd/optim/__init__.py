"""The AGD optimizer package: `import torch_agd.optim` needs torch alone.

    optimizer.py    AGD, the torch.optim.Optimizer
    functional.py   agd(...), the step as a function of lists of tensors (loop and foreach paths)
    rules.py        one class per kind of parameter, and the registry from module types to rules
    blocks.py       how a tensor is cut into blocks; how a bias joins its layer's
    depth.py        L along a module's residual path
    init.py         init_weights_: orthogonal, scaled blocks (orthogonal.py draws them)
    foreach_plan.py the batched path's layout of block norms, worked out once per set of shapes
    cpu_kernels.py  CPU-only kernels of the batched path
    sharding.py     DTensor parameters (FSDP2, TP): what is held here, one all-reduce
    orthogonalize.py direction="orthogonal": each matrix block's direction by Newton–Schulz, ~ U Vᵀ
    reference.py    a literal per-block transcription of the paper, for tests and checks
"""
from .functional import agd
from .init import init_weights_
from .optimizer import AGD
from .rules import Rule, register_rule

__all__ = ["AGD", "agd", "init_weights_", "register_rule", "Rule"]
