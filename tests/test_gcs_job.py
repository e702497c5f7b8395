"""The whole job on gs:// against the GCS emulator: inputs, models, results, failures, summary.

Inputs in the three formats are uploaded to a bucket and read from gs://; the `.npz` models are
read from gs:// through gcsfs into a local `--model_cache_dir`; results, failures and summary.json
are written to gs:// and read back through the emulator (with urllib, not the clients under test).
Rows must equal those of a local run of the same images. Transient 503/429 errors injected during a
run must not cost a row. A second run must take the models from the local cache, not the network.

Model loads dominate the time (~10 s each), so the module loads the model twice only: the first
(cold) run downloads it; the cache test loads it again from the local cache; the other runs share
the in-process model.
"""

import io
import json
import pathlib
import urllib.parse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

import pipeline.main
from model.checkpoint import cache_path
from pipeline.main import run
from tests import corpus, jobs
from tests.bit_checkpoints import write_checkpoint
from transforms import infer

NUM_IMAGES = 9  # two full batches of 4 and a padded one


# ------------------------------------------------------------------------------------ helpers


def job_args(inputs, output, models, cache_dir, *extra):
    """tests/jobs.py's command line with the models read through `cache_dir`."""
    return jobs.job_args(inputs, output, models, "--model_cache_dir", str(cache_dir), *extra)


def stem(key: str) -> str:
    return pathlib.PurePosixPath(key).stem


def gcs_table(emulator, output: str, kind: str) -> pa.Table:
    """All rows of OUTPUT/<kind>-*.parquet on gs://, read through the emulator's JSON API."""
    files = emulator.list(f"{output}/{kind}-")
    assert files, f"no {kind} files in {output}"
    assert all(f.endswith(".parquet") for f in files), files
    return pa.concat_tables(pq.read_table(io.BytesIO(emulator.read(f))) for f in files)


def local_table(output, kind: str = "results") -> pa.Table:
    files = sorted(pathlib.Path(output).glob(f"{kind}-*.parquet"))
    assert files, f"no {kind} files in {output}"
    return pa.concat_tables(pq.read_table(f) for f in files)


def rows_by_stem(table: pa.Table) -> dict:
    return {stem(row["key"]): row for row in table.to_pylist()}


def delete_object(emulator, gs_path: str) -> None:
    bucket, name = gs_path[len("gs://") :].split("/", 1)
    emulator._request("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")


def check_gcs_output(emulator, output: str, summary: dict) -> dict:
    """The gs:// output holds exactly results, failures, summary.json, report.html and
    samples.parquet (no temp files left), the summary there is the one run() returned, and
    accounting holds; returns results by stem."""
    names = [f[len(output) + 1 :] for f in emulator.list(f"{output}/")]
    assert {"summary.json", "report.html", "samples.parquet"} <= set(names)
    singles = ("summary.json", "report.html", "samples.parquet")
    assert all(
        n in singles
        or (n.startswith(("results-", "failures-")) and n.endswith(".parquet") and "/" not in n)
        for n in names
    ), names
    written = json.loads(emulator.read(f"{output}/summary.json"))
    for field in ("inputs", "results", "failures", "skipped", "accounted"):
        assert written[field] == summary[field]
    assert written["inputs"] == NUM_IMAGES and written["results"] == NUM_IMAGES
    assert written["failures"] == 0 and written["accounted"]
    assert gcs_table(emulator, output, "failures").num_rows == 0
    results = gcs_table(emulator, output, "results")
    assert results.num_rows == NUM_IMAGES
    assert all(s.startswith("gs://") for s in results.column("source").to_pylist())
    return rows_by_stem(results)


def assert_same_rows(rows: dict, reference: dict) -> None:
    assert set(rows) == set(reference)
    for key, ref in reference.items():
        row = rows[key]
        assert (row["width"], row["height"]) == (ref["width"], ref["height"])
        np.testing.assert_allclose(row["embedding"], ref["embedding"], rtol=1e-5, atol=1e-6)
        assert [t["index"] for t in row["tags"]] == [t["index"] for t in ref["tags"]]
        np.testing.assert_allclose(
            [t["score"] for t in row["tags"]],
            [t["score"] for t in ref["tags"]],
            rtol=1e-5,
            atol=1e-7,
        )


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gcs(gcs_emulator, tmp_path_factory):
    """A bucket with the images as files, TFRecord shards and WebDataset shards, and the models."""
    root = tmp_path_factory.mktemp("gcs_job")
    images = corpus.photo_set(NUM_IMAGES)
    items = list(images.items())
    half = len(items) // 2
    local = root / "inputs"
    (local / "files").mkdir(parents=True)
    for name, (ext, data) in items:
        (local / "files" / f"{name}.{ext}").write_bytes(data)
    corpus.write_tfrecord(
        local / "train-00000-of-00002.tfrecord", [(name, data) for name, (_, data) in items[:half]]
    )
    corpus.write_tfrecord(
        local / "train-00001-of-00002.tfrecord", [(name, data) for name, (_, data) in items[half:]]
    )
    corpus.write_webdataset(local / "wds-000.tar", [(n, {e: d}) for n, (e, d) in items[:half]])
    corpus.write_webdataset(local / "wds-001.tar", [(n, {e: d}) for n, (e, d) in items[half:]])
    write_checkpoint(root / "tags.npz", units=(1, 1, 1, 1), width=1, num_classes=21843, seed=1)
    write_checkpoint(root / "embed.npz", units=(1, 1, 1, 1), width=1, num_classes=None, seed=2)

    bucket = f"gs://{gcs_emulator.new_bucket('job')}"
    for path in sorted(local.rglob("*")):
        if path.is_file():
            gcs_emulator.upload_file(f"{bucket}/inputs/{path.relative_to(local).as_posix()}", path)
    models = (f"{bucket}/models/tags.npz", f"{bucket}/models/embed.npz")
    gcs_emulator.upload_file(models[0], root / "tags.npz")
    gcs_emulator.upload_file(models[1], root / "embed.npz")
    return {
        "bucket": bucket,
        "local": local,
        "models": models,
        "cache": root / "cache",
        "root": root,
    }


@pytest.fixture(scope="module")
def cold_run(gcs, gcs_emulator):
    """The first run on gs:// (TFRecord inputs), models not cached yet, with transient errors
    injected at every kind of GCS access of a run: the output-directory check, the model download
    (gcsfs), input listing and reading, the Parquet writes and summary.json (Beam's GcsIO)."""
    monkeypatch = pytest.MonkeyPatch()
    injected = []

    def inject(what, status):
        gcs_emulator.fail_next(1, status)
        injected.append((what, status))

    def on_gcs(name, statuses):
        """The first len(statuses) gs:// calls of FileSystems.<name> meet these errors."""
        original = getattr(FileSystems, name)
        statuses = list(statuses)

        def wrapper(path, *args, **kwargs):
            if str(path).startswith("gs://") and statuses:
                inject(f"FileSystems.{name}({path})", statuses.pop(0))
            return original(path, *args, **kwargs)

        monkeypatch.setattr(FileSystems, name, staticmethod(wrapper))

    original_describe = pipeline.main.describe_models

    def describe_models(*args, **kwargs):  # the first model request (gcsfs) fails
        inject("model download", 503)
        return original_describe(*args, **kwargs)

    monkeypatch.setattr(pipeline.main, "describe_models", describe_models)
    on_gcs("open", [503])  # the first input shard read
    on_gcs("create", [503, 429])  # the first two files written (staging probe, a Parquet file)
    before = gcs_emulator.faults["injected"]
    output = f"{gcs['bucket']}/out/cold"
    try:
        inject("output directory check", 429)
        summary = run(
            job_args(f"{gcs['bucket']}/inputs/*.tfrecord", output, gcs["models"], gcs["cache"]),
            save_main_session=False,
        )
    finally:
        monkeypatch.undo()
    faults = gcs_emulator.faults
    return {
        "summary": summary,
        "output": output,
        "injected": injected,
        "served": faults["injected"] - before,
        "remaining": faults["remaining"],
    }


@pytest.fixture(scope="module")
def local_reference(gcs, cold_run, tmp_path_factory):
    """The same images run locally (image files in, local output); same model sources."""
    output = tmp_path_factory.mktemp("local_reference") / "out"
    summary = run(
        job_args(gcs["local"] / "files" / "*", output, gcs["models"], gcs["cache"]),
        save_main_session=False,
    )
    assert summary["results"] == NUM_IMAGES and summary["accounted"]
    return rows_by_stem(local_table(output))


# -------------------------------------------------------------------------------------- tests


def test_transient_errors_during_a_run_cost_no_row(cold_run, gcs_emulator, local_reference):
    assert len(cold_run["injected"]) >= 5, cold_run["injected"]
    assert cold_run["remaining"] == 0, "an injected fault was never served"
    assert cold_run["served"] == len(cold_run["injected"])
    rows = check_gcs_output(gcs_emulator, cold_run["output"], cold_run["summary"])
    assert_same_rows(rows, local_reference)


def test_models_come_from_gcs_into_the_local_cache(cold_run, gcs):
    for source in gcs["models"]:
        local = pathlib.Path(cache_path(source, str(gcs["cache"])))
        assert local.is_file() and str(local).startswith(str(gcs["cache"]))
        meta = json.loads(pathlib.Path(f"{local}.meta.json").read_text())
        assert meta["size"] == local.stat().st_size
    models = json.dumps(cold_run["summary"]["models"])
    assert gcs["models"][0] in models and gcs["models"][1] in models


@pytest.mark.parametrize(
    "fmt, pattern", [("images", "inputs/files/*"), ("webdataset", "inputs/wds-*.tar")]
)
def test_each_format_on_gcs_gives_the_rows_of_a_local_run(
    gcs, gcs_emulator, local_reference, fmt, pattern
):
    output = f"{gcs['bucket']}/out/{fmt}"
    summary = run(
        job_args(f"{gcs['bucket']}/{pattern}", output, gcs["models"], gcs["cache"]),
        save_main_session=False,
    )
    rows = check_gcs_output(gcs_emulator, output, summary)
    assert_same_rows(rows, local_reference)
    if fmt == "images":
        assert all(row["key"].startswith(f"{gcs['bucket']}/inputs/files/") for row in rows.values())


def test_second_run_takes_the_models_from_the_local_cache(
    gcs, gcs_emulator, cold_run, local_reference, monkeypatch
):
    # No copy of the models is left on gs:// and none loaded in this process: only the cache.
    for source in gcs["models"]:
        delete_object(gcs_emulator, source)
    assert not gcs_emulator.list(f"{gcs['bucket']}/models/")
    monkeypatch.setattr(infer, "_LOADED", {})
    output = f"{gcs['bucket']}/out/cached"
    summary = run(
        job_args(f"{gcs['bucket']}/inputs/*.tfrecord", output, gcs["models"], gcs["cache"]),
        save_main_session=False,
    )
    assert_same_rows(check_gcs_output(gcs_emulator, output, summary), local_reference)
    assert summary["models"] == cold_run["summary"]["models"]  # same sources and sha256


def test_a_second_run_into_a_claimed_gcs_output_exits_2_and_touches_nothing(
    gcs, cold_run, gcs_emulator, capsys
):
    from core.claim import claim

    output = cold_run["output"]
    before = {path: gcs_emulator.read(path) for path in gcs_emulator.list(f"{output}/")}
    args = job_args(f"{gcs['bucket']}/inputs/*.tfrecord", output, gcs["models"], gcs["cache"])
    with claim(output, "a bit-tagger run") as held:
        assert pipeline.main.main(args + ["--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"--output {output} is claimed by a bit-tagger run" in err
        assert f"started {held.holder['started']})" in err
    after = {path: gcs_emulator.read(path) for path in gcs_emulator.list(f"{output}/")}
    assert after == before
