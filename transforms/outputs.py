"""The output directory around a run: staging, commit, recovery, and the accounting.

A run writes into a staging directory under its output and replaces the previous run only when it
commits (docs/outputs.md has the whole life cycle and its crash windows):

1. the launcher claims OUTPUT (`core.claim`), then `recover()` finishes a commit that a killed run
   had started, or removes what a run that died before committing left behind;
2. `check_previous()` refuses an earlier run's files without `--overwrite` (touching nothing);
3. `create_staging()` makes `OUTPUT/.staging-RUN/` (and so finds an OUTPUT that cannot be
   written); the job writes its results, failures and sample there;
4. `commit()`: `summary.json` is written into the staging directory (the new run is complete),
   then the previous run's `summary.json` is removed, its files removed, the new files moved in,
   and `summary.json` moved in last. `OUTPUT/summary.json` is the commit marker: results without
   it are an incomplete run (`run_state`);
5. a run that fails before step 4 removes its staging directory (`discard`).

All through Beam `FileSystems` (listing through `core.outputs`), so local directories and gs://
prefixes are one code path. Listing
or reading errors (a permission error on gs://) are raised as `OutputError`, never read as "no
output".
"""

import collections
import contextlib
import errno
import json
import logging
import os
import posixpath
from typing import Iterator

import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter

from core.errors import UsageError
from core.outputs import FAILURES, RESULTS, SUMMARY_FILE, match
from transforms import counters

_LOG = logging.getLogger(__name__)

try:  # what Beam's GCS client raises for a refused request (403, 404 on a bucket, ...)
    from google.api_core.exceptions import GoogleAPIError as _CloudError
except ImportError:  # pragma: no cover - Beam without its gcp extra
    _CloudError = OSError
# Errors of listing, reading or writing files: reported as `OutputError`, never as "no output".
IO_ERRORS = (BeamIOError, OSError, _CloudError)

REPORT_FILE = "report.html"
STAGING_PREFIX = ".staging-"
# What a run writes (moved in at commit), and everything of a run in OUTPUT.
RUN_PATTERNS = ("results-*.parquet", "failures-*.parquet", "samples.parquet")
OUTPUT_PATTERNS = (*RUN_PATTERNS, SUMMARY_FILE, REPORT_FILE)
COMPLETE, INCOMPLETE, EMPTY = "complete", "incomplete", "empty"


@contextlib.contextmanager
def open_parquet(path: str) -> Iterator[pq.ParquetFile]:
    """The Parquet file at `path` (local or gs://), read by ranges: only the footer and the column
    chunks asked for are fetched, never the whole file (a results file is mostly embeddings)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        yield pq.ParquetFile(f)


class OutputExistsError(UsageError, RuntimeError):
    """The output directory already holds results and `--overwrite` was not given."""


class OutputError(UsageError, RuntimeError):
    """The output cannot be listed, read or written (permissions, a full disk, damage)."""


def _reason(exc: BaseException) -> str:
    """The first underlying error of a Beam I/O error, as 'Type: message'."""
    details = getattr(exc, "exception_details", None)
    if isinstance(details, dict) and details:
        exc = next(iter(details.values()))
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def list_files(pattern: str) -> list:
    """The files one glob matches ([] when none); `OutputError` when they cannot be listed."""
    try:
        return match(pattern)
    except IO_ERRORS as e:
        raise OutputError(f"cannot list {pattern}: {_reason(e)}") from e


def _exists(path: str) -> bool:
    try:
        return FileSystems.exists(path)
    except IO_ERRORS as e:
        raise OutputError(f"cannot check {path}: {_reason(e)}") from e


def _name(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def existing_outputs(output: str) -> list:
    """Paths of an earlier run's files in `output` (complete or not)."""
    return [path for name in OUTPUT_PATTERNS for path in list_files(f"{output}/{name}")]


def run_state(output: str) -> str:
    """`COMPLETE` (summary.json, the commit marker, is there), `INCOMPLETE` (results, failures or
    a sample without it: a run that was killed or failed before committing, or is running) or
    `EMPTY`."""
    if _exists(f"{output}/{SUMMARY_FILE}"):
        return COMPLETE
    if any(list_files(f"{output}/{name}") for name in RUN_PATTERNS):
        return INCOMPLETE
    return EMPTY


def check_previous(output: str, overwrite: bool) -> list:
    """The earlier run's files in `output`; `OutputExistsError` when there are some and not
    `overwrite`. Nothing is removed here: a new run replaces them only when it commits."""
    existing = existing_outputs(output)
    if existing and not overwrite:
        state = (
            "an incomplete run"
            if not any(_name(p) == SUMMARY_FILE for p in existing)
            else "results of an earlier run"
        )
        raise OutputExistsError(
            f"{output} already has {state} ({len(existing)} files, e.g. {existing[0]}); pass "
            "--overwrite to replace them when this run commits, or choose another --output"
        )
    return existing


# ---------------------------------------------------------------------------------- staging


def staging_dir(output: str, run_id: str) -> str:
    return f"{output}/{STAGING_PREFIX}{run_id}"


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _write(path: str, data: bytes, mime_type: str) -> None:
    """Writes a whole small file, all or nothing (a gs:// object is one upload; locally a
    temporary file renamed over it, `core.atomic`)."""
    if _is_local(path):
        from core.atomic import atomic_write

        atomic_write(path, data)
        return
    with FileSystems.create(path, mime_type=mime_type) as f:
        f.write(data)


def create_staging(output: str, run_id: str) -> str:
    """Creates the run's staging directory under `output` (a probe file written and removed:
    an output that cannot be written fails here, before any image is read)."""
    staging = staging_dir(output, run_id)
    probe = f"{staging}/.probe"
    try:
        if _is_local(staging):
            os.makedirs(staging, exist_ok=True)
        with FileSystems.create(probe) as f:
            f.write(b"probe")
        FileSystems.delete([probe])
    except IO_ERRORS as e:
        raise OutputError(f"cannot write to {output}: {_reason(e)}") from e
    return staging


def _delete_tree(path: str) -> None:
    if _is_local(path):
        import shutil

        shutil.rmtree(path, ignore_errors=False)
    else:
        FileSystems.delete([path.rstrip("/") + "/"])


def discard(staging: str) -> None:
    """Removes a staging directory and everything in it (Beam's temporary files included). Never
    raises: it runs while another error propagates; a failure is logged (the next run into the
    output removes what is left)."""
    try:
        if _is_local(staging) and not os.path.exists(staging):
            return
        _delete_tree(staging)
    except IO_ERRORS as e:
        _LOG.warning("could not remove %s: %s (the next run into its output will)", staging, e)


def _children(output: str, prefix: str) -> list:
    """The folders directly in `output` whose name starts with `prefix` (local directories;
    on gs://, the prefixes objects are under)."""
    if _is_local(output):
        import glob

        local = output[len("file://") :] if output.startswith("file://") else output
        return sorted(p for p in glob.glob(os.path.join(glob.escape(local), prefix + "*")))
    found = set()
    for path in list_files(f"{output}/{prefix}*/**"):  # every object under those prefixes
        rest = path[len(output) + 1 :]
        if "/" in rest:
            found.add(f"{output}/{rest.split('/', 1)[0]}")
    return sorted(found)


def recover(output: str) -> None:
    """Leaves `output` as one run, complete or not, and nothing else: a staging directory whose
    run had committed (its summary.json written) is moved in (the commit a kill interrupted is
    finished); others, and temporary directories of Beam in `output`, are removed. Call only while
    holding the output's claim."""
    for staging in _children(output, STAGING_PREFIX):
        if _exists(f"{staging}/{SUMMARY_FILE}"):
            _LOG.warning("finishing the commit of a run into %s that was interrupted", output)
            _finish_commit(output, staging)
        else:
            _LOG.info("removing %s, left by a run that did not finish", staging)
            _delete_tree(staging)
    for temp in _children(output, "beam-temp-"):
        _delete_tree(temp)


def commit(output: str, staging: str, summary: dict) -> None:
    """Makes the staged run the output's run (see the module docstring); `summary` gains the
    list of the run's files (`files`) and is written last."""
    names = sorted(
        {_name(p) for pattern in RUN_PATTERNS for p in list_files(f"{staging}/{pattern}")}
    )
    summary["files"] = names
    _write(
        f"{staging}/{SUMMARY_FILE}",
        json.dumps(summary, indent=2, sort_keys=True, default=str).encode(),
        "application/json",
    )
    try:
        _finish_commit(output, staging)
    except (*IO_ERRORS, OutputError) as e:
        raise OutputError(
            f"the commit into {output} was interrupted ({_reason(e)}); the new run is complete "
            f"in {staging}: the next run into {output} finishes the commit"
        ) from e


def _finish_commit(output: str, staging: str) -> None:
    """Steps after the staged summary.json: each one can be repeated, so a commit interrupted at
    any point is finished by running this again (`recover`)."""
    with FileSystems.open(f"{staging}/{SUMMARY_FILE}") as f:
        names = set(json.loads(f.read())["files"])
    if _exists(f"{output}/{SUMMARY_FILE}"):
        FileSystems.delete([f"{output}/{SUMMARY_FILE}"])  # the previous run is now incomplete
    old = [p for p in existing_outputs(output) if _name(p) not in names]
    if old:
        FileSystems.delete(old)
    moves = [(f"{staging}/{n}", f"{output}/{n}") for n in sorted(names)]
    moves = [(src, dst) for src, dst in moves if _exists(src)]  # not yet moved
    if moves:
        FileSystems.rename([s for s, _ in moves], [d for _, d in moves])
    FileSystems.rename([f"{staging}/{SUMMARY_FILE}"], [f"{output}/{SUMMARY_FILE}"])
    _delete_tree(staging)


def committing(staging: str) -> bool:
    """Whether the run staged in `staging` has begun its commit (its summary.json is written):
    then it must be finished, never discarded. True when that cannot be checked."""
    try:
        return _exists(f"{staging}/{SUMMARY_FILE}")
    except OutputError:
        return True


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an error it wraps, or the text Beam re-raised it with) is a full disk
    or an exhausted quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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
    results = _count_rows(list_files(f"{output}/{RESULTS}-*.parquet"))
    failure_paths = list_files(f"{output}/{FAILURES}-*.parquet")
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
    """The `summary.json` of a committed run in `output`, or None when there is none. A summary
    that cannot be read or parsed is an `OutputError` (not "no summary")."""
    path = f"{output}/{SUMMARY_FILE}"
    if not _exists(path):
        return None
    try:
        with FileSystems.open(path) as f:
            summary = json.loads(f.read())
    except IO_ERRORS as e:
        raise OutputError(f"cannot read {path}: {_reason(e)}") from e
    except ValueError as e:
        raise OutputError(f"{path} is damaged (not JSON: {e})") from e
    if not isinstance(summary, dict):
        raise OutputError(f"{path} is damaged (not a JSON object)")
    return summary
