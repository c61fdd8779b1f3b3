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
from .cache import CACHE_NAME, load_or_build
from .files import default_data_dir, fetch_missing, read_verified
from .system import SystemCopy, apt_install

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

# Copies installed by the system, used in place when the data dir lacks the files (and the
# user did not name a data dir); Debian's may be installed when nothing else works.
SYSTEM_DIRS: dict[str, list[SystemCopy]] = {
    "fashion-mnist": [SystemCopy(Path("/usr/share/datasets/fashion-mnist"), "dataset-fashion-mnist")],
}


def load_idx_dataset(name: str, root: Path, *, download_ok: bool, system_ok: bool = True,
                     apt_ok: bool = False):
    """((train_x, train_y, test_x, test_y), source): uint8 images (N, 1, H, W) and int64 labels
    on the CPU, and one line saying where they came from.

    The files are read from root/name when it holds all four; else (system_ok: root is not a
    data dir the user named) from a system copy; else the missing ones are downloaded into
    root/name (download_ok); else (apt_ok) the system copy is installed with apt-get. The
    decoded tensors are cached (cache.py), so later loads skip decompression and checksums.
    """
    folder, origin, copy = _locate(name, root / name, download_ok=download_ok, system_ok=system_ok,
                                   apt_ok=apt_ok)
    md5s, raw = MD5[name], RAW_MD5.get(name, {})

    def decode() -> tuple[torch.Tensor, ...]:
        splits = []
        for images_file, labels_file in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
            images, labels = (_read(folder / f, md5s[f], raw.get(f), copy, MIRRORS[name][0])
                              for f in (images_file, labels_file))
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise UsageError(f"{folder / images_file} and {folder / labels_file} do not hold matching "
                                 f"images (N, H, W) and labels (N,); replace them")
            splits += [images.unsqueeze(1), labels.long()]
        return tuple(splits)

    sources = {folder / f: {"md5": md5s[f], "raw_md5": raw.get(f)} for f in md5s}
    cached = load_or_build(_cache_dir(name, root) / CACHE_NAME, sources, decode)
    return cached.tensors, f"{name} from {folder}{origin}; {cached.note}"


def _read(path: Path, md5: str, raw_md5: str | None, copy: SystemCopy | None, mirror: str) -> torch.Tensor:
    fix = copy.fix if copy else f"delete it and run again to download it afresh, or replace it with {mirror}{path.name}"
    return parse_idx(read_verified(path, md5, fix=fix, raw_md5=raw_md5), path)


def _cache_dir(name: str, root: Path) -> Path:
    """root/name, unless that is a package's directory: nothing is written there (a dpkg-owned
    folder, writable when running as root), the cache goes to the default data dir instead."""
    if any(root / name == c.directory for c in SYSTEM_DIRS.get(name, [])):
        return default_data_dir() / name
    return root / name


def _holds_all(folder: Path, files) -> bool:
    return all((folder / f).is_file() for f in files)


def _locate(name: str, directory: Path, *, download_ok: bool, system_ok: bool, apt_ok: bool
            ) -> tuple[Path, str, SystemCopy | None]:
    """(the folder that holds all the files, how they got there, the system copy it is, if one).
    Raises the one-line UsageError that says what to do when no way worked."""
    md5s, copies = MD5[name], SYSTEM_DIRS.get(name, [])
    here = next((c for c in copies if c.directory == directory), None)
    if _holds_all(directory, md5s):
        return directory, f" ({here.origin})" if here else "", here
    for copy in copies if system_ok else []:
        if _holds_all(copy.directory, md5s):
            return copy.directory, f" ({copy.origin})", copy
    missing = {f: md5s[f] for f in md5s if not (directory / f).is_file()}
    try:
        fetch_missing(name, directory, missing, MIRRORS[name], download_ok=download_ok)
        return directory, f" ({len(missing)} of {len(md5s)} files downloaded just now)", None
    except UsageError as e:
        failure = str(e)
    if not copies:
        raise UsageError(failure)
    copy = copies[0]
    if not system_ok:  # a data dir the user named is never swapped for another copy
        if _holds_all(copy.directory, md5s):
            raise UsageError(f"{failure}; {copy.origin} is installed in {copy.directory}: use it with "
                             f"--data-dir {copy.directory.parent}, or leave --data-dir out")
        raise UsageError(f"{failure}; or install {copy.origin} (apt-get install {copy.package}) and "
                         f"leave --data-dir out")
    if not (download_ok and apt_ok):
        raise UsageError(f"{failure}; or install {copy.origin}: apt-get install {copy.package}")
    why = apt_install(copy.package)
    if not why and not _holds_all(copy.directory, md5s):
        why = f"{copy.directory} still lacks some of {', '.join(md5s)}"
    if why:
        raise UsageError(f"{failure}; installing {copy.origin} did not work either: {why}")
    return copy.directory, f" ({copy.origin}, installed just now with apt-get)", copy


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
