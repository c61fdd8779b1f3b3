"""The paper's datasets as train/test splits that yield normalised batches on the device.

    data = load_data("cifar10", default_data_dir(), "cuda")
    for x, y in data.train.batches(128, epoch=0, seed=0): ...

Files are fetched once into the data dir and checked against their published MD5 sums; the
decoded tensors are cached beside them and used while the files stay unchanged. `data.source`
says where a load's data came from. See docs/data.md for where files go and offline use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .files import default_data_dir
from .loader import Split, TensorSplit

__all__ = ["DATASETS", "TEXT", "Data", "DatasetInfo", "Split", "default_data_dir", "load_data"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_shape: tuple  # (C, H, W) of a network input
    mean: tuple      # per-channel normalisation constants (the paper's code)
    std: tuple


# Text as bytes (data/text.py): a "class" is the next byte, an input a window of bytes.
TEXT = ("stdlib", "text")
_MNIST = dict(mean=(0.1307,), std=(0.3081,))
_CIFAR = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), **_MNIST),
    # The paper gives no Fashion-MNIST constants and its code publishes none, so it keeps
    # MNIST's (same format, same role in the paper's code); docs/data.md has its own stats.
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), **_MNIST),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), **_CIFAR),
    # The paper's code has one set of CIFAR constants and uses them for CIFAR-100 too.
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), **_CIFAR),
    "imagenet": DatasetInfo("imagenet", 1000, (3, 224, 224),
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    **{name: DatasetInfo(name, 256, (128,), mean=(), std=()) for name in TEXT},
}


@dataclass
class Data:
    info: DatasetInfo
    train: Split
    test: Split
    # One line (for the user) naming where the data came from: the folder, whether it was found,
    # downloaded or installed by the system, and whether the decoded cache served it.
    source: str = ""


def load_data(name: str, data_dir: str | Path | None = None, device: torch.device | str = "cpu",
              *, download: bool = True, workers: int = 4) -> Data:
    """Load a dataset's train and test splits onto `device`.

    `data_dir` None (or the default data dir) lets a system-installed copy (Debian's
    dataset-fashion-mnist) stand in when the files are absent, and, with $AGD_APT_INSTALL=1,
    lets that copy be installed with apt-get when the download fails; any other data dir is
    used alone. Raises UsageError (one line) for an unknown name, for files that are missing
    and cannot be obtained (saying which files go where), and for a file that fails its
    checksum. `workers` is the number of DataLoader processes, used by imagenet only.
    """
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    # The trainer passes the default dir by value, so "named by the user" means "not the default".
    named = root.absolute() != default_data_dir().absolute()
    device = torch.device(device)
    if name == "imagenet":
        from .imagenet import load_imagenet

        train, test, classes, source = load_imagenet(root, device, info.mean, info.std, workers=workers)
        # A subset tree (ImageNet-100, a test tree) gets a head of the right size.
        info = dataclasses.replace(info, num_classes=len(classes))
        return Data(info, train, test, source)
    if name in TEXT:
        from .text import TextSplit, load_text

        # the default data dir is no text corpus: only a named --data-dir is read for "text"
        train, val, where = load_text(name, root if named else None)
        context = info.in_shape[0]
        return Data(info, TextSplit(train, train=True, context=context, device=device),
                    TextSplit(val, train=False, context=context, device=device),
                    f"{name} from {where}")
    if name in ("mnist", "fashion-mnist"):
        from .mnist import load_idx_dataset
        from .system import apt_install_wanted

        tensors, source = load_idx_dataset(name, root, download_ok=download, system_ok=not named,
                                           apt_ok=apt_install_wanted())
    else:
        from .cifar import load_cifar

        tensors, source = load_cifar(name, root, download_ok=download)
    train_x, train_y, test_x, test_y = tensors
    for x, y in ((train_x, train_y), (test_x, test_y)):
        lo, hi = torch.aminmax(y) if len(y) else (0, 0)  # one pass over the labels
        bad_labels = not 0 <= int(lo) <= int(hi) < info.num_classes
        if tuple(x.shape[1:]) != info.in_shape or bad_labels:
            raise UsageError(f"{name}: the files in {root / name} hold images {tuple(x.shape[1:])} "
                             f"or labels beyond {info.num_classes} classes; replace them")
    # Augmentation (crop + flip) is the paper's for CIFAR; the paper uses none for MNIST.
    augment = name.startswith("cifar")
    norm = dict(mean=info.mean, std=info.std, device=device)
    return Data(info,
                TensorSplit(train_x, train_y, train=True, augment=augment, **norm),
                TensorSplit(test_x, test_y, train=False, **norm),
                source)
