"""CIFAR-10 and CIFAR-100: the "python version" archives, extracted once, read as uint8 tensors.

Each archive holds pickled dicts (written by Python 2) with b"data", a (n, 3072) uint8 array
in channel-major order, and the labels. Every batch file is checked against its published MD5
before it is unpickled: only the official bytes are ever fed to pickle.

The tables are module-level so that tests can point them at archives they write.
"""

from __future__ import annotations

import io
import pickle
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from ..atomic import atomic_write_bytes
from .cache import CACHE_NAME, load_or_build
from .files import fetch_missing, read_verified


@dataclass(frozen=True)
class Archive:
    filename: str            # the .tar.gz as published
    md5: str
    folder: str              # the folder inside the archive (and in the data dir)
    train: dict[str, str]    # batch file -> md5, in order
    test: dict[str, str]
    label_key: bytes         # CIFAR-100 has coarse and fine labels; the paper uses fine


# The same archives and sums as torchvision.datasets.CIFAR10 / CIFAR100.
ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive(
        filename="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        },
        test={"test_batch": "40351d587109b95175f43aff81a1287e"},
        label_key=b"labels",
    ),
    "cifar100": Archive(
        filename="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train={"train": "16019d7e3df5f24257cddd939b257f8d"},
        test={"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        label_key=b"fine_labels",
    ),
}

MIRRORS: dict[str, list[str]] = {
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
}


def load_cifar(name: str, root: Path, *, download_ok: bool):
    """((train_x, train_y, test_x, test_y), source): uint8 images (N, 3, 32, 32) and int64
    labels on the CPU, and one line saying where they came from.

    Batch files live in root/name/<folder>/; when some are missing they are extracted from
    root/name/<archive>, which is downloaded first when absent and download_ok. The decoded
    tensors are cached (cache.py), so later loads skip unpickling and checksums.
    """
    spec, mirrors = ARCHIVES[name], MIRRORS[name]
    directory = root / name
    folder = directory / spec.folder
    members = {**spec.train, **spec.test}
    absent = [m for m in members if not (folder / m).is_file()]
    origin = ""
    if absent:
        archive = directory / spec.filename
        origin = f" (extracted just now from {archive})"
        if not archive.is_file():
            fetch_missing(name, directory, {spec.filename: spec.md5}, mirrors, download_ok=download_ok)
            origin = f" (extracted just now from {archive}, downloaded just now)"
        data = read_verified(archive, spec.md5, fix=f"delete it and run again to download it "
                             f"afresh, or replace it with {mirrors[0]}{spec.filename}")
        _extract(data, archive, spec.folder, absent, folder)

    def read(members: dict[str, str]):
        xs, ys = [], []
        for member, md5 in members.items():
            path = folder / member
            data = read_verified(path, md5, fix=f"delete it and run again to extract it afresh "
                                 f"from {directory / spec.filename}")
            x, y = parse_batch(data, path, spec.label_key)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    sources = {folder / m: {"md5": md5} for m, md5 in members.items()}
    cached = load_or_build(directory / CACHE_NAME, sources, lambda: (*read(spec.train), *read(spec.test)))
    return cached.tensors, f"{name} from {folder}{origin}; {cached.note}"


def _extract(data: bytes, archive: Path, inner: str, members: list[str], folder: Path) -> None:
    """Write the named members of the verified archive bytes into folder, each atomically.

    Members are read by name and written by us (not tarfile.extract), so no path inside the
    archive can write outside folder.
    """
    print(f"extracting {archive} -> {folder}", file=sys.stderr, flush=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in members:
                f = tar.extractfile(f"{inner}/{member}")
                if f is None:
                    raise KeyError(member)
                atomic_write_bytes(folder / member, f.read())
    except (KeyError, tarfile.TarError, OSError, EOFError) as e:
        raise UsageError(f"{archive} does not hold {inner}/{members} ({type(e).__name__}: {e}); "
                         f"delete it and run again to download it afresh") from None


def parse_batch(data: bytes, path: Path | str, label_key: bytes):
    """One CIFAR batch pickle -> uint8 images (n, 3, 32, 32) and int64 labels (n,)."""
    try:
        import numpy as np  # the pickles hold numpy arrays; numpy comes with torchvision
    except ImportError:
        raise UsageError('reading CIFAR needs numpy: pip install "torch-agd[train]"') from None
    try:
        batch = pickle.loads(data, encoding="bytes")
        images = np.ascontiguousarray(batch[b"data"], dtype=np.uint8)
        labels = torch.as_tensor(list(batch[label_key]), dtype=torch.int64)
        images = images.reshape(len(labels), 3, 32, 32)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise UsageError(f"{path} is not a CIFAR batch ({type(e).__name__}: {e}); "
                         f"delete it and run again") from None
    return torch.from_numpy(images), labels
