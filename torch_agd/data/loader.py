"""Splits that yield normalised device batches; the small datasets live on the device.

MNIST, Fashion-MNIST and CIFAR fit in device memory as uint8 (CIFAR-10: 150 MB), so a batch is
a gather from a resident tensor plus a few elementwise ops: no DataLoader, no worker
processes, no PIL, no host-to-device copy per step (cf. KellerJordan/cifar10-airbench).

Determinism across process counts: the permutation and every augmentation draw of an epoch
come from one CPU torch.Generator seeded from (seed, epoch), drawn for the whole global batch;
each rank then takes its slice. So N ranks together see exactly the batches that one process
sees, augmentation included, and a resumed run replays an epoch exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..errors import UsageError

CIFAR_PAD = 4  # random crop 32 with 4-pixel zero padding (the paper's CIFAR augmentation)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, epoch); nearby pairs give unrelated streams."""
    digest = hashlib.blake2b(f"torch-agd:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def local_batch_size(batch_size: int, world_size: int, *, name: str = "batch size") -> int:
    """This rank's share of a global batch; the global batch must split evenly. The one owner of
    these rules: the trainer checks its flags with it, ``name`` being the flag."""
    if batch_size < 1:
        raise UsageError(f"{name} must be at least 1, got {batch_size}")
    if batch_size % world_size:
        raise UsageError(f"{name} {batch_size} does not split evenly over {world_size} "
                         f"processes; use a multiple of {world_size}")
    return batch_size // world_size


def check_workers(workers: int) -> None:
    """The rule for the number of data-loading processes (the trainer's --workers)."""
    if workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")


def shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's contiguous share [lo, hi) of n samples; shards tile range(n) exactly."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in range({world_size})")
    return rank * n // world_size, (rank + 1) * n // world_size


class Normalise:
    """uint8 images -> float32 (x / 255 - mean) / std, per channel, as one multiply-subtract."""

    def __init__(self, mean: tuple, std: tuple, device: torch.device | str):
        mean = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        # folded in float64 so the float32 constants are the correctly rounded ones
        self.scale = (1.0 / (255.0 * std)).float().to(device)
        self.shift = (mean / std).float().to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(self.scale).sub_(self.shift)


def crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor,
              pad: int = CIFAR_PAD) -> torch.Tensor:
    """Random crop with zero padding, then horizontal flip, for a whole batch at once.

    x: (B, C, H, W); shifts: (B, 2) integer offsets in [0, 2 * pad] of the crop window in the
    padded image (rows, columns); flips: (B,) bool. Sample i is
    pad(x[i])[:, dy:dy + H, dx:dx + W], mirrored left-right where flips[i]: the same as
    torchvision's RandomCrop(H, padding=pad) then RandomHorizontalFlip, with no loop.
    """
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    # Every crop window of every image, as a view (B, C, 2 pad + 1, 2 pad + 1, H, W); one
    # advanced-indexing gather picks each image's window (4x faster on the CPU than
    # indexing pixels with computed row and column indices).
    windows = padded.unfold(2, H, 1).unfold(3, W, 1)
    crops = windows[torch.arange(B, device=x.device), :, shifts[:, 0], shifts[:, 1]]
    return torch.where(flips.view(B, 1, 1, 1), crops.flip(-1), crops)


class Split:
    """A train or test split that yields (x, y) device batches; see docs/architecture.md."""

    num_samples: int
    train: bool

    def num_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> int:
        """Batches per epoch for this rank (train: the same on every rank)."""
        local = local_batch_size(batch_size, world_size)
        if self.train:
            return self.num_samples // batch_size
        lo, hi = shard(self.num_samples, rank, world_size)
        return -(-(hi - lo) // local)

    def batches(self, batch_size: int, *, epoch: int = 0, seed: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def check_batch_size(self, batch_size: int, *, rank: int = 0, world_size: int = 1,
                         name: str = "batch size") -> int:
        """This rank's share of ``batch_size``, or a UsageError naming ``name`` if no epoch of
        this split can use it; batches() calls it, and the trainer before it starts a run."""
        local = local_batch_size(batch_size, world_size, name=name)
        shard(0, rank, world_size)  # validates rank
        if self.train and batch_size > self.num_samples:
            raise UsageError(f"{name} {batch_size} is larger than the {self.num_samples} "
                             f"training samples; use a smaller batch size")
        return local


class TensorSplit(Split):
    """A split held on the device: images uint8 (N, C, H, W), labels int64 (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple, std: tuple, *,
                 train: bool, augment: bool = False, device: torch.device | str = "cpu"):
        if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"need uint8 images (N, C, H, W) and labels (N,), got "
                             f"{images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.num_samples = len(images)
        self.train = train
        self.augment = augment
        self.normalise = Normalise(mean, std, self.device)

    def batches(self, batch_size: int, *, epoch: int = 0, seed: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # raises now, not at the first next()
        local = self.check_batch_size(batch_size, rank=rank, world_size=world_size)
        if self.train:
            return self._train(batch_size, local, epoch, seed, rank)
        return self._test(local, *shard(self.num_samples, rank, world_size))

    def _train(self, batch_size, local, epoch, seed, rank):
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        steps = self.num_samples // batch_size  # the last partial batch is dropped
        # Everything this epoch draws, for the global batch, in a fixed order; then this
        # rank's columns, moved to the device in one copy each.
        order = torch.randperm(self.num_samples, generator=g)[: steps * batch_size]
        order = order.view(steps, batch_size)
        mine = slice(rank * local, (rank + 1) * local)
        order = order[:, mine].to(self.device)
        if self.augment:
            shifts = torch.randint(0, 2 * CIFAR_PAD + 1, (steps, batch_size, 2), generator=g)
            flips = torch.randint(0, 2, (steps, batch_size), generator=g, dtype=torch.bool)
            shifts, flips = shifts[:, mine].to(self.device), flips[:, mine].to(self.device)
        for i in range(steps):
            x = self.images[order[i]]
            if self.augment:
                x = crop_flip(x, shifts[i], flips[i])
            yield self.normalise(x), self.labels[order[i]]

    def _test(self, local, lo, hi):
        for start in range(lo, hi, local):
            end = min(start + local, hi)
            yield self.normalise(self.images[start:end]), self.labels[start:end]
