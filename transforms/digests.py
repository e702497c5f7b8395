"""Sorted files of 16-byte key digests: written in runs, merged block-wise, looked up by blocks.

The known keys of `--skip_keys_from` (transforms/skip.py) live in these files, so no step holds
all of them in memory (docs/incremental-runs.md):
- A *digest file* is the raw concatenation of 128-bit BLAKE2b digests of keys (UTF-8), strictly
  increasing as unsigned bytes (NumPy's `S16` order), no header: its size is 16 x its count.
- `write_run` sorts one bounded batch of digests (a run) and writes it.
- `merge_files` merges runs into one de-duplicated digest file by a k-way merge a block of each run
  at a time (NumPy sorts of the blocks, no Python object per key), in passes of at most
  `MAX_FAN_IN` runs; its memory is `MERGE_BUDGET`-bounded whatever the number of keys. The result
  appears atomically (written under a temporary name, then renamed).
- `DigestSet` opens a digest file (a gs:// one is first copied to an unnamed local temporary
  file), checks its size and order while reading it once, and keeps one digest per 4 KiB block in
  memory (1/256 of the file), so that a lookup reads one block of the file (`os.pread`).

All paths go through Beam `FileSystems` (local, gs://, any filesystem Beam knows).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import weakref
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

DIGEST_BYTES = 16
DIGEST_DTYPE = np.dtype(f"S{DIGEST_BYTES}")  # fixed width: compares as raw bytes (memcmp)
BLOCK = 4096 // DIGEST_BYTES  # digests a block read by a lookup (a page); one fence a block
READ_BYTES = 1 << 20  # a sequential read: 256 blocks
MERGE_BUDGET = 8 << 20  # bytes of run blocks a merge holds, whatever its fan-in
MAX_FAN_IN = 128  # runs merged at once; more are merged in passes


class DigestFileError(ValueError):
    """A digest file whose size or order is not what was written: damaged or replaced."""


# ------------------------------------------------------------------------------------- digests


def bytes_digests(keys: Iterable[bytes]) -> np.ndarray:
    """The 16-byte BLAKE2b digests of byte strings, in order, as an `S16` array."""
    joined = b"".join(hashlib.blake2b(k, digest_size=DIGEST_BYTES).digest() for k in keys)
    return np.frombuffer(joined, dtype=DIGEST_DTYPE)


def key_digests(keys: Iterable[str]) -> np.ndarray:
    """The digests of `keys` (their UTF-8 bytes), in order, as an `S16` array.

    A key holding lone surrogates (no valid UTF-8) is hashed from its surrogate-passing bytes: no
    error, and no match with any key a Parquet file can hold (those are valid UTF-8)."""
    return bytes_digests(k.encode("utf-8", "surrogatepass") for k in keys)


def sorted_unique(digests: np.ndarray) -> np.ndarray:
    """`digests` sorted with duplicates removed (sorts in place when it may)."""
    if not digests.flags.writeable:  # np.frombuffer's arrays are read-only
        digests = digests.copy()
    digests.sort()
    if len(digests) < 2:
        return digests
    keep = np.empty(len(digests), dtype=bool)
    keep[0] = True
    np.not_equal(digests[1:], digests[:-1], out=keep[1:])
    return digests if keep.all() else digests[keep]


def _check_increasing(digests: np.ndarray, previous, where: str) -> None:
    """Raises DigestFileError unless `digests` strictly increase, and start above `previous`."""
    if len(digests) and previous is not None and not digests[0] > previous:
        raise DigestFileError(f"{where} is not sorted: a block starts at or below the one before")
    if len(digests) > 1 and not np.all(digests[1:] > digests[:-1]):
        raise DigestFileError(f"{where} is not sorted (digests out of order or repeated)")


# --------------------------------------------------------------------------------- file access


def is_local(path: str) -> bool:
    return "://" not in path


def _open(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _create(path: str):
    return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _read_exact(f, size: int) -> bytes:
    """`size` bytes of `f`, fewer only at its end (some streams return short reads)."""
    data = f.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = f.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _chunks(f, path: str, size: int = READ_BYTES) -> Iterator[np.ndarray]:
    """The digests of stream `f`, `size` bytes at a time (the last chunk may be shorter)."""
    while True:
        data = _read_exact(f, size)
        if not data:
            return
        if len(data) % DIGEST_BYTES:
            raise DigestFileError(f"{path} is damaged: its size is not a multiple of 16 bytes")
        yield np.frombuffer(data, dtype=DIGEST_DTYPE)


def _raw(digests: np.ndarray) -> memoryview:
    """The bytes of a contiguous digest array, without a copy (a 16 MiB copy a run would leave
    the allocator's heap larger after every run)."""
    return memoryview(np.ascontiguousarray(digests)).cast("B")


def write_run(path: str, digests: np.ndarray) -> int:
    """Writes `digests` (any order, repeats allowed) sorted and de-duplicated; returns the count."""
    run = sorted_unique(digests)
    with _create(path) as f:
        f.write(_raw(run))
    return len(run)


def remove(paths: Sequence[str]) -> None:
    """Deletes files that exist (a retried step may have removed some already)."""
    existing = [p for p in paths if FileSystems.exists(p)]
    if existing:
        FileSystems.delete(existing)


# -------------------------------------------------------------------------------------- merging


class _Run:
    """One sorted input of a merge, read a block at a time (and checked to be sorted)."""

    def __init__(self, path: str, block: int):
        self.path = path
        self.buf = np.empty(0, DIGEST_DTYPE)
        self.done = False
        self._file = _open(path)
        self._chunks = _chunks(self._file, path, block * DIGEST_BYTES)
        self._last = None
        self._block = block

    def fill(self) -> None:
        """Tops the buffer up with the next block once it is under half a block."""
        if self.done or len(self.buf) >= self._block // 2:
            return
        block = next(self._chunks, None)
        if block is None:
            self.done = True
            self._file.close()
            return
        _check_increasing(block, self._last, self.path)
        self._last = block[-1]
        self.buf = np.concatenate([self.buf, block]) if len(self.buf) else block


def _merge_once(paths: Sequence[str], write: Callable[[np.ndarray], None], budget: int) -> int:
    """K-way merge of sorted digest files into `write` calls of sorted, de-duplicated blocks.

    Each round emits every buffered digest up to the smallest last buffered digest of the runs
    not yet exhausted: no unread digest of any run is at or below it, so each round's digests
    are complete up to that bound, and rounds never overlap (duplicates across runs meet in one
    round). Returns the count written."""
    block = max(BLOCK, budget // DIGEST_BYTES // max(1, len(paths)))
    runs = [_Run(p, block) for p in paths]
    count = 0
    while True:
        for run in runs:
            run.fill()
        live = [r for r in runs if len(r.buf)]
        if not live:
            return count
        pending = [r.buf[-1] for r in live if not r.done]
        bound = min(pending) if pending else None
        parts = []
        for run in live:
            cut = len(run.buf) if bound is None else int(np.searchsorted(run.buf, bound, "right"))
            if cut:
                parts.append(run.buf[:cut])
                run.buf = run.buf[cut:]
        merged = sorted_unique(np.concatenate(parts)) if len(parts) > 1 else parts[0]
        write(merged)
        count += len(merged)


def merge_files(paths: Sequence[str], out: str, budget: int = None, fan_in: int = None) -> int:
    """Merges sorted digest files into one sorted, de-duplicated digest file `out`; returns its
    count. `out` appears whole or not at all (written as `out`.tmp-..., then renamed); more than
    `fan_in` inputs are merged in passes through `out`.pass-... files, removed afterwards.
    Defaults: MERGE_BUDGET, MAX_FAN_IN."""
    budget = budget or MERGE_BUDGET
    fan_in = fan_in or MAX_FAN_IN
    if fan_in < 2:
        raise ValueError(f"fan_in must be at least 2, got {fan_in}")
    scratch = []
    tmp = f"{out}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        level, paths = 0, list(paths)
        while len(paths) > fan_in:
            merged = []
            for i in range(0, len(paths), fan_in):
                part = f"{out}.pass{level}-{i // fan_in:05d}"
                scratch.append(part)
                _merge_into(paths[i : i + fan_in], part, budget)
                merged.append(part)
            paths, level = merged, level + 1
        count = _merge_into(paths, tmp, budget)
        FileSystems.rename([tmp], [out])
    except BaseException:
        remove(scratch + [tmp])
        raise
    remove(scratch)
    return count


def _merge_into(paths: Sequence[str], out: str, budget: int) -> int:
    with _create(out) as f:
        return _merge_once(paths, lambda digests: f.write(_raw(digests)), budget)


# -------------------------------------------------------------------------------------- lookups


class DigestSet:
    """A sorted set of digests, in memory (an `S16` array) or in a digest file read by blocks, with
    its fences: the first digest of every 4 KiB block, kept in memory. A lookup searches the fences
    for the one block a digest can be in, then compares the digest with that block's 256.

    A file's blocks are read with `os.pread`, one 4 KiB block a lookup into a transient buffer:
    the file stays in the page cache, not in the process. (Not memory-mapped: the kernel maps 16
    pages around every fault of a mapping, whatever `madvise` says, so 2,000 lookups made 145 MiB
    of a 160 MB mapped file resident.)"""

    def __init__(self, digests: np.ndarray = None, fences: np.ndarray = None, file=None, count=0):
        self._digests = digests  # in memory, or None for a file
        self._file = file  # an open binary file, kept open while the set lives
        self._count = len(digests) if digests is not None else count
        if fences is None:
            fences = digests[::BLOCK].copy()
        self._fences = fences

    @classmethod
    def open(cls, path: str, count: int) -> DigestSet:
        """The digest file `path` of `count` digests (unless local, copied first to an unnamed
        temporary file, freed when the set is). Reads the file once, sequentially, to check its
        size and order and to take the fences."""
        if is_local(path):
            size = os.path.getsize(path)
            if size != count * DIGEST_BYTES:
                raise DigestFileError(
                    f"{path} is damaged: {size:,} bytes, not the {count:,} digests written"
                )
            f = open(path, "rb", buffering=0)
            try:
                return cls(fences=_scan(_chunks(f, path), count, path), file=f, count=count)
            except BaseException:
                f.close()
                raise
        # an unnamed temporary file: nothing is left behind, even by a killed worker
        copy = tempfile.TemporaryFile(prefix="bit-tagger-known-keys-")
        try:
            with _open(path) as remote:
                fences = _scan(_copied(_chunks(remote, path), copy), count, path)
            copy.flush()
            return cls(fences=fences, file=copy, count=count)
        except BaseException:
            copy.close()
            raise

    def __len__(self) -> int:
        return self._count

    def _blocks(self, blocks: np.ndarray) -> np.ndarray:
        """The digests of `blocks` (block numbers), one row of BLOCK each; the last block padded
        with its own last digest (a repeat, so it adds no member)."""
        n = self._count
        if self._digests is not None:
            index = blocks[:, None] * BLOCK + np.arange(BLOCK)
            return self._digests[np.minimum(index, n - 1)]
        block_bytes = BLOCK * DIGEST_BYTES
        rows = bytearray(len(blocks) * block_bytes)
        fd = self._file.fileno()
        for i, block in enumerate(blocks.tolist()):
            data = os.pread(fd, block_bytes, block * block_bytes)
            if len(data) < block_bytes:  # the last block: repeat its last digest
                data += data[-DIGEST_BYTES:] * ((block_bytes - len(data)) // DIGEST_BYTES)
            rows[i * block_bytes : (i + 1) * block_bytes] = data
        return np.frombuffer(rows, dtype=DIGEST_DTYPE).reshape(len(blocks), BLOCK)

    def contains_digests(self, queries: np.ndarray) -> np.ndarray:
        """Boolean mask: which of the `S16` digests `queries` are in the set."""
        if self._count == 0 or len(queries) == 0:
            return np.zeros(len(queries), dtype=bool)
        # the one block a digest can be in: the last whose first digest is <= it
        blocks = np.maximum(np.searchsorted(self._fences, queries, "right") - 1, 0)
        rows = self._blocks(blocks).view(np.uint64).reshape(len(queries), BLOCK, 2)
        wanted = np.ascontiguousarray(queries).view(np.uint64).reshape(len(queries), 1, 2)
        return (rows == wanted).all(axis=2).any(axis=1)

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        """Boolean mask: which of `keys` have their digest in the set."""
        return self.contains_digests(key_digests(keys))


def _copied(chunks: Iterator[np.ndarray], copy) -> Iterator[np.ndarray]:
    for chunk in chunks:
        copy.write(_raw(chunk))
        yield chunk


def _scan(chunks: Iterator[np.ndarray], count: int, path: str) -> np.ndarray:
    """Checks that `chunks` hold exactly `count` strictly increasing digests; returns the fences.
    Chunks are whole blocks (READ_BYTES) but the last, so every BLOCK-th digest is a fence."""
    fences = []
    seen = 0
    last = None
    for chunk in chunks:
        _check_increasing(chunk, last, path)
        fences.append(chunk[::BLOCK].copy())
        last = chunk[-1]
        seen += len(chunk)
        if seen > count:
            break
    if seen != count:
        raise DigestFileError(
            f"{path} is damaged: {'more' if seen > count else 'fewer'} than the {count:,} "
            "digests written"
        )
    return np.concatenate(fences) if fences else np.empty(0, DIGEST_DTYPE)


_OPEN: weakref.WeakValueDictionary[tuple, DigestSet] = weakref.WeakValueDictionary()
_OPEN_LOCK = threading.Lock()


def open_shared(path: str, count: int) -> DigestSet:
    """`DigestSet.open(path, count)`, once per process while anything uses it: the DoFn instances
    (threads) of one worker process share one open file and one download."""
    with _OPEN_LOCK:
        found = _OPEN.get((path, count))
        if found is None:
            found = DigestSet.open(path, count)
            _OPEN[(path, count)] = found
        return found


def contains(known, keys: Sequence[str]) -> np.ndarray:
    """Boolean mask: which of `keys` are in `known`, a `DigestSet` or a sorted `S16` array."""
    if not isinstance(known, DigestSet):
        known = DigestSet(known)
    return known.contains(keys)
