"""Decoded datasets kept on disk, so that every run after the first skips gunzip, unpickling and MD5.

The first load of a dataset checks its files against their published MD5 sums, decodes them,
and writes the uint8 tensors to one file (CACHE_NAME, beside the files or in the data dir).
A later load uses that file only if it is the decoding of the very same files: its header
records each source file's absolute path, size, device, inode, mtime and ctime, and the sums it
was checked against. Rewriting a file in place, or replacing it, changes its ctime (which a
process cannot set back: utime() moves mtime only) or its inode, so a changed source is
checked again (and a corrupt one refused, as on the first load) and the cache rebuilt.

The cache's own bytes are covered by a CRC-32 and their exact length: a truncated or damaged
cache is ignored and rebuilt, never trained on. It holds plain bytes (nothing is unpickled), is
written atomically, and may be deleted at any time.

Layout: MAGIC, the header's length (8 bytes, little-endian), the header (JSON), then each
array's raw bytes at the offset the header gives.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_file

CACHE_NAME = "decoded-cache.bin"
MAGIC = b"torch-agd decoded dataset\n"
VERSION = 1
_DTYPES = {"uint8": torch.uint8, "int64": torch.int64}
_ALIGN = 8  # every array starts at a multiple of 8, so int64 views are aligned
# What every dataset decodes to, in this order: uint8 images and int64 labels of each split.
SPLITS = ("train_x", "train_y", "test_x", "test_y")


def source_key(sources: dict[Path, dict]) -> list[dict]:
    """What must not change for a cache to stay valid: each source file's identity and the
    sums it was checked against (``sources``: path -> those sums, JSON-able)."""
    key = []
    for path, sums in sources.items():
        st = os.stat(path)
        key.append({"path": str(Path(path).absolute()), "size": st.st_size, "dev": st.st_dev,
                    "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                    "sums": sums})
    return key


@dataclass
class Cached:
    tensors: tuple[torch.Tensor, ...]  # in the order of SPLITS
    note: str  # how they were obtained, for the data line the trainer prints


def load_or_build(path: Path, sources: dict[Path, dict],
                  build: Callable[[], tuple[torch.Tensor, ...]]) -> Cached:
    """The tensors decoded from ``sources``, in the order of SPLITS: read from the cache at
    ``path`` when it still matches them, else ``build()`` (which checks and decodes the sources,
    raising UsageError on a bad one) and written to ``path`` for next time."""
    key = source_key(sources)
    named, why = read(path, key)
    if named is not None and set(named) != set(SPLITS):
        named, why = None, "damaged"
    if named is not None:
        return Cached(tuple(named[s] for s in SPLITS),
                      f"decoded copy read from {path} (files unchanged since their MD5 check)")
    tensors = tuple(build())
    try:
        write(path, key, dict(zip(SPLITS, tensors, strict=True)))
    except OSError as e:  # a read-only data dir: the run goes on, it only decodes again next time
        return Cached(tensors, f"MD5 checked and decoded (not cached: {e.strerror or e})")
    rebuilt = "" if why == "absent" else f", replacing a {why} one"
    return Cached(tensors, f"MD5 checked and decoded; decoded copy saved to {path}{rebuilt}")


def read(path: Path, key: list[dict]) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(tensors, "") when the cache at ``path`` matches ``key`` and its bytes are intact, else
    (None, why not: "absent", "stale" or "damaged")."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None, "absent"
    except OSError:
        return None, "damaged"
    with f:
        try:
            if f.read(len(MAGIC)) != MAGIC:
                return None, "damaged"
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
            if header.get("version") != VERSION or header.get("sources") != key:
                return None, "stale"
            nbytes, arrays = int(header["nbytes"]), header["arrays"]
            payload = bytearray(nbytes)
            # Exactly as long as recorded: not cut short, and nothing after it.
            if f.readinto(payload) != nbytes or f.read(1) or zlib.crc32(payload) != header["crc32"]:
                return None, "damaged"
            return {a["name"]: _view(payload, a) for a in arrays}, ""
        except (struct.error, ValueError, KeyError, TypeError, OSError):  # json errors are ValueErrors
            return None, "damaged"


def _view(payload: bytearray, array: dict) -> torch.Tensor:
    dtype, shape = _DTYPES[array["dtype"]], tuple(array["shape"])
    count = 1
    for d in shape:
        count *= d
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    # No copy: the tensors share the payload, which they keep alive.
    return torch.frombuffer(payload, dtype=dtype, count=count, offset=array["offset"]).view(shape)


def write(path: Path, key: list[dict], tensors: dict[str, torch.Tensor]) -> None:
    """Write the cache atomically (a reader sees the old file or the new one, never half)."""
    arrays, offset = [], 0
    for name, t in tensors.items():
        dtype = next((k for k, v in _DTYPES.items() if v == t.dtype), None)
        if dtype is None:
            raise TypeError(f"cannot cache {name}: dtype {t.dtype} is not one of {', '.join(_DTYPES)}")
        nbytes = t.numel() * t.element_size()
        arrays.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": nbytes})
        offset += -(-nbytes // _ALIGN) * _ALIGN
    payload = bytearray(offset)
    for a, t in zip(arrays, tensors.values()):
        if a["nbytes"]:  # copied through a byte view of the payload: no numpy needed
            flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            torch.frombuffer(payload, dtype=torch.uint8, count=a["nbytes"], offset=a["offset"]).copy_(flat)
    header = json.dumps({"version": VERSION, "sources": key, "arrays": arrays, "nbytes": len(payload),
                         "crc32": zlib.crc32(payload)}).encode()
    with atomic_file(path) as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        f.write(payload)
