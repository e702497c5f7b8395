"""The whole job, end to end, on generated images and small random BiT checkpoints.

These run the real graph (read -> decode -> infer -> write -> summary) on the in-process runner.
"""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.claim import claim
from model.labels import imagenet21k
from pipeline.main import JobFailed, main, run
from tests import corpus
from tests.bit_checkpoints import write_checkpoint
from tests.jobs import MULTI_PROCESS, job_args
from tests.mounts import read_only, tmpfs
from transforms.outputs import OutputExistsError

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_IMAGES = 10


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The same NUM_IMAGES photo-like images as files, a TFRecord shard and WebDataset shards."""
    root = tmp_path_factory.mktemp("inputs")
    encoded = corpus.photo_set(NUM_IMAGES)
    files = root / "files"
    files.mkdir()
    for name, (ext, data) in encoded.items():
        (files / f"{name}.{ext}").write_bytes(data)
    items = list(encoded.items())
    half = len(items) // 2
    corpus.write_tfrecord(
        root / "shard-00000-of-00001.tfrecord", [(name, data) for name, (ext, data) in items]
    )
    corpus.write_webdataset(
        root / "wds-000.tar", [(name, {ext: data}) for name, (ext, data) in items[:half]]
    )
    corpus.write_webdataset(
        root / "wds-001.tar", [(name, {ext: data}) for name, (ext, data) in items[half:]]
    )
    return root


def read_rows(output, kind="results"):
    files = sorted(pathlib.Path(output).glob(f"{kind}-*.parquet"))
    assert files, f"no {kind} files in {output}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def by_key(table, name_of=lambda k: k):
    rows = table.to_pylist()
    return {name_of(r["key"]): r for r in rows}


def stem(key):
    return pathlib.PurePosixPath(key).stem


def test_files_tfrecord_and_webdataset_give_the_same_rows(images, models, tmp_path):
    outputs = {}
    for name, pattern in [
        ("files", images / "files" / "*"),
        ("tfrecord", images / "*.tfrecord"),
        ("webdataset", images / "wds-*.tar"),
    ]:
        summary = run(job_args(pattern, tmp_path / name, models), save_main_session=False)
        assert summary["inputs"] == NUM_IMAGES and summary["results"] == NUM_IMAGES
        assert summary["failures"] == 0 and summary["accounted"]
        outputs[name] = by_key(read_rows(tmp_path / name), stem)
    assert set(outputs["files"]) == {f"img{i:03d}" for i in range(NUM_IMAGES)}
    for name in ("tfrecord", "webdataset"):
        assert set(outputs[name]) == set(outputs["files"])
        for key, row in outputs["files"].items():
            other = outputs[name][key]
            assert (other["width"], other["height"]) == (row["width"], row["height"])
            np.testing.assert_allclose(other["embedding"], row["embedding"], rtol=1e-5, atol=1e-6)
            assert [t["index"] for t in other["tags"]] == [t["index"] for t in row["tags"]]


def test_schema_tags_and_footer_follow_the_design(images, models, tmp_path):
    run(job_args(images / "files" / "*", tmp_path, models, "--top_k", "7"), save_main_session=False)
    table = read_rows(tmp_path)
    schema = table.schema
    assert schema.names == [
        *("key", "source", "source_offset", "source_length", "width", "height"),
        *("tags", "categories", "embedding"),
    ]
    assert not schema.field("key").nullable
    assert schema.field("source_offset").type == pa.int64() == schema.field("source_length").type
    for row in table.select(["source", "source_offset", "source_length"]).to_pylist():
        assert row["source_offset"] == 0 and row["source_length"] == os.path.getsize(row["source"])
    assert schema.field("width").type == pa.int32() and schema.field("height").type == pa.int32()
    assert schema.field("tags").type == pa.list_(
        pa.struct(
            [
                ("index", pa.int32()),
                ("wnid", pa.string()),
                ("label", pa.string()),
                ("score", pa.float32()),
            ]
        )
    )
    assert schema.field("embedding").type == pa.list_(pa.float32(), 2048)
    labels = imagenet21k()
    for row in table.to_pylist():
        scores = [t["score"] for t in row["tags"]]
        assert len(scores) == 7 and scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)  # random weights saturate some sigmoids
        for t in row["tags"]:
            assert (t["wnid"], t["label"]) == labels.lookup(t["index"])
        # Categories: every tag and its ancestors, each at least as high as the tag below it.
        categories = {c["wnid"]: c["score"] for c in row["categories"]}
        assert len(categories) == len(row["categories"]) and "n00001740" in categories  # entity
        assert all(categories[t["wnid"]] >= t["score"] for t in row["tags"])
        assert row["categories"][0]["score"] == scores[0]
    footer = pq.read_metadata(next(tmp_path.glob("results-*.parquet"))).metadata
    assert footer[b"image_size"] == b"64"
    assert footer[b"categories"] == b"wordnet-3.0" and footer[b"categories_min_depth"] == b"0"
    assert footer[b"label_set"].decode() == labels.version
    assert b"tags_model" in b" ".join(footer)  # model sources and sha256 recorded
    failures = read_rows(tmp_path, "failures")
    assert failures.schema.names == ["key", "source", "stage", "error"] and failures.num_rows == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["options"]["top_k"] == 7 and summary["versions"]["tensorflow"]


def test_broken_files_become_failures_with_reasons(images, models, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(images / "files", inputs)
    (inputs / "empty.jpg").write_bytes(b"")
    (inputs / "page.jpg").write_bytes(
        b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>"
    )
    good = (inputs / "img000.jpg").read_bytes()
    (inputs / "truncated.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    summary = run(job_args(inputs / "*", out, models), save_main_session=False)
    failures = by_key(read_rows(out, "failures"), lambda k: pathlib.PurePosixPath(k).name)
    assert set(failures) == {"empty.jpg", "page.jpg"} | ({"truncated.jpg"} & set(failures))
    assert all(f["stage"] == "decode" and f["error"] for f in failures.values())
    assert summary["inputs"] == NUM_IMAGES + 3
    assert summary["inputs"] == summary["results"] + summary["failures"]
    assert summary["failures_by_stage"]["decode"] == len(failures)


def test_same_model_for_tags_and_embedding(images, models, tmp_path):
    tags, _ = models
    run(job_args(images / "*.tfrecord", tmp_path, (tags, tags)), save_main_session=False)
    table = read_rows(tmp_path)
    assert table.num_rows == NUM_IMAGES and table.schema.field("embedding").type.list_size == 2048


def test_output_options(images, models, tmp_path):
    run(
        job_args(
            images / "*.tfrecord",
            tmp_path,
            models,
            "--embedding_dtype",
            "float16",
            "--normalize_embeddings",
            "--write_all_scores",
            "--min_score",
            "0.5",
            "--num_shards",
            "2",
            "--no_categories",
        ),
        save_main_session=False,
    )
    assert len(list(tmp_path.glob("results-*-of-00002.parquet"))) == 2
    table = read_rows(tmp_path)
    assert "categories" not in table.schema.names
    assert table.schema.metadata[b"categories"] == b"none"
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 2048)
    assert table.schema.field("scores").type == pa.list_(pa.float16(), 21843)
    for row in table.to_pylist():
        assert np.linalg.norm(np.asarray(row["embedding"], np.float32)) == pytest.approx(
            1, abs=1e-2
        )
        assert all(t["score"] >= 0.5 for t in row["tags"])
        top = np.sort(np.asarray(row["scores"], np.float32))[::-1][: len(row["tags"])]
        np.testing.assert_allclose([t["score"] for t in row["tags"]], top, rtol=2e-3)


def test_existing_output_needs_overwrite(images, models, tmp_path):
    args = job_args(images / "*.tfrecord", tmp_path, models)
    run(args, save_main_session=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run(args, save_main_session=False)
    first = by_key(read_rows(tmp_path))
    run(args + ["--overwrite"], save_main_session=False)
    second = by_key(read_rows(tmp_path))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key]["embedding"], second[key]["embedding"])


def test_failure_rate_over_the_limit_exits_non_zero(images, models, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(images / "files" / "img000.jpg", inputs)
    (inputs / "bad.jpg").write_bytes(b"not an image")
    args = job_args(inputs / "*", tmp_path / "out", models, "--max_failure_rate", "0.25")
    with pytest.raises(JobFailed, match="over --max_failure_rate"):
        run(args, save_main_session=False)
    assert main(args + ["--overwrite"]) == 3
    assert main(job_args(inputs / "*", tmp_path / "out2", models)) == 0


def _truncated_npz(tmp_path, models):
    data = pathlib.Path(models[0]).read_bytes()
    path = tmp_path / "truncated.npz"
    path.write_bytes(data[: len(data) // 2])
    return str(path), models[1]


def _pickled_npz(tmp_path, models):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"resnet/root_block/standardized_conv2d/kernel": np.array([object()])})
    return str(path), models[1]


def _other_architecture(tmp_path, models):
    path = tmp_path / "vgg.npz"
    np.savez(path, **{"vgg16/conv1_1/weights": np.zeros((3, 3, 3, 64), np.float32)})
    return models[0], str(path)


def _wrong_output_size(tmp_path, models):
    from model.checkpoint import load_checkpoint
    from model.hub import export_saved_model
    from model.resnet import ResNetV2

    small = tmp_path / "head7.npz"
    write_checkpoint(small, units=(1, 1, 1, 1), width=1, num_classes=7, seed=3)
    checkpoint = load_checkpoint(str(small))
    net = ResNetV2(**checkpoint.architecture._asdict())
    net.load_weights(checkpoint.weights)
    export_saved_model(net, str(tmp_path / "saved"), output="logits")
    return str(tmp_path / "saved"), models[1]


def _nan_weights(tmp_path, models):
    weights = dict(np.load(models[1]))
    key = "resnet/block2/unit01/b/standardized_conv2d/kernel"
    weights[key] = weights[key].copy()
    weights[key][0, 0, 0, :3] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, **weights)
    return models[0], str(path)


@pytest.mark.parametrize(
    "fault,phrase",
    [
        (_nan_weights, "nan.npz: array resnet/block2/unit01/b/standardized_conv2d/kernel has "),
        (_truncated_npz, "truncated.npz"),
        (_pickled_npz, "pickle"),
        (_other_architecture, "not a BiT ResNet-v2 checkpoint"),
        (_wrong_output_size, "7 classes"),
    ],
)
def test_model_fault_fails_before_any_image(images, models, tmp_path, capsys, fault, phrase):
    tags, embed = fault(tmp_path, models)
    out = tmp_path / "out"
    code = main(job_args(images / "*.tfrecord", out, (tags, embed)))
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and phrase in errors[0]
    assert not out.exists() or not list(out.glob("results-*"))


@pytest.mark.parametrize(
    "dim,phrase", [(16, "reduces 16-d embeddings, but the embed model"), (None, "not an .npz file")]
)
def test_pca_basis_that_cannot_serve_fails_before_any_image(
    images, models, tmp_path, capsys, dim, phrase
):
    from model.pca import fit_basis, save_basis

    basis = tmp_path / "basis.npz"
    if dim:
        vectors = np.random.default_rng(0).standard_normal((40, dim))
        save_basis(fit_basis([vectors], dims=4), str(basis))
    else:
        basis.write_text("not a basis")
    out = tmp_path / "out"
    assert main(job_args(images / "*.tfrecord", out, models, "--pca_basis", str(basis))) == 2
    assert phrase in capsys.readouterr().err
    assert not list(out.glob("results-*"))


def test_inference_config_is_built_from_the_flags_in_one_place():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import JobOptions
    from transforms.infer import InferenceConfig

    opts = PipelineOptions(
        [
            "--tags_model",
            "t.npz",
            "--embed_model",
            "e.npz",
            "--batch_size",
            "8",
            "--xla",
            "--top_k",
            "3",
            "--no_categories",
            "--categories_min_depth",
            "4",
            "--pca_basis",
            "b.npz",
            "--model_cache_dir",
            "/c",
        ]
    ).view_as(JobOptions)
    config = InferenceConfig.from_options(opts)
    assert config.schema is None
    assert (
        config.tags_model,
        config.embed_model,
        config.batch_size,
        config.jit_compile,
        config.cache_dir,
        config.top_k,
    ) == ("t.npz", "e.npz", 8, True, "/c", 3)
    assert (config.categories, config.categories_min_depth, config.pca_basis) == (False, 4, "b.npz")
    assert InferenceConfig.from_options(PipelineOptions([]).view_as(JobOptions)).categories


def test_multi_process_run_gives_the_same_rows(images, models, tmp_path):
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    run(job_args(images / "*.tfrecord", single, models), save_main_session=False)
    summary = run(
        job_args(images / "*.tfrecord", multi, models, *MULTI_PROCESS),
        save_main_session=False,
    )
    assert summary["accounted"] and summary["results"] == NUM_IMAGES
    a, b = by_key(read_rows(single)), by_key(read_rows(multi))
    assert a.keys() == b.keys()
    for key in a:  # batches are grouped differently: float32 sums may differ in the last bits
        expected = np.asarray(a[key]["embedding"])
        np.testing.assert_allclose(
            b[key]["embedding"], expected, rtol=0, atol=1e-5 * np.abs(expected).max()
        )


def test_help_documents_every_option(capsys):
    run(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--input",
        "--input_format",
        "--output",
        "--image_size",
        "--tags_model",
        "--embed_model",
        "--batch_size",
        "--top_k",
        "--min_score",
        "--embedding_dtype",
        "--normalize_embeddings",
        "--write_all_scores",
        "--num_shards",
        "--max_failure_rate",
        "--overwrite",
        "--skip_keys_from",
        "--precision",
        "--xla",
        "--model_copies",
    ):
        assert flag in text


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git for a fresh clone")
def test_run_sh_help_from_a_fresh_clone(tmp_path):
    """The bootstrap path: a fresh clone creates its own .venv and answers --help."""
    clone = tmp_path / "clone"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    env = {k: v for k, v in os.environ.items() if k != "BIT_TAGGER_VENV"}
    proc = subprocess.run(
        ["./run.sh", "--help"], cwd=clone, env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--tags_model" in proc.stdout and (clone / ".venv" / "bin" / "python").exists()


def test_missing_input_or_output_is_a_usage_error(tmp_path):
    assert main(["--output", str(tmp_path)]) == 2
    assert main(["--input", str(tmp_path / "*.jpg")]) == 2


def test_input_matching_nothing_is_a_usage_error(models, tmp_path):
    assert main(job_args(tmp_path / "nothing-*.tfrecord", tmp_path / "out", models)) == 2


def test_a_run_that_dies_half_way_leaves_no_complete_looking_results(
    images, models, tmp_path, monkeypatch
):
    """Results are renamed into place only when the write finalises; a rerun gives every row."""
    from transforms import write

    original = write.RebatchTables.process
    calls = {"n": 0}

    def crash_on_second_batch(self, element, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("worker lost (simulated)")
        return original(self, element, *args, **kwargs)

    monkeypatch.setattr(write.RebatchTables, "process", crash_on_second_batch)
    args = job_args(images / "*.tfrecord", tmp_path, models)
    with pytest.raises(Exception, match="worker lost"):
        run(args, save_main_session=False)
    assert not list(tmp_path.glob("results-*")) and not (tmp_path / "summary.json").exists()
    monkeypatch.setattr(write.RebatchTables, "process", original)
    summary = run(args, save_main_session=False)
    assert summary["results"] == NUM_IMAGES and summary["accounted"]


# ---------------------------------------------------------------- exclusive, transactional outputs


def snapshot(directory) -> dict:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(pathlib.Path(directory).rglob("*"))
        if p.is_file()
    }


def one_error_line(capture) -> str:
    """The one error line of the job on stderr (`PROG: error: MESSAGE`), with no traceback (the
    runner's own log of a failing step is hidden on the console: core/console.py). `capture`:
    pytest's capsys or capfd."""
    err = capture.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def finished(images, models, tmp_path_factory):
    """A committed run, copied by each test that may damage it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run(job_args(images / "*.tfrecord", out, models), save_main_session=False)
    return out


def test_a_second_run_into_a_claimed_output_exits_2_naming_the_holder(
    images, models, tmp_path, capsys
):
    out = tmp_path / "out"
    with claim(str(out), "a bit-tagger run") as held:
        assert main(job_args(images / "*.tfrecord", out, models)) == 2
    message = one_error_line(capsys)
    assert f"--output {out} is claimed by a bit-tagger run (host " in message
    assert f"pid {os.getpid()}, started {held.holder['started']})" in message
    assert not out.exists()  # nothing written by the refused run


def _bad_glob(images, models, tmp_path):
    return job_args(images / "*.tfrecrod", tmp_path / "out", models)


def _missing_model(images, models, tmp_path):
    return job_args(images / "*.tfrecord", tmp_path / "out", (models[0], "missing.npz"))


def _bad_basis(images, models, tmp_path):
    (tmp_path / "basis.npz").write_text("not a basis")
    return job_args(
        images / "*.tfrecord", tmp_path / "out", models, "--pca_basis", str(tmp_path / "basis.npz")
    )


@pytest.mark.parametrize("bad_start", [_bad_glob, _missing_model, _bad_basis])
def test_an_overwrite_that_cannot_start_leaves_the_previous_run_byte_for_byte(
    images, models, finished, tmp_path, bad_start
):
    shutil.copytree(finished, tmp_path / "out")
    before = snapshot(tmp_path / "out")
    assert main(bad_start(images, models, tmp_path) + ["--overwrite"]) == 2
    assert snapshot(tmp_path / "out") == before


def test_an_output_that_is_a_file_or_read_only_exits_2_naming_it(images, models, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(job_args(images / "*.tfrecord", tmp_path / "file", models)) == 2
    assert f"{tmp_path / 'file'} is a file, not a directory" in one_error_line(capsys)
    capsys.readouterr()
    with read_only(tmp_path / "ro") as readonly:
        assert main(job_args(images / "*.tfrecord", readonly, models)) == 2
    assert f"cannot write to {readonly}: Read-only file system" in one_error_line(capsys)


def test_a_full_disk_exits_2_and_leaves_no_temporary_files(images, models, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "size=48k") as disk:
        (disk / "out").mkdir()
        (disk / "out" / "notes.txt").write_text("mine")
        assert main(job_args(images / "*.tfrecord", disk / "out", models)) == 2
        assert [p.name for p in (disk / "out").iterdir()] == ["notes.txt"]
        assert "beam-temp" not in str(list(disk.rglob("*")))
    assert f"no space left on the device of {disk / 'out'}" in one_error_line(capsys)


def test_a_full_disk_is_one_line_also_where_it_cannot_be_mounted(
    images, models, tmp_path, capsys, monkeypatch
):
    """The same, with the device's answer simulated inside the sample's write (in Beam)."""
    from transforms import sample

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample, "write_samples", full)
    assert main(job_args(images / "*.tfrecord", tmp_path / "out", models)) == 2
    assert "no space left on the device of" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()  # staging, Beam's temp files and the folder removed


KILLED_IN_SUMMARY = """
import os, signal, sys
from transforms import outputs
from pipeline.main import main

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 once every results file is written

outputs.summarize = killed
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_after_its_results_are_written_leaves_nothing_that_looks_complete(
    images, models, tmp_path
):
    out = tmp_path / "out"
    args = job_args(images / "*.tfrecord", out, models)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_SUMMARY, *args], capture_output=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL
    assert not list(out.glob("results-*")) and not list(out.glob("failures-*"))
    assert not (out / "summary.json").exists()
    summary = run(args, save_main_session=False)  # the rerun is not blocked and needs no flag
    assert summary["results"] == NUM_IMAGES and summary["accounted"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(("results", "fail"))) == [
        "report.html",
        "samples.parquet",
        "summary.json",
    ]


def test_overwrite_replaces_the_previous_run_when_the_new_one_commits(
    images, models, finished, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    old = json.loads((out / "summary.json").read_text())
    summary = run(
        job_args(
            images / "files" / "img00[0-2].*", out, models, "--overwrite", "--num_shards", "1"
        ),
        save_main_session=False,
    )
    assert summary["results"] == 3 and summary["run_id"] != old["run_id"]
    assert sorted(p.name for p in out.glob("results-*")) == ["results-00000-of-00001.parquet"]
    assert read_rows(out).num_rows == 3
    assert json.loads((out / "summary.json").read_text())["files"] == summary["files"]


@pytest.mark.parametrize(
    "flag, value, phrase",
    [
        ("--top_k", "abc", "argument --top_k: must be an integer between 1 and 21843, got 'abc'"),
        ("--top_k", "30000", "argument --top_k: must be an integer between 1 and 21843"),
        ("--image_size", "100000", "argument --image_size: must be an integer between 8 and"),
        ("--batch_size", "0", "argument --batch_size: must be an integer between 1 and"),
        ("--log_every_secs", "nan", "argument --log_every_secs: must be a number >= 0"),
        ("--max_failure_rate", "2", "argument --max_failure_rate: must be a number between 0"),
        ("--resize", "stretch", "argument --resize: invalid choice: 'stretch'"),
    ],
)
def test_a_bad_flag_value_is_one_line_and_exit_2(tmp_path, capfd, flag, value, phrase):
    argv = ["--input", str(tmp_path / "*.jpg"), "--output", str(tmp_path / "out"), flag, value]
    assert main(argv) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and phrase in errors[0] and "Traceback" not in err
    assert "usage:" not in err
    assert not (tmp_path / "out").exists()


def test_skip_keys_from_an_incomplete_run_is_named_in_a_warning(
    images, models, finished, tmp_path, caplog
):
    earlier = tmp_path / "earlier"
    shutil.copytree(finished, earlier)
    (earlier / "summary.json").unlink()
    args = job_args(
        images / "*.tfrecord",
        tmp_path / "out",
        models,
        "--skip_keys_from",
        str(earlier / "results-*"),
    )
    summary = run(args, save_main_session=False)
    assert summary["skipped"] == NUM_IMAGES
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"--skip_keys_from: {earlier} holds an incomplete run" in w for w in warnings)
