"""The trainer behind `agd train`: a run directory from flags (see docs/trainer.md).

Importing this package needs torch alone; data, tqdm and torchvision are imported when a
run starts.
"""

from torch_agd.train.dist import DistEnv
from torch_agd.train.loop import LOSSES, evaluate, mse_loss, train_epoch
from torch_agd.train.optimizers import OPTIMIZERS, build_optimizer

__all__ = ["DistEnv", "LOSSES", "OPTIMIZERS", "build_optimizer", "evaluate", "mse_loss", "train_epoch"]
