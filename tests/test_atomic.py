"""core/atomic.py: a file is replaced whole or not at all."""

import os
import stat

import pytest

from core import atomic
from core.atomic import atomic_write


def test_replaces_the_file_with_a_plain_file_mode(tmp_path):
    path = tmp_path / "index.json"
    path.write_text("old")
    atomic_write(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~atomic._umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "index.json"
    path.write_text("old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(str(path), b"new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
