"""transforms/outputs.py: the output directory's life cycle (refusal, staging, commit with
summary.json last, recovery after a crash at any point) and the run's accounting in summary.json."""

import json
import os
import shutil

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from transforms import counters, outputs
from transforms.outputs import (
    COMPLETE,
    EMPTY,
    INCOMPLETE,
    OutputError,
    OutputExistsError,
    check_previous,
    commit,
    create_staging,
    discard,
    existing_outputs,
    read_summary,
    recover,
    run_state,
    summarize,
)


def earlier_run(out, shards=3):
    out.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        (out / f"results-{i:05d}-of-{shards:05d}.parquet").write_bytes(b"old")
    (out / "failures-00000-of-00001.parquet").write_bytes(b"old")
    (out / "summary.json").write_text('{"run_id": "old"}')
    (out / "report.html").write_text("old")
    (out / "notes.txt").write_text("mine")  # not the job's: never touched


def snapshot(directory) -> dict:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_new_or_foreign_directory_is_fine(tmp_path):
    assert check_previous(str(tmp_path / "new"), overwrite=False) == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert check_previous(str(tmp_path / "other"), overwrite=False) == []
    assert run_state(str(tmp_path / "other")) == EMPTY


def test_an_earlier_run_is_refused_without_overwrite_and_kept_with_it(tmp_path):
    earlier_run(tmp_path)
    before = snapshot(tmp_path)
    assert len(existing_outputs(str(tmp_path))) == 6
    with pytest.raises(OutputExistsError, match="results of an earlier run .*--overwrite"):
        check_previous(str(tmp_path), overwrite=False)
    assert len(check_previous(str(tmp_path), overwrite=True)) == 6
    assert snapshot(tmp_path) == before  # nothing removed before the new run commits


def test_results_without_summary_are_an_incomplete_run(tmp_path):
    earlier_run(tmp_path)
    assert run_state(str(tmp_path)) == COMPLETE
    (tmp_path / "summary.json").unlink()
    assert run_state(str(tmp_path)) == INCOMPLETE
    with pytest.raises(OutputExistsError, match="already has an incomplete run"):
        check_previous(str(tmp_path), overwrite=False)


def stage_new_run(out, run_id="new", shards=2):
    staging = create_staging(str(out), run_id)
    for i in range(shards):
        FileSystems.create(f"{staging}/results-{i:05d}-of-{shards:05d}.parquet").close()
    with FileSystems.create(f"{staging}/failures-00000-of-00001.parquet") as f:
        f.write(b"new")
    FileSystems.create(f"{staging}/beam-temp-results-1234/x.parquet").close()
    return staging


NEW_RUN = [
    "failures-00000-of-00001.parquet",
    "notes.txt",
    "results-00000-of-00002.parquet",
    "results-00001-of-00002.parquet",
    "summary.json",
]


def test_commit_replaces_every_file_of_the_previous_run_and_writes_summary_last(tmp_path):
    earlier_run(tmp_path, shards=7)
    staging = stage_new_run(tmp_path)
    assert run_state(str(tmp_path)) == COMPLETE  # staging does not touch the previous run
    commit(str(tmp_path), staging, {"run_id": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == NEW_RUN
    assert (tmp_path / "failures-00000-of-00001.parquet").read_bytes() == b"new"
    summary = read_summary(str(tmp_path))
    assert summary["run_id"] == "new" and summary["files"] == [
        "failures-00000-of-00001.parquet",
        "results-00000-of-00002.parquet",
        "results-00001-of-00002.parquet",
    ]


class Crash(BaseException):
    """A kill -9 at a chosen point (BaseException: nothing in the code under test catches it)."""


COMMIT_STEPS = 10  # file operations of the commit below: 5 removals, 4 renames, 1 tree removal


@pytest.mark.parametrize("crash_at", range(1, COMMIT_STEPS + 1))
def test_a_commit_killed_at_any_point_leaves_one_run_and_recover_finishes_it(
    tmp_path, monkeypatch, crash_at
):
    """Every file operation of the commit is a kill point. After the kill, OUTPUT holds the old
    run complete, or an incomplete run that `recover` turns into the new run complete."""
    earlier_run(tmp_path, shards=3)
    staging = stage_new_run(tmp_path)
    calls = {"n": 0}
    real = {"remove": os.remove, "rename": os.rename, "rmtree": shutil.rmtree}

    def counting(op):
        def step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash()
            return op(*args, **kwargs)

        return step

    monkeypatch.setattr(os, "remove", counting(real["remove"]))
    monkeypatch.setattr(os, "rename", counting(real["rename"]))
    monkeypatch.setattr(shutil, "rmtree", counting(real["rmtree"]))
    with pytest.raises(Crash):
        commit(str(tmp_path), staging, {"run_id": "new"})
    monkeypatch.undo()
    state = run_state(str(tmp_path))
    if state == COMPLETE and outputs.committing(staging):  # before the old summary went
        assert read_summary(str(tmp_path))["run_id"] == "old"
    elif state == COMPLETE:  # after the new summary came: only the staging folder is left
        assert read_summary(str(tmp_path))["run_id"] == "new"
    else:
        assert state == INCOMPLETE and outputs.committing(staging)
    recover(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == NEW_RUN
    assert read_summary(str(tmp_path))["run_id"] == "new"


def test_the_commit_has_as_many_kill_points_as_tested(tmp_path, monkeypatch):
    earlier_run(tmp_path, shards=3)
    staging = stage_new_run(tmp_path)
    calls = []
    for module, name in ((os, "remove"), (os, "rename"), (shutil, "rmtree")):
        op = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _op=op, _n=name, **k: (calls.append(_n), _op(*a, **k))[1]
        )
    commit(str(tmp_path), staging, {"run_id": "new"})
    assert len(calls) == COMMIT_STEPS


def test_recover_removes_what_a_run_killed_before_committing_left(tmp_path):
    earlier_run(tmp_path)
    before = snapshot(tmp_path)
    stage_new_run(tmp_path, run_id="dead")
    (tmp_path / "beam-temp-results-99").mkdir()  # an older version wrote its temp files here
    (tmp_path / "beam-temp-results-99" / "x.parquet").write_bytes(b"x")
    recover(str(tmp_path))
    assert snapshot(tmp_path) == before


def test_discard_removes_the_staging_directory_with_beams_temporary_files(tmp_path):
    staging = stage_new_run(tmp_path)
    discard(staging)
    discard(staging)  # gone already: nothing to do, no error
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_cannot_be_listed_is_an_error_not_an_empty_output(tmp_path, monkeypatch):
    def denied(pattern):
        raise PermissionError(13, "denied")

    monkeypatch.setattr(outputs, "match", denied)  # the listing of core.outputs
    with pytest.raises(OutputError, match="cannot list .*PermissionError"):
        existing_outputs(str(tmp_path))
    with pytest.raises(OutputError, match="cannot list"):
        run_state(str(tmp_path))


def test_a_gcs_permission_error_is_not_read_as_no_output(beam_gcs):
    output = f"gs://{beam_gcs.new_bucket()}/out"
    beam_gcs.upload(f"{output}/summary.json", b"{}")
    beam_gcs.fail_next(5, 403)  # every request of the check is refused
    try:
        with pytest.raises(OutputError, match="cannot check .*summary.json: .*403"):
            run_state(output)
    finally:
        beam_gcs.fail_next(0)
    assert run_state(output) == COMPLETE


def test_on_gcs_a_committed_staging_is_moved_in_and_a_dead_one_removed(beam_gcs):
    output = f"gs://{beam_gcs.new_bucket()}/out"
    for name in ("results-00000-of-00002.parquet", "results-00001-of-00002.parquet"):
        beam_gcs.upload(f"{output}/{name}", b"old")
    beam_gcs.upload(f"{output}/summary.json", b'{"run_id": "old"}')
    committed = f"{output}/.staging-new"  # killed after step 1 of its commit
    beam_gcs.upload(f"{committed}/results-00000-of-00001.parquet", b"new")
    beam_gcs.upload(
        f"{committed}/summary.json",
        json.dumps({"run_id": "new", "files": ["results-00000-of-00001.parquet"]}).encode(),
    )
    beam_gcs.upload(f"{output}/.staging-dead/beam-temp-results-1/x.parquet", b"dead")
    recover(output)
    assert beam_gcs.list(f"{output}/") == [
        f"{output}/results-00000-of-00001.parquet",
        f"{output}/summary.json",
    ]
    assert read_summary(output)["run_id"] == "new"


def test_a_damaged_summary_is_an_error_not_a_missing_one(tmp_path):
    (tmp_path / "summary.json").write_text('{"inputs": 3, "resu')
    with pytest.raises(OutputError, match="summary.json is damaged"):
        read_summary(str(tmp_path))


def test_a_full_disk_is_recognised_through_beams_wrapping():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError(f"OSError: {e} [while running 'WriteResults']") from None
    except RuntimeError as wrapped:
        assert outputs.disk_full(wrapped)
    assert not outputs.disk_full(RuntimeError("worker lost"))


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
    staging = create_staging(str(tmp_path / "out"), "r1")
    commit(str(tmp_path / "out"), staging, summary)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["inputs"] == 5


def test_counters_are_unique_and_read_in_their_namespace():
    assert len({c.name for c in counters.SUMMARY}) == len(counters.SUMMARY)
    metrics = run_counting({counters.Counter("elsewhere", counters.READ_IMAGES.name): 4})
    assert summarize("/nonexistent-output", metrics, wall_seconds=1.0)["inputs"] == 0
