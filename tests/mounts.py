"""Small filesystems for tests of what the tools do with a read-only folder or a full disk.

The test machines run as root, and root writes into any folder whatever its mode, so a read-only
folder is a read-only tmpfs and a full disk a tiny one. `tmpfs(path, options)` mounts one at `path`
(created if needed) for the `with` block and unmounts it lazily after (a file the code under test
still holds open does not block that); where mounting is not allowed, the test is skipped.
"""

import contextlib
import pathlib
import subprocess

import pytest


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, options: str = "size=64k"):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def read_only(path: pathlib.Path):
    """A read-only folder at `path` (a `with` block)."""
    return tmpfs(path, "ro,size=64k")
