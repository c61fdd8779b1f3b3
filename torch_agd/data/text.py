"""Text as bytes, for a character-level language model: real text that exists on every machine.

- ``stdlib``: the running Python's own standard-library sources (the top-level ``*.py`` files of
  ``sysconfig.get_paths()["stdlib"]``), split by file: every tenth file, in sorted order, is
  validation text. Nothing to download; the corpus is as old as the Python that runs it, so a
  run records ``python_version`` (its results depend on it).
- ``text``: any UTF-8 text of the user's, ``--data-dir FILE`` (the last tenth is validation) or
  ``--data-dir DIR`` (its ``*.txt`` and ``*.py`` files, split by file as above).

A sample is a window of ``context`` bytes and the same window shifted by one: the model predicts
every next byte. Training windows start at random offsets (drawn, like the image splits' order,
from a generator seeded by (seed, epoch), for the whole global batch); validation windows tile the
validation text without overlap, so every byte is predicted once.
"""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import UsageError
from .loader import Split, epoch_seed, shard

CONTEXT = 128  # bytes a model sees at once
VOCAB = 256    # bytes: no tokenizer, no vocabulary file


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, sorted(root.glob("*.py"))


def _split_files(files: list[Path], where: Path) -> tuple[bytes, bytes]:
    if len(files) < 2:
        raise UsageError(f"{where} holds {len(files)} text file(s) (*.txt, *.py); need at least 2 to split "
                         "into training and validation text")
    val = files[::10]
    chosen = set(val)
    read = lambda fs: b"\n".join(f.read_bytes() for f in fs)
    return read([f for f in files if f not in chosen]), read(val)


def load_text(name: str, data_dir: Path | None) -> tuple[bytes, bytes, str]:
    """(training bytes, validation bytes, where they came from)."""
    if name == "stdlib":
        root, files = stdlib_files()
        train, val = _split_files(files, root)
        return train, val, f"the standard library of Python {sys.version.split()[0]} ({root}, {len(files)} files)"
    if data_dir is None:
        raise UsageError("--dataset text needs --data-dir FILE (a UTF-8 text file) or a directory of *.txt / *.py files")
    path = Path(data_dir).expanduser()
    if path.is_file():
        raw = path.read_bytes()
        cut = len(raw) * 9 // 10
        train, val = raw[:cut], raw[cut:]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".py") and p.is_file())
        train, val = _split_files(files, path)
    else:
        raise UsageError(f"--data-dir {path} does not exist: name a text file or a directory of text files")
    for part, label in ((train, "training"), (val, "validation")):
        if len(part) <= CONTEXT + 1:
            raise UsageError(f"{path} holds too little {label} text ({len(part)} bytes): a window is {CONTEXT + 1}")
    return train, val, str(path)


class TextSplit(Split):
    """Byte windows of a text held on the device as uint8."""

    def __init__(self, data: bytes, *, train: bool, context: int = CONTEXT, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        self.context = context
        self.train = train
        # An epoch of training is as many windows as tile the text once.
        self.num_samples = (len(data) - 1) // context
        self._offsets = torch.arange(context + 1, device=self.device)

    def _windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.tokens[starts.unsqueeze(1) + self._offsets].long()
        return w[:, :-1], w[:, 1:]

    def batches(self, batch_size: int, *, epoch: int = 0, seed: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        local = self.check_batch_size(batch_size, rank=rank, world_size=world_size)
        if self.train:
            return self._train(batch_size, local, epoch, seed, rank)
        return self._test(local, *shard(self.num_samples, rank, world_size))

    def _train(self, batch_size, local, epoch, seed, rank):
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        steps = self.num_samples // batch_size
        starts = torch.randint(0, len(self.tokens) - self.context, (steps, batch_size), generator=g)
        starts = starts[:, rank * local:(rank + 1) * local].to(self.device)
        for i in range(steps):
            yield self._windows(starts[i])

    def _test(self, local, lo, hi):
        for start in range(lo, hi, local):
            end = min(start + local, hi)
            yield self._windows(torch.arange(start, end, device=self.device) * self.context)
