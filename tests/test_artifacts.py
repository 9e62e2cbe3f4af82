"""Atomic writes: complete files or nothing, the usual permissions, no temporary left behind."""

import os
import stat

import pytest

from sourcetrace.artifacts import atomic_write, atomic_write_bytes


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_bytes_creates_folders_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "x.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, memoryview(b"second"))
    assert target.read_bytes() == b"second"
    assert sorted(os.listdir(target.parent)) == ["x.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(target) == 0o666 & ~umask
    assert _mode(target) == _mode(atomic_write(tmp_path / "y.bin", lambda tmp: open(tmp, "wb").close()))


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, 12345)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]
