"""Whole-file writes that readers and crashes never see half done.

Local files: written to a temporary file in the same directory, flushed to disk (`fsync`), then
renamed over the target (`os.replace`, atomic on POSIX), and the directory entry flushed: after a
crash the file holds either the old bytes or the new ones. Cloud Storage objects are replaced
atomically by one upload, so gs:// paths are written directly.
"""

from __future__ import annotations

import os
import tempfile


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def atomic_write(path: str, data: bytes) -> None:
    """Replace the file at `path` with `data`, all or nothing (see the module docstring)."""
    if is_remote(path):
        from core import storage

        with storage.open_file(path, "wb") as f:
            f.write(data)
        return
    path = path[len("file://") :] if path.startswith("file://") else path
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets; this is a plain file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: str) -> None:
    """Flush a directory's entries (a rename or unlink in it) to disk; a no-op where directories
    cannot be opened (not POSIX)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
