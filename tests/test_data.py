"""torch_agd.data: file formats, checksums, downloads, and the batches the trainer sees."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fakedata import (install_fake_cifar, install_fake_idx, install_fake_system_copy, idx_bytes,
                      write_cifar_tar, write_imagefolder, write_mnist_idx)
from helpers import FASHION as DEBIAN_FASHION
from torch_agd.data import DATASETS, default_data_dir, load_data
from torch_agd.data import cache, cifar, files, mnist, system
from torch_agd.data.system import SystemCopy
from torch_agd.data.loader import TensorSplit, crop_flip
from torch_agd.errors import UsageError

IDX_FILES = [mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS, mnist.TEST_IMAGES, mnist.TEST_LABELS]


# --------------------------------------------------------------------------- file formats

def test_idx_files_round_trip_exactly(tmp_path):
    w = write_mnist_idx(tmp_path, n_train=37, n_test=11, seed=3)
    images = mnist.parse_idx(w.paths[mnist.TRAIN_IMAGES].read_bytes())
    labels = mnist.parse_idx(w.paths[mnist.TEST_LABELS].read_bytes())
    assert images.dtype == torch.uint8 and images.shape == (37, 28, 28)
    assert torch.equal(images, w.train_x[:, 0])
    assert torch.equal(labels.long(), w.test_y)


def test_load_data_returns_the_written_idx_samples(tmp_path, monkeypatch):
    w = install_fake_idx(monkeypatch, tmp_path, "mnist", n_train=40, n_test=12, seed=1)
    data = load_data("mnist", tmp_path, "cpu", download=False)
    assert data.info is DATASETS["mnist"]
    assert (data.train.num_samples, data.test.num_samples) == (40, 12)
    assert torch.equal(data.train.images, w.train_x) and torch.equal(data.train.labels, w.train_y)
    assert torch.equal(data.test.images, w.test_x) and torch.equal(data.test.labels, w.test_y)
    assert data.train.labels.dtype == torch.int64


@pytest.mark.parametrize("raw", [b"\x00\x00\x08\x03\x00\x00", b"\x00\x00\x0d\x01" + bytes(8)])
def test_parse_idx_rejects_bad_headers(raw):
    with pytest.raises(UsageError, match="IDX"):
        mnist.parse_idx(raw, "f.idx")


def test_parse_idx_rejects_missing_bytes():
    raw = idx_bytes(torch.zeros(4, 5, dtype=torch.uint8))
    assert mnist.parse_idx(raw).shape == (4, 5)
    with pytest.raises(UsageError, match="19 data bytes.*20"):
        mnist.parse_idx(raw[:-1], "f.idx")


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_archive_is_extracted_and_parsed(tmp_path, monkeypatch, which):
    w = install_fake_cifar(monkeypatch, tmp_path, which, n_train=23, n_test=7, seed=2)
    data = load_data(which, tmp_path, "cpu", download=False)
    assert data.train.images.shape == (23, 3, 32, 32) and data.test.images.shape == (7, 3, 32, 32)
    assert torch.equal(data.train.images, w.train_x) and torch.equal(data.train.labels, w.train_y)
    assert torch.equal(data.test.images, w.test_x) and torch.equal(data.test.labels, w.test_y)
    assert data.info.num_classes == (100 if which == "cifar100" else 10)
    # Extracted once: the batches alone suffice afterwards.
    (tmp_path / which / w.archive.filename).unlink()
    again = load_data(which, tmp_path, "cpu", download=False)
    assert torch.equal(again.train.images, w.train_x)
    assert not list((tmp_path / which).rglob(".*"))  # no temporary files left behind


# --------------------------------------------------------------------------- checksums

def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_idx_file_is_refused_by_name(tmp_path, monkeypatch, damage):
    w = install_fake_idx(monkeypatch, tmp_path, "fashion-mnist", n_train=20, n_test=5)
    path = w.paths[mnist.TRAIN_IMAGES]
    if damage == "flip":
        _flip_byte(path, len(path.read_bytes()) // 2)
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError) as e:
        load_data("fashion-mnist", tmp_path, "cpu", download=False)
    assert str(path) in str(e.value) and "delete it" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_cifar_batch_is_refused_by_name(tmp_path, monkeypatch, damage):
    install_fake_cifar(monkeypatch, tmp_path, "cifar10", n_train=10, n_test=5)
    load_data("cifar10", tmp_path, "cpu", download=False)  # extracts
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    if damage == "flip":
        _flip_byte(path, 200)
    else:
        path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UsageError, match="data_batch_3 fails its MD5 check.*delete it"):
        load_data("cifar10", tmp_path, "cpu", download=False)


def test_corrupt_cifar_archive_is_refused_by_name(tmp_path, monkeypatch):
    w = install_fake_cifar(monkeypatch, tmp_path, "cifar100", n_train=10, n_test=5)
    path = tmp_path / "cifar100" / w.archive.filename
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UsageError, match="cifar-100-python.tar.gz fails its MD5 check"):
        load_data("cifar100", tmp_path, "cpu", download=False)
    assert not (tmp_path / "cifar100" / "cifar-100-python").exists()  # nothing extracted


def test_recompressed_copy_is_accepted_by_content_checksum(tmp_path, monkeypatch):
    """A system copy whose gzip header differs passes through RAW_MD5; a bad one does not."""
    w = install_fake_idx(monkeypatch, tmp_path / "pkg-src", "fashion-mnist", 20, 5)
    system = tmp_path / "system"
    system.mkdir()
    import gzip
    raw = {}
    for name in IDX_FILES:
        content = gzip.decompress(w.paths[name].read_bytes())
        raw[name] = files.md5_bytes(content)
        (system / name).write_bytes(gzip.compress(content, mtime=123456))  # other header
    monkeypatch.setitem(mnist.RAW_MD5, "fashion-mnist", raw)
    monkeypatch.setitem(mnist.SYSTEM_DIRS, "fashion-mnist", [SystemCopy(system, "dataset-fake")])
    monkeypatch.setenv("AGD_DATA", str(tmp_path / "empty"))  # the default dir: a system copy may serve
    data = load_data("fashion-mnist", None, "cpu", download=False)
    assert torch.equal(data.train.images, w.train_x)
    assert os.listdir(tmp_path / "empty" / "fashion-mnist") == [cache.CACHE_NAME]  # nothing downloaded
    raw[mnist.TEST_LABELS] = "0" * 32  # a new sum: the cache no longer vouches for the file
    with pytest.raises(UsageError, match=f"{system / mnist.TEST_LABELS}.*apt-get install --reinstall dataset-fake"):
        load_data("fashion-mnist", None, "cpu", download=False)


# --------------------------------------------------------------------------- offline use

def test_offline_missing_idx_files_say_which_files_go_where(tmp_path, monkeypatch):
    monkeypatch.setitem(mnist.SYSTEM_DIRS, "fashion-mnist", [])
    with pytest.raises(UsageError) as e:
        load_data("fashion-mnist", tmp_path, "cpu", download=False)
    msg = str(e.value)
    assert all(f in msg for f in IDX_FILES) and str(tmp_path / "fashion-mnist") in msg
    assert mnist.MIRRORS["fashion-mnist"][0] in msg and "\n" not in msg


def test_offline_missing_cifar_says_which_file_goes_where(tmp_path):
    with pytest.raises(UsageError) as e:
        load_data("cifar10", tmp_path, "cpu", download=False)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "cifar10") in msg
    assert "https://www.cs.toronto.edu/~kriz/" in msg


def test_unknown_dataset_is_a_usage_error():
    with pytest.raises(UsageError, match="choose one of mnist, fashion-mnist"):
        load_data("svhn", "/nonexistent")


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AGD_DATA", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("AGD_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "torch-agd"


# --------------------------------------------------------------------------- where the data comes from

def test_source_names_the_folder_the_files_were_found_in(tmp_path, monkeypatch):
    install_fake_idx(monkeypatch, tmp_path, "fashion-mnist", n_train=20, n_test=5)
    source = load_data("fashion-mnist", tmp_path, "cpu", download=False).source
    folder = tmp_path / "fashion-mnist"
    assert source == (f"fashion-mnist from {folder}; MD5 checked and decoded; "
                      f"decoded copy saved to {folder / cache.CACHE_NAME}")


def test_default_data_dir_falls_back_to_the_system_copy_and_says_so(tmp_path, monkeypatch):
    w = install_fake_system_copy(monkeypatch, tmp_path / "usr-share" / "fashion-mnist", n_train=20, n_test=5)
    monkeypatch.setenv("AGD_DATA", str(tmp_path / "home-cache"))
    data = load_data("fashion-mnist", None, "cpu")  # None: the default dir, as the trainer's default
    assert torch.equal(data.train.images, w.train_x)
    assert data.source.startswith(f"fashion-mnist from {tmp_path / 'usr-share' / 'fashion-mnist'} "
                                  f"(Debian package dataset-fake); ")
    # The trainer passes the default dir by value: that is still the default.
    assert load_data("fashion-mnist", str(tmp_path / "home-cache"), "cpu").source == \
        load_data("fashion-mnist", None, "cpu").source


def test_a_named_empty_data_dir_is_an_error_not_the_system_copy(tmp_path, monkeypatch):
    copy = tmp_path / "usr-share" / "fashion-mnist"
    install_fake_system_copy(monkeypatch, copy, n_train=20, n_test=5)
    monkeypatch.setenv("AGD_DATA", str(tmp_path / "home-cache"))
    named = tmp_path / "mine"
    with pytest.raises(UsageError) as e:
        load_data("fashion-mnist", named, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and str(named / "fashion-mnist") in msg and "download failed" in msg
    assert f"installed in {copy}: use it with --data-dir {copy.parent}, or leave --data-dir out" in msg
    # ... and naming the system copy's parent, as the message says, works.
    assert load_data("fashion-mnist", copy.parent, "cpu").train.num_samples == 20


def test_a_named_data_dir_with_no_system_copy_says_how_to_install_one(tmp_path, monkeypatch):
    install_fake_system_copy(monkeypatch, tmp_path / "absent", n_train=20, n_test=5,
                             staging=tmp_path / "deb")
    with pytest.raises(UsageError, match=r"or install Debian package dataset-fake \(apt-get install "
                                         r"dataset-fake\) and leave --data-dir out$"):
        load_data("fashion-mnist", tmp_path / "mine", "cpu")


def test_the_system_copy_named_as_data_dir_is_cached_elsewhere(tmp_path, monkeypatch):
    copy = tmp_path / "usr-share" / "fashion-mnist"
    install_fake_system_copy(monkeypatch, copy, n_train=20, n_test=5)
    monkeypatch.setenv("AGD_DATA", str(tmp_path / "home-cache"))
    before = sorted(os.listdir(copy))
    source = load_data("fashion-mnist", copy.parent, "cpu").source
    assert sorted(os.listdir(copy)) == before  # nothing written into a package's folder
    assert (tmp_path / "home-cache" / "fashion-mnist" / cache.CACHE_NAME).is_file()
    assert source.startswith(f"fashion-mnist from {copy} (Debian package dataset-fake); ")


@pytest.mark.slow
def test_agd_train_prints_the_data_line_and_never_swaps_a_named_dir(tmp_path, monkeypatch, capsys):
    from torch_agd.cli import main

    install_fake_system_copy(monkeypatch, tmp_path / "usr-share" / "fashion-mnist", n_train=64, n_test=16)
    monkeypatch.setenv("AGD_DATA", str(tmp_path / "home-cache"))
    flags = ["train", "--arch", "fcn", "--dataset", "fashion-mnist", "--depth", "2", "--width", "8",
             "--epochs", "1", "--train_bs", "32", "--cpu"]
    assert main([*flags, "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    data_lines = [line for line in lines if line.startswith("data: ")]
    assert data_lines == [f"data: fashion-mnist from {tmp_path / 'usr-share' / 'fashion-mnist'} "
                          f"(Debian package dataset-fake); MD5 checked and decoded; decoded copy saved to "
                          f"{tmp_path / 'home-cache' / 'fashion-mnist' / cache.CACHE_NAME}"]
    assert main([*flags, "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "run2")]) == 2
    captured = capsys.readouterr()
    *tries, error = captured.err.splitlines()  # "downloading URL -> file" lines, then one error line
    assert tries and all(t.startswith("downloading http://127.0.0.1:9/") for t in tries)
    assert "Traceback" not in captured.err
    assert error.startswith("agd: error: fashion-mnist: download failed") and "leave --data-dir out" in error
    assert str(tmp_path / "empty" / "fashion-mnist") in error and "data: " not in captured.out


# --------------------------------------------------------------------------- the decoded cache

def _no_reading(monkeypatch):
    """Make any checksum or decompression of a source file fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a source file was read although the cache is valid")
    monkeypatch.setattr(mnist, "read_verified", refuse)
    monkeypatch.setattr(cifar, "read_verified", refuse)


def test_second_load_reads_the_cache_and_not_the_files(tmp_path, monkeypatch):
    w = install_fake_idx(monkeypatch, tmp_path, "mnist", n_train=30, n_test=9, seed=4)
    first = load_data("mnist", tmp_path, "cpu", download=False)
    _no_reading(monkeypatch)
    second = load_data("mnist", tmp_path, "cpu", download=False)
    assert "decoded copy read from" in second.source and "unchanged" in second.source
    for split, x, y in ((second.train, w.train_x, w.train_y), (second.test, w.test_x, w.test_y)):
        assert torch.equal(split.images, x) and torch.equal(split.labels, y)
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert [b[0].tolist() for b in first.train.batches(8, seed=1)] == \
        [b[0].tolist() for b in second.train.batches(8, seed=1)]


def test_cifar_is_cached_too(tmp_path, monkeypatch):
    w = install_fake_cifar(monkeypatch, tmp_path, "cifar100", n_train=12, n_test=4)
    assert "extracted just now" in load_data("cifar100", tmp_path, "cpu", download=False).source
    _no_reading(monkeypatch)
    data = load_data("cifar100", tmp_path, "cpu", download=False)
    assert "decoded copy read from" in data.source
    assert torch.equal(data.train.images, w.train_x) and torch.equal(data.test.labels, w.test_y)


@pytest.mark.parametrize("change", ["flip", "truncate", "replace"])
def test_a_source_changed_after_caching_is_checked_again_and_refused(tmp_path, monkeypatch, change):
    w = install_fake_idx(monkeypatch, tmp_path, "fashion-mnist", n_train=20, n_test=5)
    load_data("fashion-mnist", tmp_path, "cpu", download=False)
    path = w.paths[mnist.TRAIN_LABELS]
    if change == "flip":  # same size, rewritten in place
        _flip_byte(path, len(path.read_bytes()) // 2)
    elif change == "truncate":
        path.write_bytes(path.read_bytes()[:-3])
    else:  # another file moved over it, with the old file's size and mtime
        other = path.with_suffix(".new")
        data = bytearray(path.read_bytes())
        data[-5] ^= 1
        other.write_bytes(bytes(data))
        st = path.stat()
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        other.replace(path)
    with pytest.raises(UsageError, match=f"{path} fails its MD5 check"):
        load_data("fashion-mnist", tmp_path, "cpu", download=False)


def test_a_touched_source_is_checked_again_and_the_cache_rebuilt(tmp_path, monkeypatch):
    w = install_fake_idx(monkeypatch, tmp_path, "fashion-mnist", n_train=20, n_test=5)
    load_data("fashion-mnist", tmp_path, "cpu", download=False)
    path = w.paths[mnist.TEST_IMAGES]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime kept, ctime moves: still noticed
    source = load_data("fashion-mnist", tmp_path, "cpu", download=False).source
    assert "MD5 checked and decoded" in source and source.endswith("replacing a stale one")
    assert "decoded copy read from" in load_data("fashion-mnist", tmp_path, "cpu", download=False).source


@pytest.mark.parametrize("damage", ["flip payload", "flip header", "truncate", "append", "empty"])
def test_a_damaged_cache_is_never_used_but_rebuilt(tmp_path, monkeypatch, damage):
    w = install_fake_idx(monkeypatch, tmp_path, "fashion-mnist", n_train=20, n_test=5)
    load_data("fashion-mnist", tmp_path, "cpu", download=False)
    path = tmp_path / "fashion-mnist" / cache.CACHE_NAME
    data = path.read_bytes()
    if damage == "flip payload":
        _flip_byte(path, len(data) - 100)
    elif damage == "flip header":
        _flip_byte(path, len(cache.MAGIC) + 20)
    elif damage == "truncate":
        path.write_bytes(data[:-1])
    elif damage == "append":
        path.write_bytes(data + b"\0")
    else:
        path.write_bytes(b"")
    again = load_data("fashion-mnist", tmp_path, "cpu", download=False)
    assert again.source.endswith("replacing a damaged one")
    assert torch.equal(again.train.images, w.train_x) and torch.equal(again.test.labels, w.test_y)
    assert path.read_bytes() == data  # rebuilt byte for byte
    assert "decoded copy read from" in load_data("fashion-mnist", tmp_path, "cpu", download=False).source


def test_a_cache_that_cannot_be_written_costs_only_the_cache(tmp_path, monkeypatch):
    w = install_fake_idx(monkeypatch, tmp_path, "mnist", n_train=20, n_test=5)
    (tmp_path / "mnist" / cache.CACHE_NAME).mkdir()  # neither readable nor replaceable as a file
    for _ in range(2):
        data = load_data("mnist", tmp_path, "cpu", download=False)
        assert "MD5 checked and decoded (not cached: " in data.source
        assert torch.equal(data.train.images, w.train_x)
    assert not [p for p in os.listdir(tmp_path / "mnist") if p.endswith(".tmp")]


def test_cache_round_trips_empty_and_wide_arrays(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"x")
    key = cache.source_key({src: {"md5": "m"}})
    tensors = {"a": torch.arange(7, dtype=torch.uint8), "b": torch.arange(-3, 2, dtype=torch.int64).view(5, 1),
               "none": torch.empty(0, 3, dtype=torch.uint8)}
    cache.write(tmp_path / "c.bin", key, tensors)
    back, why = cache.read(tmp_path / "c.bin", key)
    assert why == "" and list(back) == ["a", "b", "none"]
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    assert cache.read(tmp_path / "c.bin", cache.source_key({src: {"md5": "other"}})) == (None, "stale")
    assert cache.read(tmp_path / "absent.bin", key) == (None, "absent")


# --------------------------------------------------------------------------- installing Debian's copy

FAKE_APT = """#!{python}
# A stand-in for apt-get: logs its arguments, then behaves as FAKE_APT_MODE says.
import os, shutil, sys
with open(os.environ["FAKE_APT_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + " DEBIAN_FRONTEND=" + os.environ.get("DEBIAN_FRONTEND", "") + "\\n")
mode, lists = os.environ["FAKE_APT_MODE"], os.environ["FAKE_APT_LOG"] + ".lists"
if sys.argv[1] == "update":
    open(lists, "w").close()
    sys.exit(0)
if mode == "fail" or (mode == "needs-update" and not os.path.exists(lists)):
    print("E: Unable to locate package " + sys.argv[-1], file=sys.stderr)
    sys.exit(100)
if mode != "installs-nothing":
    shutil.copytree(os.environ["FAKE_APT_DEB"], os.environ["FAKE_APT_TARGET"], dirs_exist_ok=True)
"""

FAKE_SUDO = """#!{python}
# A stand-in for sudo: -n with a password needed fails, else it runs the command.
import os, subprocess, sys
assert sys.argv[1] == "-n"
if os.environ["FAKE_SUDO"] == "password":
    print("sudo: a password is required", file=sys.stderr)
    sys.exit(1)
sys.exit(0 if sys.argv[2:] == ["true"] else subprocess.run(sys.argv[2:]).returncode)
"""


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """A machine where the download fails, Debian's copy is not installed, and apt-get (a fake,
    first on PATH) can install it; the default data dir is empty. Returns the apt-get log."""
    copy, deb = tmp_path / "usr-share" / "fashion-mnist", tmp_path / "deb"
    w = install_fake_system_copy(monkeypatch, copy, n_train=20, n_test=5, package="dataset-fake",
                                 staging=deb)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("apt-get", FAKE_APT), ("sudo", FAKE_SUDO)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "apt.log"
    for var, value in (("PATH", str(bin_dir)), ("FAKE_APT_LOG", str(log)), ("FAKE_APT_DEB", str(deb)),
                       ("FAKE_APT_TARGET", str(copy)), ("FAKE_APT_MODE", "ok"), ("FAKE_SUDO", "ok"),
                       ("AGD_DATA", str(tmp_path / "home-cache")), (system.APT_ENV, "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    log.write_text("")
    return log, w, copy


def test_apt_installs_the_system_copy_when_the_download_fails(fake_apt, capsys):
    log, w, copy = fake_apt
    data = load_data("fashion-mnist", None, "cpu")
    assert torch.equal(data.train.images, w.train_x)
    assert data.source.startswith(f"fashion-mnist from {copy} (Debian package dataset-fake, installed "
                                  f"just now with apt-get); ")
    assert log.read_text().splitlines() == ["install -y -q dataset-fake DEBIAN_FRONTEND=noninteractive"]
    assert "installing Debian's dataset-fake with apt-get" in capsys.readouterr().err
    # Installed: the next load uses it in place, and apt-get is not run again.
    assert "(Debian package dataset-fake); decoded copy read" in load_data("fashion-mnist", None, "cpu").source
    assert len(log.read_text().splitlines()) == 1


def test_apt_updates_its_lists_when_the_package_is_unknown(fake_apt, monkeypatch):
    log, w, _ = fake_apt
    monkeypatch.setenv("FAKE_APT_MODE", "needs-update")
    assert torch.equal(load_data("fashion-mnist", None, "cpu").test.images, w.test_x)
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["install", "update", "install"]


@pytest.mark.parametrize("mode, says", [
    ("fail", "apt-get install dataset-fake failed (E: Unable to locate package dataset-fake)"),
    ("installs-nothing", "still lacks some of train-images-idx3-ubyte.gz"),
])
def test_apt_failing_too_is_one_line_naming_both_failures(fake_apt, monkeypatch, mode, says):
    monkeypatch.setenv("FAKE_APT_MODE", mode)
    with pytest.raises(UsageError) as e:
        load_data("fashion-mnist", None, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and "download failed" in msg and "installing Debian package dataset-fake did not work" in msg
    assert says in msg


def test_without_root_apt_runs_through_passwordless_sudo_only(fake_apt, monkeypatch):
    log, w, _ = fake_apt
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("FAKE_SUDO", "password")
    with pytest.raises(UsageError, match="apt-get needs root and sudo asks for a password$"):
        load_data("fashion-mnist", None, "cpu")
    assert log.read_text() == ""
    monkeypatch.setenv("FAKE_SUDO", "ok")
    assert torch.equal(load_data("fashion-mnist", None, "cpu").train.images, w.train_x)
    assert log.read_text().splitlines() == ["install -y -q dataset-fake DEBIAN_FRONTEND=noninteractive"]


@pytest.mark.parametrize("why", ["not asked", "named data dir", "no apt-get", "no download"])
def test_apt_is_not_run_unless_asked_for_a_default_dir_where_apt_exists(fake_apt, tmp_path, monkeypatch, why):
    log, _, _ = fake_apt
    data_dir, download = None, True
    if why == "not asked":
        monkeypatch.setenv(system.APT_ENV, "0")
        expected = "or install Debian package dataset-fake: apt-get install dataset-fake$"
    elif why == "named data dir":
        data_dir = tmp_path / "mine"
        expected = f"{data_dir / 'fashion-mnist'}.*leave --data-dir out$"
    elif why == "no apt-get":
        (tmp_path / "bin" / "apt-get").unlink()
        expected = "did not work either: there is no apt-get on this machine$"
    else:
        download = False
        expected = "downloading is off.*apt-get install dataset-fake$"
    with pytest.raises(UsageError, match=expected):
        load_data("fashion-mnist", data_dir, "cpu", download=download)
    assert log.read_text() == ""


def test_make_train_asks_for_the_apt_fallback():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    train = makefile.split("\ntrain:", 1)[1].split("\n\n", 1)[0]
    assert f"{system.APT_ENV}=1 $(BIN)/agd train" in train


# --------------------------------------------------------------------------- downloads

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.endswith("/short"):  # a transfer cut off mid-way
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """(directory served, base URL) of an HTTP server on 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_download_fetches_verifies_and_writes_atomically(tmp_path, monkeypatch, server):
    root, url = server
    w = write_mnist_idx(root / "mirror", n_train=30, n_test=10, seed=5)
    monkeypatch.setitem(mnist.MD5, "mnist", w.md5)
    monkeypatch.setitem(mnist.MIRRORS, "mnist", [url + "mirror/"])
    data_dir = tmp_path / "data"
    data = load_data("mnist", data_dir, "cpu", download=True)
    assert torch.equal(data.train.images, w.train_x) and torch.equal(data.test.labels, w.test_y)
    assert sorted(os.listdir(data_dir / "mnist")) == sorted([*IDX_FILES, cache.CACHE_NAME])  # no temp files
    assert data.source == f"mnist from {data_dir / 'mnist'} (4 of 4 files downloaded just now); " \
        f"MD5 checked and decoded; decoded copy saved to {data_dir / 'mnist' / cache.CACHE_NAME}"
    for name in IDX_FILES:
        assert files.md5_file(data_dir / "mnist" / name) == w.md5[name]
    # Downloaded once: with the server's copies gone, the files in the data dir serve.
    for name in IDX_FILES:
        (root / "mirror" / name).unlink()
    assert torch.equal(load_data("mnist", data_dir, download=True).train.images, w.train_x)


def test_failing_mirrors_fall_back_in_order(tmp_path, monkeypatch, server):
    root, url = server
    w = write_mnist_idx(root / "good", n_train=8, n_test=4, seed=6)
    # The second mirror serves a corrupt copy of every file: its bytes must be refused.
    write_mnist_idx(root / "bad", n_train=8, n_test=4, seed=7)
    monkeypatch.setitem(mnist.MD5, "fashion-mnist", w.md5)
    monkeypatch.setitem(mnist.SYSTEM_DIRS, "fashion-mnist", [])
    monkeypatch.setitem(mnist.MIRRORS, "fashion-mnist",
                        [url + "absent/", url + "bad/", "http://127.0.0.1:9/", url + "good/"])
    data = load_data("fashion-mnist", tmp_path, "cpu")
    assert torch.equal(data.train.images, w.train_x)
    assert sorted(os.listdir(tmp_path / "fashion-mnist")) == sorted([*IDX_FILES, cache.CACHE_NAME])


def test_all_mirrors_failing_names_every_url_and_leaves_nothing(tmp_path, server):
    root, url = server
    (root / "x.bin").write_bytes(b"wrong bytes")
    urls = [url + "absent.bin", url + "x.bin", url + "short"]
    dest = tmp_path / "d" / "x.bin"
    with pytest.raises(UsageError) as e:
        files.download(urls, dest, "0" * 32)
    msg = str(e.value)
    assert urls[0] in msg and "404" in msg and urls[1] in msg and "expected " + "0" * 32 in msg
    assert urls[2] in msg and "cut off after 10 of 1000 bytes" in msg
    assert str(dest.parent) in msg
    assert os.listdir(dest.parent) == []  # neither the file nor a temporary


def test_failed_download_says_which_files_go_where(tmp_path, monkeypatch, server):
    _, url = server
    monkeypatch.setitem(mnist.MIRRORS, "mnist", [url + "absent/"])
    with pytest.raises(UsageError) as e:
        load_data("mnist", tmp_path, "cpu", download=True)
    msg = str(e.value)
    assert "download failed" in msg and "404" in msg and "\n" not in msg
    assert all(f in msg for f in IDX_FILES) and str(tmp_path / "mnist") in msg
    assert os.listdir(tmp_path / "mnist") == []


def test_cifar_download_and_extract(tmp_path, monkeypatch, server):
    root, url = server
    w = write_cifar_tar(root, "cifar10", n_train=12, n_test=3, seed=8)
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", w.archive)
    monkeypatch.setitem(cifar.MIRRORS, "cifar10", [url + "nope/", url])
    data = load_data("cifar10", tmp_path, "cpu")
    assert torch.equal(data.train.images, w.train_x) and torch.equal(data.test.labels, w.test_y)
    assert (tmp_path / "cifar10" / w.archive.filename).is_file()


# --------------------------------------------------------------------------- real data

@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_is_used_offline(tmp_path, monkeypatch):
    monkeypatch.setitem(mnist.MIRRORS, "fashion-mnist", ["http://127.0.0.1:9/"])  # dead
    monkeypatch.setenv("AGD_DATA", str(tmp_path))
    data = load_data("fashion-mnist", None, "cpu", download=True)
    # read in place, nothing copied; only the decoded cache is written, in the data dir
    assert os.listdir(tmp_path / "fashion-mnist") == [cache.CACHE_NAME]
    assert data.source.startswith(f"fashion-mnist from {DEBIAN_FASHION} (Debian package dataset-fashion-mnist); ")
    again = load_data("fashion-mnist", None, "cpu", download=True)
    assert "decoded copy read from" in again.source
    assert torch.equal(again.train.images, data.train.images) and torch.equal(again.test.labels, data.test.labels)
    train, test = data.train, data.test
    assert (train.num_samples, test.num_samples) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    x, y = next(test.batches(10000))
    lo, hi = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.min()) - lo) < 1e-5 and abs(float(x.max()) - hi) < 1e-5
    assert 0.2 < float(train.images.float().mean()) / 255 < 0.4  # Fashion-MNIST: 0.286


# --------------------------------------------------------------------------- batches

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _split(n, *, train=True, augment=True, c=3, hw=8):
    """Random images; labels = sample index, so every batch says which samples it holds."""
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)
    return TensorSplit(images, torch.arange(n), MEAN[:c], STD[:c], train=train, augment=augment)


def _denormalise(split, x):
    return ((x + split.normalise.shift) / split.normalise.scale).round().to(torch.uint8)


def _all(split, *args, **kw):
    return list(split.batches(*args, **kw))


def test_train_batches_are_deterministic_per_seed_and_epoch():
    s = _split(50)
    a, b = _all(s, 8, epoch=3, seed=1), _all(s, 8, epoch=3, seed=1)
    assert len(a) == 6 == s.num_batches(8)  # 50 // 8: the partial batch is dropped
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    for other in (_all(s, 8, epoch=4, seed=1), _all(s, 8, epoch=3, seed=2)):
        assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in other]))
    seen = torch.cat([y for _, y in a])
    assert len(seen.unique()) == 48  # a permutation: no sample twice in an epoch


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_concatenate_to_the_single_process_batch(world_size):
    s = _split(70)
    single = _all(s, 12, epoch=2, seed=9)
    ranks = [_all(s, 12, epoch=2, seed=9, rank=r, world_size=world_size)
             for r in range(world_size)]
    assert all(len(r) == len(single) == 5 for r in ranks)
    for i, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([r[i][0] for r in ranks]), x)  # augmentation included
        assert torch.equal(torch.cat([r[i][1] for r in ranks]), y)
        assert all(r[i][0].shape[0] == 12 // world_size for r in ranks)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 10, 13])
def test_test_shards_cover_every_sample_once(world_size, n):
    s = _split(n, train=False)
    batch = 2 * world_size
    seen = []
    for rank in range(world_size):
        batches = _all(s, batch, rank=rank, world_size=world_size)
        assert len(batches) == s.num_batches(batch, rank=rank, world_size=world_size)
        assert all(1 <= len(y) <= batch // world_size for _, y in batches)
        ys = torch.cat([y for _, y in batches]) if batches else torch.empty(0, dtype=torch.long)
        if len(ys):
            assert torch.equal(ys, torch.arange(int(ys[0]), int(ys[0]) + len(ys)))  # contiguous
        seen.append(ys)
    assert torch.equal(torch.cat(seen), torch.arange(n))


def test_bad_batch_sizes_raise_at_the_call():
    s = _split(10)
    with pytest.raises(UsageError, match="does not split evenly over 4 processes"):
        s.batches(6, world_size=4)
    with pytest.raises(UsageError, match="larger than the 10 training samples"):
        s.batches(16)
    with pytest.raises(UsageError, match="at least 1"):
        _split(10, train=False).batches(0)


def test_normalisation_uses_the_constants_in_float32():
    s = _split(5, train=False, augment=False)
    (x, y), = _all(s, 5)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = (s.images.double() / 255 - mean.double()) / std.double()
    assert x.dtype == torch.float32 and torch.allclose(x.double(), expected, atol=1e-6)


def test_crop_flip_is_a_padded_crop_then_a_mirror():
    x = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    centre = torch.full((4, 2), 4)
    no, yes = torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    assert torch.equal(crop_flip(x, centre, no), x)
    assert torch.equal(crop_flip(x, centre, yes), x.flip(-1))
    corner = crop_flip(x, torch.zeros(4, 2, dtype=torch.long), no)
    assert corner[:, :, :4].eq(0).all() and corner[:, :, :, :4].eq(0).all()
    assert torch.equal(corner[:, :, 4:, 4:], x[:, :, :2, :2])
    far = crop_flip(x, torch.tensor([[8, 8], [8, 0], [0, 8], [5, 3]]), yes)
    # rows/cols 8..13 of the padded image: x's last 2 rows/cols, then padding; mirrored
    assert torch.equal(far[0, :, :2, 4:], x[0, :, 4:, 4:].flip(-1))
    assert far[0, :, 2:].eq(0).all() and far[0, :, :, :4].eq(0).all()
    assert torch.equal(far[3], torch.nn.functional.pad(x[3], (4,) * 4)[:, 5:11, 3:9].flip(-1))


def test_train_augmentation_draws_every_crop_and_both_flips():
    s = _split(300, hw=10)
    padded = torch.nn.functional.pad(s.images, (4, 4, 4, 4))
    shifts, flips = set(), []
    for x, y in s.batches(100, seed=4):
        raw = _denormalise(s, x)
        for img, i in zip(raw, y.tolist(), strict=True):
            matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                       if torch.equal(img, padded[i, :, dy:dy + 10, dx:dx + 10].flip(-1)
                                      if f else padded[i, :, dy:dy + 10, dx:dx + 10])]
            assert matches, f"sample {i} is not a crop of its padded source"
            shifts.add(matches[0][:2])
            flips.append(matches[0][2])
    assert {dy for dy, _ in shifts} == set(range(9)) == {dx for _, dx in shifts}
    assert 0.35 < sum(flips) / len(flips) < 0.65


def test_test_and_mnist_batches_are_not_augmented():
    s = _split(6, train=False)
    (x, _), = _all(s, 6)
    assert torch.equal(_denormalise(s, x), s.images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches():
    cpu = _split(300, hw=32)
    cuda = TensorSplit(cpu.images, cpu.labels, MEAN, STD, train=True, augment=True,
                       device="cuda")
    assert cuda.images.is_cuda and cuda.images.dtype == torch.uint8
    pairs = list(zip(cpu.batches(64, epoch=1, seed=3), cuda.batches(64, epoch=1, seed=3), strict=True))
    assert len(pairs) == cpu.num_batches(64) == 4  # 300 // 64
    for (x, y), (xc, yc) in pairs:
        assert xc.is_cuda and yc.is_cuda
        assert torch.equal(xc.cpu(), x) and torch.equal(yc.cpu(), y)


# --------------------------------------------------------------------------- imagenet

@pytest.fixture
def tiny_imagenet(tmp_path):
    root = tmp_path / "tree"
    write_imagefolder(root / "train", ["n01", "n02", "n03"], per_class=4, seed=1)
    write_imagefolder(root / "val", ["n01", "n02", "n03"], per_class=2, seed=2)
    return root


def test_imagenet_tree_loads_and_batches(tiny_imagenet):
    from PIL import Image
    from torchvision import transforms as T

    data = load_data("imagenet", tiny_imagenet, "cpu", workers=0)
    assert data.info.num_classes == 3 and data.info.in_shape == (3, 224, 224)
    assert (data.train.num_samples, data.test.num_samples) == (12, 6)
    train = list(data.train.batches(5, epoch=0, seed=0))
    assert len(train) == 2 == data.train.num_batches(5)
    assert all(x.shape == (5, 3, 224, 224) and x.dtype == torch.float32 for x, _ in train)
    test = list(data.test.batches(4))
    assert [len(y) for _, y in test] == [4, 2]
    assert torch.equal(torch.cat([y for _, y in test]), torch.tensor([0, 0, 1, 1, 2, 2]))
    # The first val image through the standard test transform, normalised by the ImageNet constants.
    img = Image.open(tiny_imagenet / "val" / "n01" / "0.jpg").convert("RGB")
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize(DATASETS["imagenet"].mean, DATASETS["imagenet"].std)])(img)
    assert torch.allclose(test[0][0][0], ref, atol=1e-5)
    # Same seed and epoch, same shuffle; world_size 2: disjoint halves of the test set.
    again = list(data.train.batches(5, epoch=0, seed=0))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(train, again, strict=True))
    halves = [torch.cat([y for _, y in data.test.batches(4, rank=r, world_size=2)])
              for r in (0, 1)]
    assert torch.equal(torch.cat(halves), torch.tensor([0, 0, 1, 1, 2, 2]))
    per_rank = list(data.train.batches(4, rank=1, world_size=2))
    assert len(per_rank) == data.train.num_batches(4, rank=1, world_size=2) == 3
    assert all(x.shape == (2, 3, 224, 224) for x, _ in per_rank)


def test_imagenet_found_through_env_or_explained(tiny_imagenet, tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGENET_PATH", raising=False)
    with pytest.raises(UsageError, match=r"no train/ and val/.*\$IMAGENET_PATH"):
        load_data("imagenet", tmp_path / "elsewhere", workers=0)
    monkeypatch.setenv("IMAGENET_PATH", str(tiny_imagenet))
    assert load_data("imagenet", tmp_path / "elsewhere", workers=0).test.num_samples == 6


@pytest.mark.slow
def test_imagenet_worker_processes_yield_the_same_test_batches(tiny_imagenet):
    data = load_data("imagenet", tiny_imagenet, workers=0)
    pooled = load_data("imagenet", tiny_imagenet, workers=2)
    pairs = list(zip(data.test.batches(4), pooled.test.batches(4), strict=True))
    assert len(pairs) == 2  # 6 images in batches of 4
    for (x0, y0), (x2, y2) in pairs:
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


# --------------------------------------------------------------------------- packaging

def test_import_needs_torch_alone():
    # Compared with what torch itself imports (some torch builds pull in numpy or tqdm).
    code = ("import sys, torch; before = set(sys.modules); import torch_agd.data; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "bad = new & {'torchvision', 'numpy', 'PIL', 'tqdm', 'matplotlib'}; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
