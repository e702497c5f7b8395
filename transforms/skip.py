"""Incremental runs: skip images whose key is already in earlier results (`--skip_keys_from`).

Design (sized for a nightly job over a bucket that grows to 100M+ keys):
- Only the `key` column of the earlier Parquet files is read (column projection), local or gs://
  through Beam `FileSystems`, one row group at a time: no step holds all key strings at once.
- Each key becomes a 16-byte digest (128-bit BLAKE2b of its UTF-8 bytes). Each file gives one
  sorted NumPy array of digests (dtype `S16`); the arrays are merged by one `CombineGlobally`
  into a single sorted, de-duplicated array, the side input of the filter.
- The filter looks records up in batches with `np.searchsorted` (binary search): O(log n) a key,
  no Python object per known key. A worker holds 16 bytes per known key (plus a transient copy
  while the side input is decoded); measured peak RSS growth is in the README ("Skipping at scale").
- A wrong skip (an unknown key whose digest equals a known one) would silently lose an image. With
  n known keys and m inputs, by the union bound P(any wrong skip) <= m * n / 2**128: for n = m =
  1e9 that is 2.9e-21, far below 1e-15. A digest is never taken for anything but membership.

`pattern` is a glob, or several comma-separated (like `--input`). A pattern that matches no file
skips nothing (a first nightly run has no earlier results yet) and logs a warning. Only results
are skipped: images that failed before are tried again.
"""

import hashlib
import logging
from typing import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindows

from transforms import counters
from transforms.gcs import GcsDoFn
from transforms.outputs import open_parquet
from transforms.read import match_files, split_patterns  # noqa: F401 (split_patterns re-exported)
from transforms.records import ImageRecord

DIGEST_BYTES = 16
DIGEST_DTYPE = np.dtype(f"S{DIGEST_BYTES}")  # fixed width: compares as raw bytes (memcmp)
KEY_BATCH_ROWS = 65_536  # keys hashed at a time while reading a results file
LOOKUP_BATCH = 256  # records looked up at a time by the filter
_LOG = logging.getLogger(__name__)


def key_digests(keys: Iterable[str]) -> np.ndarray:
    """The 16-byte BLAKE2b digests of `keys` (UTF-8), in order, as an `S16` array."""
    joined = b"".join(
        hashlib.blake2b(k.encode("utf-8"), digest_size=DIGEST_BYTES).digest() for k in keys
    )
    return np.frombuffer(joined, dtype=DIGEST_DTYPE)


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


def contains(known: np.ndarray, keys: Sequence[str]) -> np.ndarray:
    """Boolean mask: which of `keys` have their digest in the sorted digest array `known`."""
    queries = key_digests(keys)
    if len(known) == 0:
        return np.zeros(len(queries), dtype=bool)
    at = np.searchsorted(known, queries)
    found = at < len(known)
    found[found] = known[at[found]] == queries[found]
    return found


def iter_key_batches(path: str, batch_rows: int = KEY_BATCH_ROWS) -> Iterator[list]:
    """The `key` column of one Parquet file, row group by row group, as lists of Python strings."""
    with open_parquet(path) as parquet:
        if "key" not in parquet.schema_arrow.names:
            raise KeyError(
                f"{path} has no 'key' column (columns: {parquet.schema_arrow.names}); "
                "--skip_keys_from takes results-*.parquet files of this job"
            )
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=["key"]):
            yield batch.column(0).to_pylist()


def read_keys(path: str) -> list:
    """The `key` column of one Parquet file, as Python strings (small files and tests)."""
    return [k for batch in iter_key_batches(path) for k in batch]


def file_digests(path: str) -> np.ndarray:
    """Sorted unique digests of the keys of one results file, read in batches."""
    parts = [key_digests(batch) for batch in iter_key_batches(path)]
    if not parts:
        return np.empty(0, dtype=DIGEST_DTYPE)
    return sorted_unique(np.concatenate(parts) if len(parts) > 1 else parts[0])


class MergeDigests(beam.CombineFn):
    """Sorted digest arrays -> one sorted, de-duplicated array (the known-key set)."""

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, digests):
        accumulator.append(digests)
        return accumulator

    def merge_accumulators(self, accumulators):
        return [a for acc in accumulators for a in acc]

    def compact(self, accumulator):
        return [self.extract_output(accumulator)] if len(accumulator) > 1 else accumulator

    def extract_output(self, accumulator):
        if not accumulator:
            return np.empty(0, dtype=DIGEST_DTYPE)
        if len(accumulator) == 1:
            return accumulator[0]
        merged = np.concatenate(accumulator)
        accumulator.clear()  # let the parts go before sorting
        return sorted_unique(merged)


class _ExpandGlob(GcsDoFn):
    """Glob -> the Parquet files it matches (none is fine: nothing to skip)."""

    def process(self, pattern: str):
        paths = match_files(pattern)
        if not paths:
            _LOG.warning("--skip_keys_from %s matched no files: nothing is skipped", pattern)
        yield from paths


class _FileDigests(GcsDoFn):
    """Results file -> its keys' digests, one sorted array."""

    def process(self, path: str):
        yield file_digests(path)


class _DropKnown(beam.DoFn):
    """Looks records up LOOKUP_BATCH at a time; yields the unknown ones in their order."""

    def __init__(self):
        self._skipped = counters.SKIPPED_IMAGES.metric()

    def start_bundle(self):
        self._pending = []

    def process(self, record: ImageRecord, known):
        self._pending.append(record)
        self._known = known
        if len(self._pending) >= LOOKUP_BATCH:
            yield from self._flush()

    def finish_bundle(self):
        for record in self._flush():  # a batch job: every record is in the global window
            yield GlobalWindows.windowed_value(record)

    def _flush(self):
        pending, self._pending = self._pending, []
        if not pending:
            return
        mask = contains(self._known, [r.key for r in pending])
        skipped = int(mask.sum())
        if skipped:
            self._skipped.inc(skipped)
        for record, known in zip(pending, mask):
            if not known:
                yield record


class KnownKeys(beam.PTransform):
    """PBegin -> a one-element PCollection: the sorted `S16` digest array of every key in the
    results matching `pattern` (see `contains`).

    Use it as `beam.pvalue.AsSingleton(p | KnownKeys(pattern))` to drop known inputs earlier than
    SkipKnownKeys does (e.g. image files by URI, before their bytes are read)."""

    def __init__(self, pattern):
        super().__init__()
        self._patterns = split_patterns(pattern)
        if not self._patterns:
            raise ValueError("--skip_keys_from needs at least one glob of results-*.parquet files")

    def expand(self, pbegin):
        return (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "Expand" >> beam.ParDo(_ExpandGlob())
            | "DistinctFiles" >> beam.Distinct()
            | "SpreadFiles" >> beam.Reshuffle()
            | "FileDigests" >> beam.ParDo(_FileDigests())
            | "Merge" >> beam.CombineGlobally(MergeDigests())
        )


class SkipKnownKeys(beam.PTransform):
    """PCollection[ImageRecord] -> the records whose key is not in the results matching `pattern`.

    Counter `bit_tagger/skipped_images`: records dropped (the summary's `skipped`)."""

    def __init__(self, pattern):
        super().__init__()
        self._known = KnownKeys(pattern)

    def expand(self, records):
        known = records.pipeline | "KnownKeys" >> self._known
        return records | "DropKnown" >> beam.ParDo(_DropKnown(), beam.pvalue.AsSingleton(known))
