"""transforms/outputs.py: the output-directory rules and the run's accounting in summary.json."""

import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from transforms import counters
from transforms.outputs import (
    OutputExistsError,
    existing_outputs,
    prepare_output_dir,
    summarize,
    write_summary,
)


def earlier_run(out, shards=3):
    out.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        (out / f"results-{i:05d}-of-{shards:05d}.parquet").write_bytes(b"x")
    (out / "failures-00000-of-00001.parquet").write_bytes(b"x")
    (out / "summary.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # not the job's: never touched


def test_a_new_or_foreign_directory_is_fine(tmp_path):
    prepare_output_dir(str(tmp_path / "new"), overwrite=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    prepare_output_dir(str(tmp_path / "other"), overwrite=False)
    assert (tmp_path / "other" / "notes.txt").exists()


def test_an_earlier_run_is_refused_without_overwrite(tmp_path):
    earlier_run(tmp_path)
    assert len(existing_outputs(str(tmp_path))) == 5
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output_dir(str(tmp_path), overwrite=False)
    assert len(existing_outputs(str(tmp_path))) == 5  # nothing removed


def test_overwrite_removes_every_shard_of_the_earlier_run_only(tmp_path):
    earlier_run(tmp_path, shards=7)
    prepare_output_dir(str(tmp_path), overwrite=True)
    assert existing_outputs(str(tmp_path)) == []
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def run_counting(counts):
    """A real Beam run whose steps count `counts` ({Counter: n}); returns its metrics."""
    p = beam.Pipeline(runner=FnApiRunner())
    for i, (counter, n) in enumerate(counts.items()):
        _ = (
            p
            | f"Create{i}" >> beam.Create(range(n))
            | f"Count{i}" >> beam.Map(lambda x, c=counter: c.metric().inc())
        )
    result = p.run()
    result.wait_until_finish()
    return result.metrics()


def test_summary_counts_files_and_counters(tmp_path):
    pq.write_table(pa.table({"key": ["a", "b", "c"]}), tmp_path / "results-00000-of-00001.parquet")
    pq.write_table(
        pa.table(
            {
                "key": ["d", "e"],
                "source": ["s", "s"],
                "stage": ["decode", "read"],
                "error": ["DecodeError: truncated image file", "CorruptShardError: bad CRC"],
            }
        ),
        tmp_path / "failures-00000-of-00001.parquet",
    )
    metrics = run_counting(
        {
            counters.READ_IMAGES: 5,
            counters.READ_FAILURES: 1,
            counters.SKIPPED_IMAGES: 1,
            counters.DECODED_IMAGES: 3,
            counters.DECODE_FAILURES: 1,
        }
    )
    summary = summarize(str(tmp_path), metrics, wall_seconds=2.0)
    assert (summary["inputs"], summary["results"], summary["failures"]) == (5, 3, 2)
    assert summary["accounted"] and summary["skipped"] == 1 and summary["failure_rate"] == 0.4
    assert summary["failures_by_stage"] == {"decode": 1, "read": 1}
    assert summary["failures_by_type"] == {"decode/DecodeError": 1, "read/CorruptShardError": 1}
    assert list(summary["counters"]) == [c.name for c in counters.SUMMARY]
    assert summary["counters"]["decoded_images"] == 3 and summary["counters"]["read_files"] == 0
    assert summary["images_per_second"] == 1.5
    path = write_summary(str(tmp_path), summary)
    assert json.loads(open(path).read())["inputs"] == 5


def test_counters_are_unique_and_read_in_their_namespace():
    assert len({c.name for c in counters.SUMMARY}) == len(counters.SUMMARY)
    metrics = run_counting({counters.Counter("elsewhere", counters.READ_IMAGES.name): 4})
    assert summarize("/nonexistent-output", metrics, wall_seconds=1.0)["inputs"] == 0
