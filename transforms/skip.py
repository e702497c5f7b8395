"""Incremental runs: skip images whose key is already in earlier results (`--skip_keys_from`).

Which files are known keys (docs/incremental-runs.md), decided while the graph is built, before
any image is read (the footers are read in parallel, by ranges):
- a results file of this job, recognised by its footer: the results columns (`key`, `tags`,
  `embedding`, ...) and the job's key-value metadata (`image_size`, `embedding_dtype`): its keys
  are skipped;
- the job's other Parquet outputs (`failures-*.parquet`, `samples.parquet`), recognised by their
  schemas: not used, with one warning, so that a glob over whole output folders still retries
  every image that failed before;
- anything else (not a regular file, not Parquet, damaged, another schema): `SkipSourceError`
  naming the path (a usage error, exit 2): a wrong file is never silently taken or left out.
A pattern that matches no file skips nothing (a first nightly run has no earlier results yet) and
logs a warning. `pattern` is a glob, or several comma-separated (like `--input`).

How the keys flow, memory flat in their number (a year of nightly runs: 100M+ keys):
1. Each key becomes a 16-byte digest (128-bit BLAKE2b of its UTF-8 bytes), read from the `key`
   column only, a row group at a time. Files are grouped to about `RUN_KEYS` keys; each group
   writes sorted runs of at most `RUN_KEYS` digests (16 MiB) into the run's work directory.
2. One step merges the runs into ONE sorted, de-duplicated digest file (transforms/digests.py:
   block-wise k-way merge, written atomically) and passes on only its path and count.
3. The filter opens that file once per worker process (a gs:// one copied to local disk first),
   keeps one digest a 4 KiB block in memory and looks records up `LOOKUP_BATCH` at a time: one
   block of the file read per lookup.

The work directory (`work_dir`) is `beam-temp-known-keys-<uuid>` under `--temp_location`, or under
`--output` without one (where Beam's file sinks put their `beam-temp-*` too); the launcher removes
it when the run ends, also when it fails (`remove_work_dir`).

A wrong skip (an unknown key whose digest equals a known one) would silently lose an image. With
n known keys and m inputs, by the union bound P(any wrong skip) <= m * n / 2**128: for n = m =
1e9 that is 2.9e-21, far below 1e-15. A digest is never taken for anything but membership.
"""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.transforms.window import GlobalWindows

from core.errors import UsageError
from core.schema import SPAN_COLUMNS, failures_schema, results_schema
from transforms import counters, digests
from transforms.digests import (  # noqa: F401 (re-exported: the known-key set's public names)
    DIGEST_BYTES,
    DIGEST_DTYPE,
    contains,
    key_digests,
    sorted_unique,
)
from transforms.gcs import GcsDoFn
from transforms.outputs import open_parquet
from transforms.read import match_files, split_patterns
from transforms.records import ImageRecord
from transforms.sample import samples_schema

RUN_KEYS = 1 << 20  # digests a run holds in memory while files are read (16 MiB)
KEY_BATCH_ROWS = 65_536  # keys hashed at a time while reading a results file
LOOKUP_BATCH = 256  # records looked up at a time by the filter
CHECK_THREADS = 16  # footers read at once while the graph is built
WORK_DIR_PREFIX = "beam-temp-known-keys-"
MERGED_NAME = "known-keys.s16"
RESULTS_FOOTER = ("image_size", "embedding_dtype")  # in every results footer the job has written
_LOG = logging.getLogger(__name__)


class SkipSourceError(UsageError, ValueError):
    """A file matched by `--skip_keys_from` that cannot be used: not a regular file, not Parquet,
    damaged, or neither results nor another output of this job (a usage error, exit 2)."""


class KnownKeysFile(NamedTuple):
    """A digest file (transforms/digests.py) and how many digests it holds."""

    path: str
    count: int


class SkipSource(NamedTuple):
    """A file matched by `--skip_keys_from`: `kind` "results" (used) or the name of another
    output of the job (left out); `rows` its row count."""

    path: str
    kind: str
    rows: int


# ----------------------------------------------------------------------- which files count


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def classify(path: str) -> SkipSource:
    """What the file at `path` is, from its Parquet footer only; raises SkipSourceError when it is
    neither results nor another output of this job."""
    if digests.is_local(path):
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise SkipSourceError(
                f"--skip_keys_from: cannot read {path}: {_one_line(exc)}"
            ) from exc
        if not stat.S_ISREG(mode):  # a FIFO would hang the reader
            raise SkipSourceError(f"--skip_keys_from: {path} is not a regular file")
    try:
        with open_parquet(path) as parquet:
            schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise SkipSourceError(
            f"--skip_keys_from: {path} is not a readable Parquet file ({_one_line(exc)})"
        ) from exc
    names = set(schema.names)
    footer = schema.metadata or {}
    # results written before the span columns existed are results too
    results_columns = set(results_schema(1).names) - set(SPAN_COLUMNS)
    if results_columns <= names:
        missing = [k for k in RESULTS_FOOTER if k.encode() not in footer]
        key_type = schema.field("key").type
        if not missing and (pa.types.is_string(key_type) or pa.types.is_large_string(key_type)):
            return SkipSource(path, "results", rows)
        why = f"its footer lacks {', '.join(missing)}" if missing else f"its key is {key_type}"
    else:
        for kind, other in (("failures", failures_schema()), ("samples", samples_schema())):
            if set(other.names) <= names and "embedding" not in names:
                return SkipSource(path, kind, rows)
        why = "no " + ", ".join(sorted(results_columns - names)) + " column"
    raise SkipSourceError(
        f"--skip_keys_from: {path} is not a results file of this job ({why}); "
        "give globs of results-*.parquet"
    )


def results_files(patterns: Sequence[str], threads: int = CHECK_THREADS) -> list:
    """The results files (SkipSource) the globs `patterns` match, each footer checked; warns about
    the job's other outputs left out and about patterns matching nothing."""
    paths = set()
    for pattern in patterns:
        try:
            matched = match_files(pattern)
        except OSError as exc:  # "cannot list" is not "nothing there"
            raise SkipSourceError(
                f"--skip_keys_from: cannot list {pattern}: {_one_line(exc)}"
            ) from exc
        if not matched:
            _LOG.warning("--skip_keys_from %s matched no files: nothing is skipped", pattern)
        paths.update(matched)
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        sources = list(pool.map(classify, sorted(paths)))
    others = [s for s in sources if s.kind != "results"]
    if others:
        _LOG.warning(
            "--skip_keys_from: %d matched file(s) are not results and are not used (e.g. %s); "
            "the images that failed before are tried again",
            len(others),
            others[0].path,
        )
    return [s for s in sources if s.kind == "results"]


def group_files(sources: Sequence[SkipSource], run_keys: int = None) -> list:
    """Paths grouped so that a group holds about `run_keys` keys: small files share a run, a big
    file is a group of its own (split into several runs while it is read). Empty files drop out.
    `run_keys` defaults to RUN_KEYS."""
    run_keys = run_keys or RUN_KEYS
    groups, group, rows = [], [], 0
    for source in sources:
        if source.rows == 0:
            continue
        if group and rows + source.rows > run_keys:
            groups.append(group)
            group, rows = [], 0
        group.append(source.path)
        rows += source.rows
    if group:
        groups.append(group)
    return groups


# ------------------------------------------------------------------------------ reading keys


def iter_key_batches(path: str, batch_rows: int = KEY_BATCH_ROWS) -> Iterator[list]:
    """The `key` column of one results file, a row group at a time, as lists of at most
    `batch_rows` UTF-8 byte strings (nulls left out). A file damaged past its footer raises
    SkipSourceError."""
    try:
        with open_parquet(path) as parquet:
            # a row group at a time (the job's hold thousands of keys): with pyarrow's
            # iter_batches the process grew by 2-4 MiB a million keys read from one big file
            for group in range(parquet.metadata.num_row_groups):
                keys = parquet.read_row_group(group, columns=["key"]).column(0)
                binary = pa.large_binary() if pa.types.is_large_string(keys.type) else pa.binary()
                for batch in keys.cast(binary).chunks:
                    for at in range(0, len(batch), batch_rows):
                        part = batch.slice(at, batch_rows).to_pylist()
                        yield [k for k in part if k is not None]
    except (OSError, ValueError, pa.ArrowException) as exc:
        if isinstance(exc, SkipSourceError):
            raise
        raise SkipSourceError(f"--skip_keys_from: {path} is damaged ({_one_line(exc)})") from exc


def read_keys(path: str) -> list:
    """The keys of one results file, as Python strings (small files and tests)."""
    return [k.decode("utf-8") for batch in iter_key_batches(path) for k in batch]


def write_runs(paths: Sequence[str], run_dir: str, run_keys: int = None) -> list:
    """Hashes the keys of `paths` into sorted runs of at most `run_keys` (default RUN_KEYS)
    digests, written as digest files under `run_dir`; returns their KnownKeysFiles. Holds one run
    and one batch of keys."""
    run_keys = run_keys or RUN_KEYS
    buffer = np.empty(run_keys, dtype=DIGEST_DTYPE)
    filled = 0
    runs = []

    def flush():
        path = f"{run_dir}/{uuid.uuid4().hex}.s16"
        runs.append(KnownKeysFile(path, digests.write_run(path, buffer[:filled])))

    for path in paths:
        for batch in iter_key_batches(path):
            hashed = digests.bytes_digests(batch)
            while len(hashed):
                take = min(len(hashed), run_keys - filled)
                buffer[filled : filled + take] = hashed[:take]
                filled += take
                hashed = hashed[take:]
                if filled == run_keys:
                    flush()
                    filled = 0
    if filled:
        flush()
    return runs


# ---------------------------------------------------------------------------- the work directory


def work_dir(options, output: str) -> str:
    """A new directory for one run's known-key files: under `--temp_location` when given (always
    on Dataflow), else under `output` (every worker can write there: the results go there)."""
    base = (options.view_as(GoogleCloudOptions).temp_location or output).rstrip("/")
    return f"{base}/{WORK_DIR_PREFIX}{uuid.uuid4().hex}"


def remove_work_dir(path: str) -> None:
    """Removes a run's work directory and everything in it (none there is fine); a failure to
    remove is logged, never raised (the run's outputs do not depend on it)."""
    try:
        if digests.is_local(path):
            if FileSystems.exists(path):
                FileSystems.delete([path])
        else:
            FileSystems.delete([path + "/"])  # a gs:// "folder": every object under the prefix
    except OSError as exc:
        _LOG.warning("could not remove the known-keys work directory %s: %s", path, exc)


# -------------------------------------------------------------------------------------- DoFns


class _WriteRuns(GcsDoFn):
    """A group of results files -> the sorted digest runs of their keys."""

    def __init__(self, run_dir: str):
        self._run_dir = run_dir

    def process(self, paths):
        try:
            runs = write_runs(paths, self._run_dir)
        except SkipSourceError as exc:
            # a file damaged past its footer: one line, exit 2. Beam-internal (checked against
            # 2.77): an exception already "tagged with its step" is re-raised as it is, without
            # the ERROR log and traceback Beam writes for other DoFn errors.
            exc._tagged_with_step = True
            raise
        yield from runs


class _MergeRuns(GcsDoFn):
    """All runs -> ONE sorted, de-duplicated digest file; the runs are removed after."""

    def __init__(self, directory: str):
        self._directory = directory

    def process(self, runs):
        out = f"{self._directory}/{MERGED_NAME}"
        found = FileSystems.match([out])[0].metadata_list
        if found:  # a retry of this step after the merged file was renamed into place
            yield KnownKeysFile(out, found[0].size_in_bytes // DIGEST_BYTES)
            return
        started = time.perf_counter()
        count = digests.merge_files([r.path for r in runs], out)
        digests.remove([r.path for r in runs])
        _LOG.info(
            "--skip_keys_from: %s known keys (from %d runs, merged in %.1f s)",
            f"{count:,}",
            len(runs),
            time.perf_counter() - started,
        )
        yield KnownKeysFile(out, count)


class _DropKnown(GcsDoFn):
    """Looks records up LOOKUP_BATCH at a time; yields the unknown ones in their order."""

    def __init__(self):
        self._skipped = counters.SKIPPED_IMAGES.metric()

    def setup(self):
        super().setup()
        self._file, self._known = None, None

    def start_bundle(self):
        self._pending = []

    def process(self, record: ImageRecord, known: KnownKeysFile):
        if known != self._file:
            self._known = digests.open_shared(known.path, known.count)
            self._file = known
        self._pending.append(record)
        if len(self._pending) >= LOOKUP_BATCH:
            yield from self._flush()

    def finish_bundle(self):
        for record in self._flush():  # a batch job: every record is in the global window
            yield GlobalWindows.windowed_value(record)

    def _flush(self):
        pending, self._pending = self._pending, []
        if not pending:
            return
        mask = self._known.contains([r.key for r in pending])
        skipped = int(mask.sum())
        if skipped:
            self._skipped.inc(skipped)
        for record, known in zip(pending, mask):
            if not known:
                yield record


# --------------------------------------------------------------------------------- transforms


class KnownKeys(beam.PTransform):
    """PBegin -> a one-element PCollection: the KnownKeysFile of every key in the results files
    matching `pattern`, one sorted digest file under `directory` (see `work_dir`).

    The files are checked when the transform is made (`results_files`: SkipSourceError). Open
    the file with `transforms.digests.open_shared(path, count)`; e.g. as
    `beam.pvalue.AsSingleton(p | KnownKeys(pattern, directory))` to drop known inputs earlier
    than SkipKnownKeys does."""

    def __init__(self, pattern, directory: str):
        super().__init__()
        patterns = split_patterns(pattern)
        if not patterns:
            raise ValueError("--skip_keys_from needs at least one glob of results-*.parquet files")
        self._directory = directory.rstrip("/")
        self._groups = group_files(results_files(patterns))

    def expand(self, pbegin):
        return (
            pbegin
            | "FileGroups" >> beam.Create(self._groups)
            | "SpreadGroups" >> beam.Reshuffle()
            | "DigestRuns" >> beam.ParDo(_WriteRuns(f"{self._directory}/runs"))
            | "AllRuns" >> beam.combiners.ToList()
            | "Merge" >> beam.ParDo(_MergeRuns(self._directory))
        )


class SkipKnownKeys(beam.PTransform):
    """PCollection[ImageRecord] -> the records whose key is not in the results matching `pattern`
    (`KnownKeys`; its files go under `directory`, which the caller removes after the run).

    Counter `bit_tagger/skipped_images`: records dropped (the summary's `skipped`)."""

    def __init__(self, pattern, directory: str):
        super().__init__()
        self._known = KnownKeys(pattern, directory)

    def expand(self, records):
        known = records.pipeline | "KnownKeys" >> self._known
        return records | "DropKnown" >> beam.ParDo(_DropKnown(), beam.pvalue.AsSingleton(known))
