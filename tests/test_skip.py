"""Incremental runs (`--skip_keys_from`): `transforms/skip.py` alone, then the whole job twice.

The job tests run the real graph on the in-process runner with tiny images and checkpoints.
The digest files themselves (runs, merge, block lookups) are tests/test_digests.py's.
"""

import hashlib
import io
import logging
import os
import pathlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from core.schema import failures_schema
from pipeline.main import main, run
from tests import corpus
from tests.jobs import job_args
from transforms import digests
from transforms.records import ImageRecord
from transforms.sample import samples_schema
from transforms.skip import (
    WORK_DIR_PREFIX,
    KnownKeys,
    SkipKnownKeys,
    SkipSource,
    SkipSourceError,
    classify,
    contains,
    group_files,
    key_digests,
    read_keys,
    remove_work_dir,
    results_files,
    sorted_unique,
    split_patterns,
    write_runs,
)

FIRST, ADDED = 20, 5


# ------------------------------------------------------------------------------------ helpers


def image_bytes(i: int) -> bytes:
    return corpus.make_jpeg(64 + (i % 4) * 8, 56 + (i % 3) * 8, seed=100 + i)


def keys_table(keys, **extra) -> pa.Table:
    columns = {"key": pa.array(keys, pa.string()), **extra}
    return pa.table(columns)


def write_parquet(table: pa.Table, path) -> None:
    pq.write_table(table, str(path))


def write_results(path, keys, **kwargs) -> None:
    """A results file of the job (its schema and footer) holding `keys`."""
    corpus.write_results_keys(path, keys, **kwargs)


def write_failures(path, keys) -> None:
    """A failures file of the job: the images in it failed and must be tried again."""
    n = len(keys)
    table = pa.table(
        {"key": keys, "source": keys, "stage": ["decode"] * n, "error": ["OSError: bad"] * n},
        schema=failures_schema(),
    )
    pq.write_table(table, str(path))


def write_samples(path, keys) -> None:
    n = len(keys)
    table = pa.table(
        {"key": keys, "source": keys, "width": [1] * n, "height": [1] * n, "thumbnail": [b""] * n},
        schema=samples_schema(),
    )
    pq.write_table(table, str(path))


def results_bytes(keys) -> bytes:
    sink = io.BytesIO()
    corpus.write_results_keys(sink, keys)
    return sink.getvalue()


def result_keys(output) -> list:
    files = sorted(pathlib.Path(output).glob("results-*.parquet"))
    assert files, f"no results in {output}"
    return sorted(
        k for f in files for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()
    )


def run_skip(records, pattern, expected_keys, work):
    """Runs SkipKnownKeys over `records` in a small pipeline (its files under `work`), checks the
    kept keys and returns the skipped_images counter."""
    p = beam.Pipeline(runner=FnApiRunner())
    skip = SkipKnownKeys(pattern, str(work))
    kept = p | beam.Create(records) | skip | beam.Map(lambda r: r.key)
    assert_that(kept, equal_to(expected_keys))
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_name("skipped_images"))[
        "counters"
    ]
    return sum(c.committed or 0 for c in counters)


def records(*keys):
    return [ImageRecord(k, f"src/{k}", b"bytes of " + k.encode()) for k in keys]


# ------------------------------------------------------------------------------- unit: read_keys


def test_read_keys_reads_the_key_column_of_a_results_file(tmp_path):
    path = tmp_path / "results-00000-of-00001.parquet"
    write_results(path, ["a", "b", "c/d.jpg", "é"])
    assert read_keys(str(path)) == ["a", "b", "c/d.jpg", "é"]


def test_read_keys_of_an_empty_results_file(tmp_path):
    path = tmp_path / "results-00000-of-00001.parquet"
    write_results(path, [])
    assert read_keys(str(path)) == []


def test_read_keys_from_gcs(beam_gcs):
    path = f"gs://{beam_gcs.new_bucket()}/run1/results-00000-of-00001.parquet"
    beam_gcs.upload(path, results_bytes(["x", "y"]))
    assert read_keys(path) == ["x", "y"]


def test_split_patterns(tmp_path):
    assert split_patterns(" a/*.parquet, gs://b/r-*.parquet ,") == [
        "a/*.parquet",
        "gs://b/r-*.parquet",
    ]
    assert split_patterns(["a", " "]) == ["a"]
    with pytest.raises(ValueError):
        SkipKnownKeys(" , ", str(tmp_path))


def test_write_runs_holds_at_most_run_keys_digests_a_run(tmp_path):
    """A file bigger than a run is split into several runs; small files share one."""
    write_results(tmp_path / "results-0.parquet", [f"a{i}" for i in range(25)], row_group_size=7)
    write_results(tmp_path / "results-1.parquet", ["b0", "b1", "a3"])
    runs = write_runs(
        [str(tmp_path / "results-0.parquet"), str(tmp_path / "results-1.parquet")],
        str(tmp_path / "runs"),
        run_keys=10,
    )
    assert [r.count for r in runs] == [10, 10, 8]  # 28 keys; "a3" twice in the last run: 7 + 1
    hashed = np.concatenate([np.fromfile(r.path, dtype="S16") for r in runs])
    expected = key_digests([f"a{i}" for i in range(25)] + ["b0", "b1"])
    assert sorted(set(hashed.tolist())) == sorted(expected.tolist())


def test_group_files_packs_small_files_and_drops_empty_ones():
    sources = [SkipSource(f"f{i}", "results", rows) for i, rows in enumerate([4, 3, 0, 9, 2, 2])]
    assert group_files(sources, run_keys=8) == [["f0", "f1"], ["f3"], ["f4", "f5"]]


# ------------------------------------------------------- which files are known keys (issue 20.4)


def test_only_results_are_known_keys_the_failures_and_samples_are_retried(tmp_path, caplog):
    """A glob over whole output folders: the keys of failures-* and samples.parquet are not known
    (images that failed before are tried again), with one warning."""
    run1 = tmp_path / "run1"
    run1.mkdir()
    write_results(run1 / "results-00000-of-00001.parquet", ["a", "b"])
    write_failures(run1 / "failures-00000-of-00001.parquet", ["d"])
    write_samples(run1 / "samples.parquet", ["a", "e"])
    with caplog.at_level(logging.WARNING, logger="transforms.skip"):
        skipped = run_skip(
            records("a", "b", "d", "e"), f"{tmp_path}/*/*.parquet", ["d", "e"], tmp_path / "w"
        )
    assert skipped == 2
    assert "2 matched file(s) are not results" in caplog.text


def test_classify_tells_results_from_the_jobs_other_outputs(tmp_path):
    write_results(tmp_path / "r.parquet", ["a", "b", "c"])
    write_failures(tmp_path / "f.parquet", ["d"])
    write_samples(tmp_path / "s.parquet", ["a"])
    assert classify(str(tmp_path / "r.parquet")) == (str(tmp_path / "r.parquet"), "results", 3)
    assert classify(str(tmp_path / "f.parquet")).kind == "failures"
    assert classify(str(tmp_path / "s.parquet")).kind == "samples"


def test_results_written_before_the_span_columns_are_results(tmp_path):
    """Outputs of earlier versions have no source_offset / source_length: still known keys."""
    write_results(tmp_path / "new.parquet", ["a"])
    table = pq.read_table(tmp_path / "new.parquet")
    old = table.drop_columns(["source_offset", "source_length"])
    write_parquet(old.replace_schema_metadata(table.schema.metadata), tmp_path / "old.parquet")
    assert classify(str(tmp_path / "old.parquet")).kind == "results"


def _truncated(path):
    write_results(path, [f"k{i}" for i in range(100)])
    corpus.truncate_file(str(path), os.path.getsize(path) // 2)


def _not_parquet(path):
    path.write_text("key\na\nb\n")


def _empty(path):
    path.write_bytes(b"")


def _keys_only(path):
    write_parquet(keys_table(["a"]), path)


def _results_without_footer(path):
    table = pq.read_table(pa.BufferReader(results_bytes(["a"])))
    write_parquet(table.replace_schema_metadata(None), path)


def _fifo(path):
    os.mkfifo(path)


@pytest.mark.parametrize(
    "make,phrase",
    [
        (_truncated, "is not a readable Parquet file"),
        (_not_parquet, "is not a readable Parquet file"),
        (_empty, "is not a readable Parquet file"),
        (_keys_only, "is not a results file of this job (no embedding, height, source, tags"),
        (_results_without_footer, "its footer lacks image_size, embedding_dtype"),
        (_fifo, "is not a regular file"),
    ],
)
def test_a_file_that_is_not_results_is_a_clear_error_before_the_run(tmp_path, make, phrase):
    """Damaged, not Parquet, another schema, not a file: one line naming the path, raised when
    the transform is built (before any image is read). A FIFO is never opened (no hang)."""
    write_results(tmp_path / "results-00000-of-00002.parquet", ["a"])
    bad = tmp_path / "results-00001-of-00002.parquet"
    make(bad)
    with pytest.raises(SkipSourceError) as raised:
        SkipKnownKeys(f"{tmp_path}/results-*.parquet", str(tmp_path / "work"))
    message = str(raised.value)
    assert phrase in message and str(bad) in message and "\n" not in message
    assert not (tmp_path / "work").exists()


def test_a_glob_that_cannot_be_listed_is_an_error_not_nothing_to_skip(monkeypatch):
    from transforms import skip

    def forbidden(pattern):
        raise PermissionError(f"403 GET {pattern}: no storage.objects.list permission")

    monkeypatch.setattr(skip, "match_files", forbidden)
    with pytest.raises(SkipSourceError, match="cannot list gs://b/tags/"):
        results_files(["gs://b/tags/*/results-*.parquet"])


def test_results_files_checks_footers_in_parallel_and_keeps_only_results(tmp_path):
    for i in range(40):
        write_results(tmp_path / f"results-{i:05d}-of-00040.parquet", [f"k{i}"] * i)
    write_failures(tmp_path / "failures-00000-of-00001.parquet", ["x"])
    found = results_files([f"{tmp_path}/*.parquet", f"{tmp_path}/results-0000*"], threads=8)
    assert [s.rows for s in found] == list(range(40))
    assert all(s.kind == "results" for s in found)


# --------------------------------------------------------------------------- unit: SkipKnownKeys


def test_skip_known_keys_over_several_files_and_globs(tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run2").mkdir()
    write_results(tmp_path / "run1" / "results-00000-of-00002.parquet", ["a", "b"])
    write_results(tmp_path / "run1" / "results-00001-of-00002.parquet", ["c"])
    write_results(tmp_path / "run2" / "results-00000-of-00001.parquet", ["e"])
    # failures are not a skip source: "d" failed before, it is tried again
    write_failures(tmp_path / "run1" / "failures-00000-of-00001.parquet", ["d"])
    pattern = f"{tmp_path}/run1/results-*.parquet,{tmp_path}/run2/results-*.parquet"
    work = tmp_path / "work"
    assert run_skip(records("a", "b", "c", "d", "e", "f"), pattern, ["d", "f"], work) == 4
    # the runs are removed once merged; the merged file stays for the launcher to remove
    assert [p.name for p in work.rglob("*") if p.is_file()] == ["known-keys.s16"]


def test_skip_source_matching_nothing_skips_nothing(tmp_path):
    pattern = f"{tmp_path}/nothing-yet/results-*.parquet"
    assert run_skip(records("a", "b"), pattern, ["a", "b"], tmp_path / "work") == 0


def test_skip_known_keys_from_gcs_with_a_gcs_work_directory(beam_gcs):
    bucket = beam_gcs.new_bucket()
    root = f"gs://{bucket}/runs"
    beam_gcs.upload(f"{root}/1/results-00000-of-00001.parquet", results_bytes(["a", "b"]))
    beam_gcs.upload(f"{root}/2/results-00000-of-00001.parquet", results_bytes(["c"]))
    work = f"gs://{bucket}/tmp/{WORK_DIR_PREFIX}test"
    assert run_skip(records("a", "b", "c", "z"), f"{root}/*/results-*.parquet", ["z"], work) == 3
    assert FileSystems.exists(f"{work}/known-keys.s16")
    remove_work_dir(work)
    assert not FileSystems.match([f"{work}/*"])[0].metadata_list


def test_known_keys_is_one_sorted_digest_file(tmp_path):
    write_results(tmp_path / "results-00000-of-00002.parquet", ["a", "b"])
    write_results(tmp_path / "results-00001-of-00002.parquet", ["b", "c"])
    with beam.Pipeline(runner=FnApiRunner()) as p:
        pattern = f"{tmp_path}/results-*.parquet, {tmp_path}/results-0000[01]-*"
        known = p | KnownKeys(pattern, str(tmp_path / "work"))
        assert_that(
            known | beam.Map(lambda f: (f.count, np.fromfile(f.path, dtype="S16").tolist())),
            equal_to([(3, sorted(key_digests(["a", "b", "c"]).tolist()))]),
        )


def test_key_digests_are_16_bytes_of_blake2b():
    hashed = key_digests(["a", "é/x.jpg"])
    assert hashed.dtype.itemsize == 16 and len(hashed) == 2
    assert hashed[1].tobytes() == hashlib.blake2b("é/x.jpg".encode(), digest_size=16).digest()


def test_a_key_that_is_not_valid_unicode_is_hashed_not_an_error():
    lone, replaced = key_digests(["bad-\udcff.jpg", "bad-\ufffd.jpg"])
    assert lone != replaced


def test_contains_is_exact_around_every_known_digest():
    known_keys = [f"known-{i}" for i in range(3000)]
    known = sorted_unique(np.concatenate([key_digests(known_keys), key_digests(known_keys[:10])]))
    assert len(known) == 3000 and np.all(known[1:] > known[:-1])
    queries = known_keys[::7] + [f"new-{i}" for i in range(500)] + [""]
    expected = [q.startswith("known-") for q in queries]
    assert contains(known, queries).tolist() == expected
    assert not contains(sorted_unique(key_digests([])), ["a"]).any()


def test_digests_with_trailing_zero_bytes_stay_distinct():
    a = np.array([b"\x01" * 15 + b"\x00", b"\x01" * 15 + b"\x02"], dtype="S16")
    known = sorted_unique(a[:1].copy())
    # S16 compares the full 16 bytes: b"...\x01\x00" and b"...\x01\x02" differ
    assert np.searchsorted(known, a[1:]).tolist() == [1]
    assert (known == a[:1]).all() and not (known == a[1:]).any()
    assert digests.DigestSet(known).contains_digests(a).tolist() == [True, False]


def test_skip_is_exact_over_many_records_and_files(tmp_path, monkeypatch):
    """More records than one lookup batch, known keys spread over files with row groups, in
    several runs (a small RUN_KEYS) merged in passes (a small fan-in)."""
    from transforms import skip

    monkeypatch.setattr(skip, "RUN_KEYS", 300)
    monkeypatch.setattr(digests, "MAX_FAN_IN", 3)
    known = [f"k{i:05d}" for i in range(0, 4000, 2)]
    for part in range(3):
        write_results(
            tmp_path / f"results-{part:05d}-of-00003.parquet", known[part::3], row_group_size=100
        )
    inputs = [f"k{i:05d}" for i in range(1500)]
    kept = [k for k in inputs if int(k[1:]) % 2]
    assert run_skip(records(*inputs), f"{tmp_path}/results-*.parquet", kept, tmp_path / "w") == 750


def test_skip_keeps_records_whole(tmp_path):
    with beam.Pipeline(runner=FnApiRunner()) as p:
        skip = SkipKnownKeys("/nonexistent-dir-for-skip/*.parquet", str(tmp_path))
        out = p | beam.Create(records("a")) | skip
        assert_that(out, equal_to(records("a")))


# ------------------------------------------------------------------------ the job, incrementally


def assert_incremental_summary(summary):
    assert summary["skipped"] == FIRST
    assert summary["inputs"] == ADDED and summary["results"] == ADDED
    assert summary["failures"] == 0 and summary["accounted"]
    assert summary["inputs"] == summary["results"] + summary["failures"]


def test_incremental_run_over_image_files(models, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(FIRST):
        (inputs / f"img{i:03d}.jpg").write_bytes(image_bytes(i))
    first = run(job_args(inputs / "*.jpg", tmp_path / "run1", models), save_main_session=False)
    assert first["results"] == FIRST and first["skipped"] == 0 and first["accounted"]
    old_keys = result_keys(tmp_path / "run1")
    assert len(old_keys) == FIRST

    for i in range(FIRST, FIRST + ADDED):
        (inputs / f"img{i:03d}.jpg").write_bytes(image_bytes(i))
    second = run(
        job_args(
            inputs / "*.jpg",
            tmp_path / "run2",
            models,
            "--skip_keys_from",
            str(tmp_path / "run1" / "results-*.parquet"),
        ),
        save_main_session=False,
    )
    assert_incremental_summary(second)
    new_keys = result_keys(tmp_path / "run2")
    assert [pathlib.PurePath(k).name for k in new_keys] == [
        f"img{i:03d}.jpg" for i in range(FIRST, FIRST + ADDED)
    ]
    assert not set(new_keys) & set(old_keys)
    assert no_work_dirs(tmp_path / "run2")  # the known-key files are removed after the run


def test_incremental_run_with_a_gcs_skip_source(models, gcs_emulator, tmp_path):
    """TFRecord shards: shard 1 holds the first images, shard 2 the added ones; the earlier results
    are read back from gs:// (where a nightly job keeps them)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    corpus.write_tfrecord(
        inputs / "day1-00000-of-00001.tfrecord",
        [(f"photo-{i}", image_bytes(i)) for i in range(FIRST)],
    )
    first = run(job_args(inputs / "*.tfrecord", tmp_path / "run1", models), save_main_session=False)
    assert first["results"] == FIRST and first["accounted"]

    bucket = gcs_emulator.new_bucket()
    for path in sorted((tmp_path / "run1").glob("results-*.parquet")):
        gcs_emulator.upload_file(f"gs://{bucket}/nightly/run1/{path.name}", path)
    corpus.write_tfrecord(
        inputs / "day2-00000-of-00001.tfrecord",
        [(f"photo-{i}", image_bytes(i)) for i in range(FIRST, FIRST + ADDED)],
    )
    second = run(
        job_args(
            inputs / "*.tfrecord",
            tmp_path / "run2",
            models,
            "--skip_keys_from",
            f"gs://{bucket}/nightly/*/results-*.parquet",
        ),
        save_main_session=False,
    )
    assert_incremental_summary(second)
    assert result_keys(tmp_path / "run2") == sorted(
        f"photo-{i}" for i in range(FIRST, FIRST + ADDED)
    )


def no_work_dirs(output) -> bool:
    return not list(pathlib.Path(output).glob(f"{WORK_DIR_PREFIX}*"))


def test_failed_images_are_retried_when_the_glob_matches_every_output(models, tmp_path):
    """Nightly runs with `--skip_keys_from 'OUT/*/*.parquet'` (results, failures and samples): an
    image that failed the first night and was fixed since is tagged the second night."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        (inputs / f"img{i}.jpg").write_bytes(image_bytes(i))
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")
    first = run(job_args(inputs / "*.jpg", tmp_path / "out" / "1", models), save_main_session=False)
    assert (first["results"], first["failures"]) == (4, 1)
    assert (tmp_path / "out" / "1" / "samples.parquet").exists()

    (inputs / "broken.jpg").write_bytes(image_bytes(9))  # fixed since
    second = run(
        job_args(
            inputs / "*.jpg",
            tmp_path / "out" / "2",
            models,
            *("--skip_keys_from", str(tmp_path / "out" / "*" / "*.parquet")),
        ),
        save_main_session=False,
    )
    assert (second["skipped"], second["results"], second["failures"]) == (4, 1, 0)
    assert [pathlib.PurePath(k).name for k in result_keys(tmp_path / "out" / "2")] == ["broken.jpg"]
    assert no_work_dirs(tmp_path / "out" / "2")


def _not_parquet_results(path):
    path.write_text("not parquet")


def _damaged_past_the_footer(path):
    """Footer intact, a data page overwritten: found only while the keys are read (mid-run)."""
    write_results(path, [os.urandom(12).hex() for _ in range(20000)])
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        f.write(os.urandom(2000))


@pytest.mark.parametrize("damage", [_not_parquet_results, _damaged_past_the_footer])
def test_a_damaged_skip_file_is_exit_2_with_one_line_naming_it(
    models, tmp_path, caplog, capsys, damage
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "img0.jpg").write_bytes(image_bytes(0))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    write_results(earlier / "results-00000-of-00002.parquet", ["x"])
    damage(earlier / "results-00001-of-00002.parquet")
    out = tmp_path / "out"
    args = job_args(inputs / "*.jpg", out, models, "--skip_keys_from", str(earlier / "*.parquet"))
    assert main(args) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no logged traceback
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert str(earlier / "results-00001-of-00002.parquet") in errors[0]
    assert not list(out.glob("results-*")) and no_work_dirs(out)  # the work files are removed
