"""MNIST and Fashion-MNIST: four gzipped IDX files each, parsed straight into uint8 tensors.

IDX is a tiny format (a 4-byte magic whose third byte is the element type and fourth the
number of dimensions, one big-endian uint32 per dimension, then the raw bytes), so it is
parsed here with torch alone: no torchvision, numpy or PIL.

The tables below are module-level dicts so that tests can point them at files they write.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import torch

from ..errors import UsageError
from .files import fetch_missing, read_verified

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"

# Tried in order; the same mirrors and sums as torchvision.datasets.MNIST / FashionMNIST
# (the second Fashion-MNIST mirror is the dataset's own GitHub repository).
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ],
}

MD5: dict[str, dict[str, str]] = {
    "mnist": {
        TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
        TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
        TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
        TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
        TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# MD5 of the decompressed IDX bytes. Debian recompresses the .gz files (new gzip header), so
# its copies differ from the published archives byte for byte but not in content; these sums
# (published alongside the .gz sums by several loaders) match Debian's decompressed files.
RAW_MD5: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
        TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
        TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

# Read-only copies installed by the system, used when the data dir lacks the files:
# (directory, how to repair it).
SYSTEM_DIRS: dict[str, list[tuple[Path, str]]] = {
    "fashion-mnist": [
        (Path("/usr/share/datasets/fashion-mnist"),
         "reinstall it with: apt-get install --reinstall dataset-fashion-mnist"),
    ],
}


def load_idx_dataset(name: str, root: Path, *, download_ok: bool):
    """(train_x, train_y, test_x, test_y): uint8 images (N, 1, H, W), int64 labels, on the CPU.

    Files are looked up in root/name, then in the system copies; missing ones are downloaded
    into root/name when download_ok.
    """
    directory = root / name
    md5s, raw = MD5[name], RAW_MD5.get(name, {})
    found: dict[str, tuple[Path, str | None]] = {}
    for filename in md5s:
        for folder, fix in [(directory, None), *SYSTEM_DIRS.get(name, [])]:
            if (folder / filename).is_file():
                found[filename] = (folder / filename, fix)
                break
    missing = [f for f in md5s if f not in found]
    if missing:
        fetch_missing(name, directory, {f: md5s[f] for f in missing}, MIRRORS[name], download_ok=download_ok)
        found.update({f: (directory / f, None) for f in missing})

    def read(filename: str) -> torch.Tensor:
        path, fix = found[filename]
        if fix is None:
            fix = (f"delete it and run again to download it afresh, or replace it with "
                   f"{MIRRORS[name][0]}{filename}")
        data = read_verified(path, md5s[filename], fix=fix, raw_md5=raw.get(filename))
        return parse_idx(data, path)

    splits = []
    for images_file, labels_file in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        images, labels = read(images_file), read(labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UsageError(f"{found[images_file][0]} and {found[labels_file][0]} do not "
                             f"hold matching images (N, H, W) and labels (N,); replace them")
        splits += [images.unsqueeze(1), labels.long()]
    return tuple(splits)


def parse_idx(data: bytes, path: Path | str = "<bytes>") -> torch.Tensor:
    """A gzipped (or plain) IDX file of unsigned bytes as a uint8 tensor of its shape."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UsageError(f"{path} is not valid gzip ({e}); delete it and fetch it again")
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise UsageError(f"{path} is not an IDX file of unsigned bytes; delete it and fetch it "
                         f"again")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UsageError(f"{path} is truncated inside its IDX header; delete it and fetch it again")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = 1
    for d in shape:
        count *= d
    if len(data) != header + count:
        raise UsageError(f"{path} holds {len(data) - header} data bytes, its IDX header says "
                         f"{count}; delete it and fetch it again")
    if count == 0:
        return torch.empty(shape, dtype=torch.uint8)
    # one copy into a bytearray: torch.frombuffer needs a writable buffer it may keep
    return torch.frombuffer(bytearray(memoryview(data)[header:]), dtype=torch.uint8).view(shape)
