"""pipeline/options.py: the job's flags, their defaults and validation, and job_flags."""

import os

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import JobOptions, job_flags


def parse(*argv):
    return PipelineOptions(list(argv)).view_as(JobOptions)


def test_defaults():
    opts = parse()
    assert (opts.input, opts.output) == (None, None)  # checked by pipeline.main.run, not argparse
    assert (opts.top_k, opts.min_score, opts.image_size, opts.resize) == (10, 0.0, 224, "squash")
    assert (opts.batch_size, opts.precision, opts.xla) == (16, "float32", False)
    assert (opts.decode_threads, opts.num_shards, opts.max_failure_rate) == (0, 0, 1.0)
    assert opts.tags_model.endswith("BiT-M-R50x1.npz")
    assert opts.embed_model.endswith("BiT-M-R101x3.npz")
    assert opts.max_input_bytes == 256 << 20


def test_values_are_typed():
    opts = parse(
        "--top_k",
        "3",
        "--min_score",
        "0.25",
        "--image_size",
        "128",
        "--resize",
        "center_crop",
        "--xla",
        "--embedding_dtype",
        "float16",
    )
    assert (opts.top_k, opts.min_score, opts.image_size) == (3, 0.25, 128)
    assert (opts.resize, opts.xla, opts.embedding_dtype) == ("center_crop", True, "float16")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--top_k", "0"),
        ("--batch_size", "-4"),
        ("--image_size", "x"),
        ("--num_shards", "-1"),
        ("--min_score", "1.5"),
        ("--max_failure_rate", "-0.1"),
        ("--resize", "stretch"),
        ("--precision", "float64"),
        ("--input_format", "zip"),
        ("--embedding_dtype", "int8"),
        ("--max_input_bytes", "0"),
        ("--max_input_bytes", "64MiB"),
    ],
)
def test_bad_values_are_refused_with_exit_code_2(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(flag, value).get_all_options()
    assert exc.value.code == 2
    assert flag.lstrip("-") in capsys.readouterr().err


def test_job_flags_lists_every_job_flag_and_the_runner():
    flags = job_flags(
        PipelineOptions(["--top_k", "7", "--input", "a/*.jpg", "--direct_num_workers", "2"])
    )
    assert flags["top_k"] == 7 and flags["input"] == "a/*.jpg"
    assert flags["runner"] == "in-process (FnApiRunner)"
    assert "direct_num_workers" not in flags  # Beam's own flags are not the job's
    assert {"output", "tags_model", "embed_model", "batch_size", "resize"} <= set(flags)
    runner = job_flags(PipelineOptions(["--runner", "DataflowRunner"]))["runner"]
    assert runner == "DataflowRunner"


def test_job_flags_hold_valid_text_for_paths_that_are_not_utf8():
    """summary.json and the report are written from these: a folder named in Latin-1 (argv hands
    it over with surrogates) is shown escaped, as its keys are."""
    folder = os.fsdecode(b"/photos/\xe9t\xe9/*.jpg")
    flags = job_flags(PipelineOptions(["--input", folder, "--max_input_bytes", "1000"]))
    assert flags["input"] == "/photos/%E9t%E9/*.jpg"
    assert flags["max_input_bytes"] == 1000
