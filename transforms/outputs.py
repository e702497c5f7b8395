"""The output directory around a run: the overwrite rule before, the accounting and summary after.

Files are read and written through Beam `FileSystems` and listed by `core.outputs`, so local
directories and gs:// prefixes are one code path.
"""

import collections
import contextlib
import json
from typing import Iterator

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter

from core.errors import UsageError
from core.outputs import FAILURES, RESULTS, match, output_files
from transforms import counters

OUTPUT_PATTERNS = (
    "results-*.parquet",
    "failures-*.parquet",
    "summary.json",
    "samples.parquet",
    "report.html",
)


@contextlib.contextmanager
def open_parquet(path: str) -> Iterator[pq.ParquetFile]:
    """The Parquet file at `path` (local or gs://), read by ranges: only the footer and the column
    chunks asked for are fetched, never the whole file (a results file is mostly embeddings)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        yield pq.ParquetFile(f)


class OutputExistsError(UsageError, RuntimeError):
    """The output directory already holds results and `--overwrite` was not given."""


def _match(pattern: str) -> list:
    try:
        return match(pattern)
    except Exception:  # noqa: BLE001 - an unreadable output directory holds no earlier run
        return []


def existing_outputs(output: str) -> list:
    """Paths of an earlier run's files in `output`."""
    return [path for name in OUTPUT_PATTERNS for path in _match(f"{output}/{name}")]


def prepare_output_dir(output: str, overwrite: bool) -> None:
    """Refuses to mix with an earlier run's files unless `overwrite`, in which case they are removed
    first (so no stale shard of a run with more shards survives)."""
    existing = existing_outputs(output)
    if existing and not overwrite:
        raise OutputExistsError(
            f"{output} already has results of an earlier run ({len(existing)} files, e.g. "
            f"{existing[0]}); pass --overwrite to replace them, or choose another --output"
        )
    if existing:
        FileSystems.delete(existing)


def _counter(metrics, counter: counters.Counter) -> int:
    """Sum of the job's `counter` over all steps that count it."""
    found = metrics.query(
        MetricsFilter().with_namespace(counter.namespace).with_name(counter.name)
    )["counters"]
    total = 0
    for c in found:
        value = c.committed if c.committed is not None else c.attempted
        total += value or 0
    return total


def _count_rows(paths) -> int:
    total = 0
    for path in paths:
        with open_parquet(path) as parquet:
            total += parquet.metadata.num_rows
    return total


def _failure_counts(paths):
    by_stage = collections.Counter()
    by_type = collections.Counter()
    for path in paths:
        with open_parquet(path) as parquet:
            table = parquet.read(columns=["stage", "error"])
        for stage, error in zip(
            table.column("stage").to_pylist(), table.column("error").to_pylist()
        ):
            by_stage[stage] += 1
            by_type[f"{stage}/{(error or '').split(':', 1)[0]}"] += 1
    return dict(by_stage), dict(by_type)


def summarize(output: str, metrics, wall_seconds: float) -> dict:
    """Counts of a finished run, from its output files (exact) and the job's counters.

    `inputs` counts every image record and every unreadable input unit (a corrupt shard's rest, a
    record without an image, a duplicate key) the readers met, less the ones skipped as already
    known; the identity inputs == results + failures must hold."""
    results = _count_rows(output_files(output, RESULTS))
    failure_paths = output_files(output, FAILURES)
    failures = _count_rows(failure_paths)
    by_stage, by_type = _failure_counts(failure_paths)
    skipped = _counter(metrics, counters.SKIPPED_IMAGES)
    inputs = (
        _counter(metrics, counters.READ_IMAGES)
        + _counter(metrics, counters.READ_FAILURES)
        - skipped
    )
    return {
        "inputs": inputs,
        "results": results,
        "failures": failures,
        "skipped": skipped,
        "accounted": inputs == results + failures,
        "failure_rate": failures / inputs if inputs else 0.0,
        "failures_by_stage": by_stage,
        "failures_by_type": by_type,
        "counters": {c.name: _counter(metrics, c) for c in counters.SUMMARY},
        "wall_seconds": round(wall_seconds, 3),
        "images_per_second": round(results / wall_seconds, 3) if wall_seconds else 0.0,
    }


def read_summary(output: str) -> dict | None:
    """The `summary.json` of a finished run in `output`, or None when there is none (the report)."""
    path = f"{output}/summary.json"
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def write_summary(output: str, summary: dict) -> str:
    path = f"{output}/summary.json"
    with FileSystems.create(path, mime_type="application/json") as f:
        f.write(json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
    return path
