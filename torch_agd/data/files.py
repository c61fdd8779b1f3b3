"""Dataset files: fetched once, checked against published MD5 sums every time they are read.

A file that fails its checksum is never parsed (the CIFAR batches are pickles: only the
published bytes may be unpickled) and never trained on: the user gets a one-line UsageError
that names the file and says how to fix it. Downloads go to a temporary file in the target
directory and are renamed into place only once their checksum is right, so a crash or a
concurrent rank never leaves a half-written file under the final name.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import sys
import urllib.request
import zlib
from pathlib import Path

from ..atomic import atomic_file
from ..errors import UsageError


def default_data_dir() -> Path:
    """$AGD_DATA if set, else ~/.cache/torch-agd."""
    env = os.environ.get("AGD_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "torch-agd"


_CHUNK = 1 << 20
TIMEOUT_S = 60.0  # per network operation; a dead mirror must not hang a run forever


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_verified(path: Path, md5: str, *, fix: str, raw_md5: str | None = None) -> bytes:
    """The bytes of `path` if their MD5 is `md5`; else a UsageError that names the file.

    raw_md5, for a .gz file, is the MD5 of its decompressed content: a copy recompressed by
    a packager (Debian's dataset-fashion-mnist) holds the published data under a different
    gzip header, and is accepted when its content matches; the decompressed bytes are then
    returned, so they are not decompressed twice. `fix` says what the user should do.
    """
    data = path.read_bytes()
    actual = md5_bytes(data)
    if actual == md5:
        return data
    if raw_md5 is not None:
        try:
            content = gzip.decompress(data)
            if md5_bytes(content) == raw_md5:
                return content
        except (OSError, EOFError, zlib.error):
            pass  # not even valid gzip: corrupt, reported below
    raise UsageError(
        f"{path} fails its MD5 check ({len(data)} bytes, md5 {actual}, expected {md5}): "
        f"the file is corrupt or truncated; {fix}"
    )


class DownloadError(UsageError):
    """No mirror delivered the file; .tried names every URL tried and its error."""

    def __init__(self, message: str, tried: str):
        super().__init__(message)
        self.tried = tried


def download(urls: list[str], dest: Path, md5: str) -> None:
    """Fetch the first of `urls` that yields bytes with MD5 `md5` into `dest`, atomically.

    Mirrors are tried in order; a mirror that fails (network error, HTTP error, cut-off
    transfer, wrong bytes) passes the turn to the next. Raises DownloadError naming every URL
    tried and its error.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        try:
            _fetch(url, dest, md5)
            return
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
            errors.append(f"{url} ({type(e).__name__}: {e})")
    tried = "; ".join(errors)
    raise DownloadError(f"could not download {dest.name}: tried {tried}. Download it yourself "
                        f"(md5 {md5}) into {dest.parent}, or check the network", tried)


def _fetch(url: str, dest: Path, md5: str) -> None:
    from .. import __version__

    print(f"downloading {url} -> {dest}", file=sys.stderr, flush=True)
    request = urllib.request.Request(url, headers={"User-Agent": f"torch-agd/{__version__}"})
    with atomic_file(dest) as out, urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:
        digest = hashlib.md5(usedforsecurity=False)
        expected = r.headers.get("Content-Length")
        bar = _progress_bar(expected, dest.name)
        received = 0
        while chunk := r.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            received += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if expected is not None and received != int(expected):
            # urllib returns a short body quietly when the server hangs up
            raise ValueError(f"transfer cut off after {received} of {expected} bytes")
        if digest.hexdigest() != md5:  # raising here leaves dest untouched
            raise ValueError(f"got md5 {digest.hexdigest()}, expected {md5}")


def _progress_bar(total: str | None, name: str):
    """A tqdm bar on a terminal; nothing in logs or when tqdm is not installed."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=name)


def fetch_missing(name: str, directory: Path, files: dict[str, str], mirrors: list[str], *,
                  download_ok: bool) -> None:
    """Download each of `files` (filename -> md5) into `directory` from the first mirror that has
    it; when downloading is off or fails, the one-line error names what is still missing."""
    names = list(files)
    if not download_ok:
        raise missing_files_error(name, directory, names, mirrors, "files missing and downloading is off")
    for i, filename in enumerate(names):
        try:
            download([m + filename for m in mirrors], directory / filename, files[filename])
        except DownloadError as e:
            raise missing_files_error(name, directory, names[i:], mirrors,
                                      f"download failed (tried {e.tried})") from None


def missing_files_error(name: str, directory: Path, files: list[str], mirrors: list[str],
                        why: str) -> UsageError:
    """The one-line error for files that are absent and cannot be downloaded."""
    where = " or ".join(mirrors)
    return UsageError(
        f"{name}: {why}; put {', '.join(files)} in {directory} (download from {where}), "
        f"or point --data-dir / $AGD_DATA at a directory that holds {directory.name}/"
    )
