"""A process-wide progress sink: the DoFns of an in-process run count what the launcher shows live.

Beam's counters of a run are only readable when `p.run()` returns, and the in-process runner blocks
until then. So the launcher `activate()`s a `ProgressSink` before the run, a thread of its own reads
`snapshot()` while the run goes on, and the transforms `add()` to it. Without an active sink (worker
processes of a multi-process or Dataflow run) `add` does nothing: those runs report progress through
their worker log lines and Beam counters instead.
"""

import threading
import time
from typing import Optional

import apache_beam as beam

from core.console import Snapshot

FILES = "files"  # files matched (inputs)
SHARD_FILES = "shard_files"  # of which TFRecord / tar shards (image count known after the read)
FILES_READ = "files_read"  # files and shards read to the end
READ = "read"  # images read (after skipping known keys)
DONE = "done"  # images with a result row
FAILED = "failed"  # images with a failure row (any stage)


class ProgressSink:
    """Thread-safe counters of one run (the in-process runner runs DoFns in several threads)."""

    def __init__(self, skipping: bool = False):
        self._lock = threading.Lock()
        self._counts = {FILES: 0, SHARD_FILES: 0, FILES_READ: 0, READ: 0, DONE: 0, FAILED: 0}
        self._skipping = skipping  # --skip_keys_from: some matched images will not be processed
        self.started = time.monotonic()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def matched(self, files: int, shards: int) -> None:
        """One input pattern's match: `files` files, `shards` of them shards."""
        with self._lock:
            self._counts[FILES] += files
            self._counts[SHARD_FILES] += shards

    def snapshot(self) -> Snapshot:
        with self._lock:
            c = dict(self._counts)
        total = None
        if c[FILES] and c[FILES_READ] >= c[FILES]:
            total = c[READ]
        elif c[FILES] and not c[SHARD_FILES] and not self._skipping:
            total = c[FILES]  # image files: one image each, known right after the match
        return Snapshot(c[DONE], c[FAILED], total, c[FILES], time.monotonic() - self.started)


_SINK: Optional[ProgressSink] = None


def activate(skipping: bool = False) -> ProgressSink:
    """Start collecting this process's counts (the launcher of an in-process run)."""
    global _SINK
    _SINK = ProgressSink(skipping)
    return _SINK


def deactivate() -> None:
    global _SINK
    _SINK = None


def active() -> bool:
    return _SINK is not None


def add(name: str, n: int = 1) -> None:
    """Count `n` events `name` in this process's sink, if there is one (cheap no-op otherwise)."""
    sink = _SINK
    if sink is not None:
        sink.add(name, n)


def matched(files: int, shards: int) -> None:
    sink = _SINK
    if sink is not None:
        sink.matched(files, shards)


class Tap(beam.DoFn):
    """A side branch that counts elements into the sink and emits nothing.

    `rows=True` counts the rows of Arrow record batches (the results) instead of elements."""

    def __init__(self, name: str, rows: bool = False):
        self._name, self._rows = name, rows

    def process(self, element):
        if _SINK is not None:
            _SINK.add(self._name, element.num_rows if self._rows else 1)
        return ()
