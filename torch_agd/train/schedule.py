"""``--schedule none|linear|cosine`` and ``--warmup N``: one lr multiplier for every optimizer alike.

The multiplier scales each param group's ``lr`` through torch's LambdaLR, stepped once per
optimizer step. For a baseline that is its learning rate; for AGD, Prodigy and D-Adaptation
``lr`` is already a multiplier on the step they choose (1 by default), so the schedule scales
their steps the same way. Step t (0-based) of a run of T steps runs at
    t < W (warmup):  (t + 1) / W           (no step is wasted at lr 0)
    then, with p = (t - W) / (T - W) in [0, 1):
    none:   1          linear: 1 - p          cosine: (1 + cos(pi p)) / 2
so the multiplier reaches 0 exactly after the last step. T is the run's step budget: --steps,
or --epochs times the batches per epoch.
"""

from __future__ import annotations

import math
from typing import Callable

from torch.optim.lr_scheduler import LambdaLR

from torch_agd.errors import UsageError

SCHEDULES = ("none", "linear", "cosine")


def multiplier(schedule: str, total: int, warmup: int = 0) -> Callable[[int], float]:
    """The lr multiplier of step t (0-based) of a run of ``total`` steps (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup < 0:
        raise UsageError(f"--warmup must be 0 or more steps, got {warmup}")
    if warmup and warmup >= total:
        raise UsageError(f"--warmup {warmup} leaves none of the run's {total} steps to decay over; "
                         "warm up for fewer steps")

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if schedule == "none":
            return 1.0
        p = min((t - warmup) / (total - warmup), 1.0)
        return 1.0 - p if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))

    return factor  # a plain function: LambdaLR's state_dict leaves it out, the config rebuilds it


def build_scheduler(optimizer, schedule: str, total: int, warmup: int = 0) -> LambdaLR | None:
    """The LambdaLR of ``--schedule``/``--warmup`` over ``optimizer``, or None for none without
    warmup (the run then steps exactly as before the flags existed). Build it before loading the
    optimizer's state on resume: it sets every group's lr to base lr x multiplier(0)."""
    factor = multiplier(schedule, total, warmup)
    if schedule == "none" and warmup == 0:
        return None
    return LambdaLR(optimizer, factor)
