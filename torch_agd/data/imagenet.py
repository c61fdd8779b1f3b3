"""ImageNet: an ImageFolder tree (train/ and val/, one folder per class) read by a DataLoader.

ImageNet does not fit in device memory, so JPEGs are decoded by `workers` processes with the
standard transforms (train: random-resized crop 224 + flip; test: resize 256 + centre crop
224). Workers hand back uint8 tensors, which cross to the device at a quarter of the float32
size and are normalised there, in float32, like the device-resident splits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import UsageError
from .loader import Normalise, Split, check_workers, epoch_seed, shard

ENV = "IMAGENET_PATH"


def find_imagenet(data_dir: Path) -> Path:
    """The first of data_dir, data_dir/imagenet, $IMAGENET_PATH that holds train/ and val/."""
    candidates = [data_dir, data_dir / "imagenet"]
    if os.environ.get(ENV):
        candidates.append(Path(os.environ[ENV]).expanduser())
    for root in candidates:
        if (root / "train").is_dir() and (root / "val").is_dir():
            return root
    raise UsageError(
        f"imagenet: no train/ and val/ ImageFolder tree (one sub-folder per class in each) in "
        f"{' or '.join(str(c) for c in candidates)}; pass --data-dir DIR or set ${ENV}"
    )


def load_imagenet(data_dir: Path, device, mean: tuple, std: tuple, *, workers: int):
    """(train Split, test Split, classes, source line) for the tree found by find_imagenet."""
    try:
        from torchvision import datasets, transforms as T
    except ImportError:
        raise UsageError('imagenet needs torchvision: pip install "torch-agd[train]"') from None
    check_workers(workers)
    root = find_imagenet(data_dir)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor()])
    test_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    try:
        train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        test = datasets.ImageFolder(str(root / "val"), transform=test_tf)
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"imagenet: {e}; train/ and val/ need one sub-folder of images per "
                         f"class (reorganise val/ by class if it is flat)") from None
    if train.classes != test.classes:
        raise UsageError(f"imagenet: {root / 'train'} has {len(train.classes)} classes and "
                         f"{root / 'val'} {len(test.classes)}, or they differ in name; "
                         f"both need the same class folders")
    normalise = Normalise(mean, std, device)
    source = (f"imagenet from {root} ({len(train)} training and {len(test)} test images in "
              f"{len(train.classes)} classes, decoded by {workers or 'no'} worker processes)")
    return (FolderSplit(train, normalise, device, train=True, workers=workers),
            FolderSplit(test, normalise, device, train=False, workers=workers),
            train.classes, source)


class FolderSplit(Split):
    """A torch Dataset of uint8 images read by DataLoader workers, batches on the device."""

    def __init__(self, dataset, normalise: Normalise, device, *, train: bool, workers: int):
        self.dataset = dataset
        self.normalise = normalise
        self.device = torch.device(device)
        self.num_samples = len(dataset)
        self.train = train
        self.workers = workers

    def num_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> int:
        if self.train:  # DistributedSampler(drop_last=True) gives each rank n // N samples
            return (self.num_samples // world_size) // (batch_size // world_size)
        return super().num_batches(batch_size, rank=rank, world_size=world_size)

    def batches(self, batch_size: int, *, epoch: int = 0, seed: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        local = self.check_batch_size(batch_size, rank=rank, world_size=world_size)
        # Seeds the shuffle (one process) and the workers' augmentation draws.
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        common = dict(batch_size=local, num_workers=self.workers, generator=g,
                      pin_memory=self.device.type == "cuda")
        if self.train and world_size > 1:
            sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank,
                                         shuffle=True, seed=seed, drop_last=True)
            sampler.set_epoch(epoch)
            loader = DataLoader(self.dataset, sampler=sampler, drop_last=True, **common)
        elif self.train:
            loader = DataLoader(self.dataset, shuffle=True, drop_last=True, **common)
        else:  # contiguous shard, no padding: every image is evaluated exactly once overall
            lo, hi = shard(self.num_samples, rank, world_size)
            loader = DataLoader(Subset(self.dataset, range(lo, hi)), shuffle=False, **common)
        return self._to_device(loader)

    def _to_device(self, loader):
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield self.normalise(x), y
