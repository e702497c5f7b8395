"""Incremental runs (`--skip_keys_from`): `transforms/skip.py` alone, then the whole job twice.

The job tests run the real graph on the in-process runner with tiny images and checkpoints.
"""

import hashlib
import io
import pathlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from pipeline.main import run
from tests import corpus
from tests.jobs import job_args
from transforms.records import ImageRecord
from transforms.skip import (
    KnownKeys,
    MergeDigests,
    SkipKnownKeys,
    contains,
    key_digests,
    read_keys,
    sorted_unique,
    split_patterns,
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


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def result_keys(output) -> list:
    files = sorted(pathlib.Path(output).glob("results-*.parquet"))
    assert files, f"no results in {output}"
    return sorted(
        k for f in files for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()
    )


def run_skip(records, pattern, expected_keys):
    """Runs SkipKnownKeys over `records` in a small pipeline, checks the kept keys and returns the
    skipped_images counter."""
    p = beam.Pipeline(runner=FnApiRunner())
    kept = p | beam.Create(records) | SkipKnownKeys(pattern) | beam.Map(lambda r: r.key)
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


def test_read_keys_reads_only_the_key_column(tmp_path):
    path = tmp_path / "results-00000-of-00001.parquet"
    write_parquet(
        keys_table(["a", "b", "c/d.jpg"], embedding=pa.array([[1.0], [2.0], [3.0]])), path
    )
    assert read_keys(str(path)) == ["a", "b", "c/d.jpg"]


def test_read_keys_of_an_empty_results_file(tmp_path):
    path = tmp_path / "results-00000-of-00001.parquet"
    write_parquet(pa.table({"key": pa.array([], pa.string())}), path)
    assert read_keys(str(path)) == []


def test_read_keys_without_a_key_column_fails_loudly(tmp_path):
    path = tmp_path / "other.parquet"
    write_parquet(pa.table({"id": ["a"]}), path)
    with pytest.raises(Exception, match="key"):
        read_keys(str(path))


def test_read_keys_from_gcs(beam_gcs):
    path = f"gs://{beam_gcs.new_bucket()}/run1/results-00000-of-00001.parquet"
    beam_gcs.upload(path, parquet_bytes(keys_table(["x", "y"])))
    assert read_keys(path) == ["x", "y"]


def test_split_patterns():
    assert split_patterns(" a/*.parquet, gs://b/r-*.parquet ,") == [
        "a/*.parquet",
        "gs://b/r-*.parquet",
    ]
    assert split_patterns(["a", " "]) == ["a"]
    with pytest.raises(ValueError):
        SkipKnownKeys(" , ")


# --------------------------------------------------------------------------- unit: SkipKnownKeys


def test_skip_known_keys_over_several_files_and_globs(tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run2").mkdir()
    write_parquet(keys_table(["a", "b"]), tmp_path / "run1" / "results-00000-of-00002.parquet")
    write_parquet(keys_table(["c"]), tmp_path / "run1" / "results-00001-of-00002.parquet")
    write_parquet(keys_table(["e"]), tmp_path / "run2" / "results-00000-of-00001.parquet")
    # failures are not a skip source: "d" failed before, it is tried again
    write_parquet(keys_table(["d"]), tmp_path / "run1" / "failures-00000-of-00001.parquet")
    pattern = f"{tmp_path}/run1/results-*.parquet,{tmp_path}/run2/results-*.parquet"
    assert run_skip(records("a", "b", "c", "d", "e", "f"), pattern, ["d", "f"]) == 4


def test_skip_source_matching_nothing_skips_nothing(tmp_path):
    pattern = f"{tmp_path}/nothing-yet/results-*.parquet"
    assert run_skip(records("a", "b"), pattern, ["a", "b"]) == 0


def test_skip_known_keys_from_gcs(beam_gcs):
    root = f"gs://{beam_gcs.new_bucket()}/runs"
    beam_gcs.upload(
        f"{root}/1/results-00000-of-00001.parquet", parquet_bytes(keys_table(["a", "b"]))
    )
    beam_gcs.upload(f"{root}/2/results-00000-of-00001.parquet", parquet_bytes(keys_table(["c"])))
    assert run_skip(records("a", "b", "c", "z"), f"{root}/*/results-*.parquet", ["z"]) == 3


def test_known_keys_is_one_sorted_digest_array(tmp_path):
    write_parquet(keys_table(["a", "b"]), tmp_path / "results-00000-of-00002.parquet")
    write_parquet(keys_table(["b", "c"]), tmp_path / "results-00001-of-00002.parquet")
    with beam.Pipeline(runner=FnApiRunner()) as p:
        known = p | KnownKeys(f"{tmp_path}/results-*.parquet, {tmp_path}/results-0000[01]-*")
        assert_that(
            known | beam.Map(lambda a: (a.dtype.str, a.tolist())),
            equal_to([("|S16", sorted(key_digests(["a", "b", "c"]).tolist()))]),
        )


def test_key_digests_are_16_bytes_of_blake2b():
    digests = key_digests(["a", "é/x.jpg"])
    assert digests.dtype.itemsize == 16 and len(digests) == 2
    assert digests[1].tobytes() == hashlib.blake2b("é/x.jpg".encode(), digest_size=16).digest()


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


def test_merge_digests_unions_sorted_arrays():
    merge = MergeDigests()
    parts = [sorted_unique(key_digests(k)) for k in (["a", "b"], ["b", "c"], [])]
    accs = [merge.add_input(merge.create_accumulator(), part) for part in parts]
    merged = merge.extract_output(merge.compact(merge.merge_accumulators(accs)))
    assert merged.tolist() == sorted(key_digests(["a", "b", "c"]).tolist())
    assert len(merge.extract_output(merge.create_accumulator())) == 0


def test_skip_is_exact_over_many_records_and_files(tmp_path):
    """More records than one lookup batch, known keys spread over files with row groups."""
    known = [f"k{i:05d}" for i in range(0, 4000, 2)]
    for part in range(3):
        pq.write_table(
            keys_table(known[part::3]),
            str(tmp_path / f"results-{part:05d}-of-00003.parquet"),
            row_group_size=100,
        )
    inputs = [f"k{i:05d}" for i in range(1500)]
    kept = [k for k in inputs if int(k[1:]) % 2]
    assert run_skip(records(*inputs), f"{tmp_path}/results-*.parquet", kept) == 750


def test_skip_keeps_records_whole():
    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create(records("a")) | SkipKnownKeys("/nonexistent-dir-for-skip/*.parquet")
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
