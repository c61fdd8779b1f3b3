"""atomic_file: the old file or the new one, never half of one, with ordinary permissions."""
import os
import stat

import pytest

from torch_agd.atomic import atomic_file, atomic_write_bytes


def test_replaces_the_file_with_plain_open_permissions(tmp_path):
    path = tmp_path / "sub" / "x.bin"
    old = os.umask(0o022)
    try:
        atomic_write_bytes(path, b"one")
        atomic_write_bytes(path, b"two")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["x.bin"]


def test_a_failure_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_bytes(path, b"good")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path) as f:
            f.write(b"half of a ne")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
