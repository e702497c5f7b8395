"""The whole corpus of good, odd and broken inputs (tests/corpus.py) through the full job.

Every input is accounted for: a result row (with the orientation-corrected size) or a failure row
with its stage and a phrase a user understands (never the file's content); a key appears in
results at most once; FIFOs and devices are skipped and counted; names that are not UTF-8 get
keys; the job exits 0. Single- and multi-process runs agree.
"""

import collections
import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.main import main, run
from tests import corpus
from tests.jobs import MULTI_PROCESS, job_args

SECRET = "db-password=S3CRETxTOKENq9Zw"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    images = corpus.write_image_corpus(str(root / "images"))
    shards = corpus.write_shard_corpus(str(root / "shards"))
    odd = _write_odd_folder(root / "odd")
    return root, images, shards, odd


def _write_odd_folder(folder):
    """A folder as people have them: a Latin-1 file name, a FIFO, a link to /dev/zero, and a
    link named .jpg to a config file. {what: (path or key, ...)}."""
    folder.mkdir()
    latin1 = os.fsencode(str(folder)) + b"/\xe9t\xe9.jpg"
    with open(latin1, "wb") as f:
        f.write(corpus.make_jpeg(40, 30, seed=90))
    os.mkfifo(folder / "pipe.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    config = folder.parent / "settings.conf"
    config.write_text(SECRET + "\n")
    os.symlink(config, folder / "notes.jpg")
    return {
        "latin1_key": str(folder / "%E9t%E9.jpg"),
        "fifo": str(folder / "pipe.jpg"),
        "secret_link": str(folder / "notes.jpg"),
    }


def job(root, output, models, *extra):
    inputs = f"{root}/images/*,{root}/shards/*,{root}/odd"
    return job_args(inputs, output, models, *extra, image_size=32)


def run_guarded(root, argv):
    """The job, with the FIFO among its inputs unblocked should a reader ever open it."""
    with corpus.fifo_unblocked_after(str(root / "odd" / "pipe.jpg"), seconds=30):
        return run(argv, save_main_session=False)


def table(output, kind):
    files = sorted(pathlib.Path(output).glob(f"{kind}-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


@pytest.fixture(scope="module")
def single_run(inputs, models, tmp_path_factory):
    root, _, _, _ = inputs
    output = tmp_path_factory.mktemp("out-single")
    summary = run_guarded(root, job(root, output, models))
    return summary, table(output, "results"), table(output, "failures")


def test_every_image_case_has_its_expected_outcome(inputs, single_run):
    _, images, _, _ = inputs
    _, results, failures = single_run
    results = {r["key"]: r for r in results}
    failures = {f["key"]: f for f in failures}
    for case, path in images.items():
        expect = corpus.EXPECTATIONS[case]
        if expect.ok:
            assert path in results, f"{case}: expected a result, got {failures.get(path)}"
            assert (results[path]["width"], results[path]["height"]) == (
                expect.width,
                expect.height,
            ), case
        else:
            assert path in failures, f"{case}: expected a failure"
            assert failures[path]["stage"] == expect.stage, case
            assert expect.phrase in failures[path]["error"], (case, failures[path]["error"])
            assert "Traceback" not in failures[path]["error"]


def test_broken_shards_keep_what_was_read_and_say_where(inputs, single_run):
    _, _, shards, _ = inputs
    _, results, failures = single_run
    sources = {r["key"]: r["source"] for r in results}
    for key, source in shards.records.items():
        assert sources.get(key) == source, key
    errors = collections.defaultdict(list)
    for f in failures:
        errors[f["key"]].append((f["stage"], f["error"]))
    for key, phrase in shards.failures.items():
        assert any(stage == "read" and phrase in error for stage, error in errors[key]), (
            key,
            errors[key],
        )


def test_duplicate_keys_keep_the_first_and_fail_the_rest(single_run):
    _, results, failures = single_run
    counts = collections.Counter(r["key"] for r in results)
    assert max(counts.values()) == 1
    duplicates = collections.Counter(
        f["key"] for f in failures if f["error"].startswith("DuplicateKey")
    )
    assert duplicates == {"dup": 2, "cross": 1}
    assert all(f["stage"] == "read" for f in failures if f["error"].startswith("DuplicateKey"))


def test_every_input_is_accounted_for(inputs, single_run):
    _, images, shards, _ = inputs
    summary, results, failures = single_run
    assert summary["inputs"] == summary["results"] + summary["failures"]
    assert summary["accounted"]
    assert summary["results"] == len(results) and summary["failures"] == len(failures)
    expected_ok = sum(e.ok for e in corpus.EXPECTATIONS.values()) + len(shards.records) + 1
    assert len(results) == expected_ok
    assert set(summary["failures_by_stage"]) == {"read", "decode"}
    assert summary["counters"]["read_skipped_special"] == 2  # the FIFO and the /dev/zero link


def test_odd_files_are_read_skipped_or_fail_without_leaking(inputs, single_run):
    _, _, _, odd = inputs
    _, results, failures = single_run
    keys = {r["key"] for r in results}
    assert odd["latin1_key"] in keys  # a name that is not UTF-8: an escaped key, not a dead job
    assert odd["fifo"] not in keys | {f["key"] for f in failures}
    [leak] = [f for f in failures if f["key"] == odd["secret_link"]]
    assert leak["stage"] == "decode" and leak["error"].startswith("DecodeError: not an image")
    assert not any(SECRET[12:20] in f["error"] for f in failures)
    assert not any(SECRET.encode()[12:18].hex() in f["error"].replace(" ", "") for f in failures)


def test_multi_process_run_accounts_the_same(inputs, models, single_run, tmp_path):
    root, _, _, _ = inputs
    summary, results, failures = single_run
    multi = run_guarded(root, job(root, tmp_path, models, *MULTI_PROCESS))
    assert multi["accounted"]
    assert (multi["inputs"], multi["results"], multi["failures"]) == (
        summary["inputs"],
        summary["results"],
        summary["failures"],
    )
    assert {r["key"] for r in table(tmp_path, "results")} == {r["key"] for r in results}
    assert sorted((f["key"], f["stage"]) for f in table(tmp_path, "failures")) == sorted(
        (f["key"], f["stage"]) for f in failures
    )


def test_job_exits_zero_unless_the_failure_rate_is_exceeded(inputs, models, single_run, tmp_path):
    root, _, _, _ = inputs
    summary, _, _ = single_run
    limit = summary["failure_rate"] / 2
    with corpus.fifo_unblocked_after(str(root / "odd" / "pipe.jpg"), seconds=30):
        assert main(job(root, tmp_path / "a", models)) == 0
        assert main(job(root, tmp_path / "b", models, "--max_failure_rate", f"{limit:.4f}")) == 3
