"""Tiny datasets in the real on-disk formats, for tests that must not touch the network.

    w = write_mnist_idx(tmp_path / "mnist", n_train=64, n_test=16, seed=0)   # 4 IDX .gz files
    w = write_cifar_tar(tmp_path / "cifar10", "cifar10", n_train=50, n_test=10)
    write_imagefolder(tmp_path / "train", classes=3, per_class=4)            # JPEG tree

Each writer returns what it wrote (tensors and MD5 sums). The install_* helpers also point
torch_agd.data's checksum tables at the fake files (through pytest's monkeypatch) so that
load_data(name, data_dir, download=False) loads them:

    install_fake_idx(monkeypatch, tmp_path, "fashion-mnist", n_train=256, n_test=64)
    data = load_data("fashion-mnist", tmp_path, "cpu", download=False)
    install_fake_system_copy(monkeypatch, tmp_path / "usr-share")   # a stand-in for Debian's copy
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from torch_agd.data import cifar, mnist
from torch_agd.data.system import SystemCopy


@dataclass
class Written:
    md5: dict[str, str]                    # file name -> MD5 of the bytes written
    train_x: torch.Tensor                  # uint8 (N, C, H, W)
    train_y: torch.Tensor                  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    archive: cifar.Archive | None = None   # CIFAR: the table entry that describes the files
    paths: dict[str, Path] = field(default_factory=dict)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _images(g: torch.Generator, n: int, shape: tuple, num_classes: int):
    return (torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
            torch.randint(0, num_classes, (n,), generator=g))


def idx_bytes(t: torch.Tensor) -> bytes:
    """A uint8 tensor as an IDX file: magic 0x0000 08 ndim, big-endian dims, raw bytes."""
    header = bytes([0, 0, 0x08, t.ndim]) + struct.pack(f">{t.ndim}I", *t.shape)
    return header + t.contiguous().numpy().tobytes()


def write_mnist_idx(directory: Path, n_train: int, n_test: int, seed: int = 0, *,
                    hw: tuple = (28, 28), num_classes: int = 10) -> Written:
    """The four gzipped IDX files of an (Fashion-)MNIST-like dataset, in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    train_x, train_y = _images(g, n_train, hw, num_classes)
    test_x, test_y = _images(g, n_test, hw, num_classes)
    w = Written({}, train_x.unsqueeze(1), train_y, test_x.unsqueeze(1), test_y)
    for name, t in ((mnist.TRAIN_IMAGES, train_x), (mnist.TRAIN_LABELS, train_y.to(torch.uint8)),
                    (mnist.TEST_IMAGES, test_x), (mnist.TEST_LABELS, test_y.to(torch.uint8))):
        data = gzip.compress(idx_bytes(t), mtime=0)
        (directory / name).write_bytes(data)
        w.md5[name] = _md5(data)
        w.paths[name] = directory / name
    return w


def _cifar_pickle(x: torch.Tensor, y: torch.Tensor, which: str, label: str) -> bytes:
    batch = {b"batch_label": label.encode(), b"data": x.reshape(len(x), -1).numpy(),
             b"filenames": [f"img_{i}.png".encode() for i in range(len(x))]}
    if which == "cifar100":
        batch[b"fine_labels"] = y.tolist()
        batch[b"coarse_labels"] = (y // 5).tolist()
    else:
        batch[b"labels"] = y.tolist()
    data = pickle.dumps(batch, protocol=2)
    # The published pickles (Python 2, numpy 1) name numpy.core; numpy 2 writes numpy._core.
    # Rewrite it so the loader is tested on the name the real files use.
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar_tar(directory: Path, which: str, n_train: int, n_test: int, seed: int = 0
                    ) -> Written:
    """A cifar-10/100-python.tar.gz like the published one (batch pickles in a folder).

    The returned .archive is a cifar.Archive with this archive's MD5 sums, ready to
    monkeypatch into cifar.ARCHIVES[which].
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    real = cifar.ARCHIVES[which]
    classes = 100 if which == "cifar100" else 10
    g = torch.Generator().manual_seed(seed)
    train_x, train_y = _images(g, n_train, (3, 32, 32), classes)
    test_x, test_y = _images(g, n_test, (3, 32, 32), classes)
    # CIFAR-10 splits its training set over 5 files; CIFAR-100 has one.
    members, md5 = {}, {}
    chunks = list(zip(torch.tensor_split(train_x, len(real.train)),
                      torch.tensor_split(train_y, len(real.train))))
    for name, (x, y) in zip(real.train, chunks):
        members[name] = _cifar_pickle(x, y, which, name)
    (test_name,) = real.test
    members[test_name] = _cifar_pickle(test_x, test_y, which, test_name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{real.folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        meta = b"not read by the loader"
        info = tarfile.TarInfo(f"{real.folder}/batches.meta")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    archive_bytes = buf.getvalue()
    (directory / real.filename).write_bytes(archive_bytes)
    md5 = {name: _md5(data) for name, data in members.items()}
    md5[real.filename] = _md5(archive_bytes)
    archive = cifar.Archive(real.filename, md5[real.filename], real.folder,
                            {k: md5[k] for k in real.train}, {test_name: md5[test_name]},
                            real.label_key)
    return Written(md5, train_x, train_y, test_x, test_y, archive,
                   {real.filename: directory / real.filename})


def write_imagefolder(directory: Path, classes, per_class: int, *, size: tuple = (48, 40),
                      seed: int = 0) -> list[Path]:
    """directory/<class>/<i>.jpg: `per_class` random JPEGs (width, height = size) per class.

    classes: a list of folder names, or a count (class_0, class_1, ...).
    """
    from PIL import Image

    if isinstance(classes, int):
        classes = [f"class_{i}" for i in range(classes)]
    g = torch.Generator().manual_seed(seed)
    paths = []
    for name in classes:
        (Path(directory) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
            path = Path(directory) / name / f"{i}.jpg"
            Image.fromarray(pixels.numpy()).save(path, quality=90)
            paths.append(path)
    return paths


def install_fake_idx(monkeypatch, data_dir: Path, name: str = "fashion-mnist",
                     n_train: int = 256, n_test: int = 64, seed: int = 0) -> Written:
    """Write fake IDX files into data_dir/name and make load_data accept only them."""
    w = write_mnist_idx(Path(data_dir) / name, n_train, n_test, seed)
    monkeypatch.setitem(mnist.MD5, name, dict(w.md5))
    monkeypatch.setitem(mnist.RAW_MD5, name, {})
    monkeypatch.setitem(mnist.SYSTEM_DIRS, name, [])
    monkeypatch.setitem(mnist.MIRRORS, name, ["http://127.0.0.1:9/unreachable/"])
    return w


def install_fake_system_copy(monkeypatch, directory: Path, name: str = "fashion-mnist",
                             n_train: int = 64, n_test: int = 16, seed: int = 0,
                             package: str = "dataset-fake", staging: Path | None = None) -> Written:
    """Make `directory` the system copy of `name` (as /usr/share/datasets/fashion-mnist is
    Debian's), with fake IDX files and unreachable mirrors. With `staging`, the files are
    written there instead, and `directory` stays empty: a package not installed yet (a fake
    apt-get can copy them in)."""
    staged = write_mnist_idx(Path(staging or directory), n_train, n_test, seed)
    monkeypatch.setitem(mnist.MD5, name, dict(staged.md5))
    monkeypatch.setitem(mnist.RAW_MD5, name, {})
    monkeypatch.setitem(mnist.SYSTEM_DIRS, name, [SystemCopy(Path(directory), package)])
    monkeypatch.setitem(mnist.MIRRORS, name, ["http://127.0.0.1:9/unreachable/"])
    return staged


def install_fake_cifar(monkeypatch, data_dir: Path, which: str = "cifar10",
                       n_train: int = 100, n_test: int = 20, seed: int = 0) -> Written:
    """Write a fake CIFAR archive into data_dir/which and make load_data accept only it."""
    w = write_cifar_tar(Path(data_dir) / which, which, n_train, n_test, seed)
    monkeypatch.setitem(cifar.ARCHIVES, which, w.archive)
    monkeypatch.setitem(cifar.MIRRORS, which, ["http://127.0.0.1:9/unreachable/"])
    return w
