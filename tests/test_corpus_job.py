"""The whole corpus of good, odd and broken inputs (tests/corpus.py) through the full job.

Every input is accounted for: a result row (with the orientation-corrected size) or a failure row
with its stage and a phrase a user understands; a key appears in results at most once; the job
exits 0. Single- and multi-process runs agree.
"""

import collections
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.main import main, run
from tests import corpus
from tests.jobs import MULTI_PROCESS, job_args


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    images = corpus.write_image_corpus(str(root / "images"))
    shards = corpus.write_shard_corpus(str(root / "shards"))
    return root, images, shards


def job(root, output, models, *extra):
    return job_args(f"{root}/images/*,{root}/shards/*", output, models, *extra, image_size=32)


def table(output, kind):
    files = sorted(pathlib.Path(output).glob(f"{kind}-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


@pytest.fixture(scope="module")
def single_run(inputs, models, tmp_path_factory):
    root, _, _ = inputs
    output = tmp_path_factory.mktemp("out-single")
    summary = run(job(root, output, models), save_main_session=False)
    return summary, table(output, "results"), table(output, "failures")


def test_every_image_case_has_its_expected_outcome(inputs, single_run):
    _, images, _ = inputs
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
    _, _, shards = inputs
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
    _, images, shards = inputs
    summary, results, failures = single_run
    assert summary["inputs"] == summary["results"] + summary["failures"]
    assert summary["accounted"]
    assert summary["results"] == len(results) and summary["failures"] == len(failures)
    expected_ok = sum(e.ok for e in corpus.EXPECTATIONS.values()) + len(shards.records)
    assert len(results) == expected_ok
    assert set(summary["failures_by_stage"]) == {"read", "decode"}


def test_multi_process_run_accounts_the_same(inputs, models, single_run, tmp_path):
    root, _, _ = inputs
    summary, results, failures = single_run
    multi = run(
        job(root, tmp_path, models, *MULTI_PROCESS),
        save_main_session=False,
    )
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
    root, _, _ = inputs
    summary, _, _ = single_run
    assert main(job(root, tmp_path / "a", models)) == 0
    limit = summary["failure_rate"] / 2
    assert main(job(root, tmp_path / "b", models, "--max_failure_rate", f"{limit:.4f}")) == 3
