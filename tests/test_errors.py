"""core/errors.py: one error policy for every entry point.

Usage and set-up errors: one line `PROG: error: MESSAGE`, exit 2; too many failures: exit 3;
anything else: traceback, exit 1 (the exception is not caught).
"""

import subprocess
import sys

import pytest

from core.claim import ClaimedError, ClaimError
from core.errors import ArgumentParser, JobFailed, UsageError, exit_code
from model.pca import PcaBasisError
from pipeline import dataflow
from pipeline import main as job_main
from search import SearchError
from tests.jobs import DATAFLOW_LAUNCH
from transforms.infer import ModelError
from transforms.outputs import OutputError, OutputExistsError


def raising(exc):
    def job(*args, **kwargs):
        raise exc

    return job


@pytest.mark.parametrize(
    "exc, code",
    [
        (UsageError("missing required flag(s): --input"), 2),
        (OutputExistsError("out already has results"), 2),
        (ModelError("cannot load the models"), 2),
        (PcaBasisError("no results-*.parquet files in out"), 2),
        (SearchError("no index at out"), 2),
        (OutputError("no space left on the device of out"), 2),
        (ClaimedError("out", {"what": "a bit-tagger run", "pid": 7}), 2),
        (ClaimError("out is a file, not a directory"), 2),
        (JobFailed("3 of 10 images failed"), 3),
    ],
)
def test_exit_codes_and_one_line(capsys, exc, code):
    assert exit_code(raising(exc), "prog") == code
    assert capsys.readouterr().err == f"prog: error: {exc}\n"  # one line, no traceback


def test_success_is_zero(capsys):
    assert exit_code(lambda: {"results": 3}, "prog") == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("inputs"), RuntimeError("outage")])
def test_anything_else_propagates(exc):
    with pytest.raises(type(exc)):
        exit_code(raising(exc), "prog")


def test_a_bad_command_line_is_one_line_and_exit_2(capsys):
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--n", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "tool: error: argument --n: invalid int value: 'x'\n"


def test_job_entry_point_does_not_hide_a_bug_as_a_usage_error(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("a programming error, not the user's")

    monkeypatch.setattr(job_main, "describe_models", bug)
    with pytest.raises(ValueError, match="programming error"):
        job_main.main(["--input", str(tmp_path / "*.jpg"), "--output", str(tmp_path / "out")])


def test_dataflow_entry_point_reports_set_up_errors_in_one_line(tmp_path, capsys):
    """A model that cannot be loaded while building the job description: exit 2, not a traceback."""
    argv = [
        *DATAFLOW_LAUNCH,
        "--input",
        str(tmp_path / "*.tfrecord"),
        "--output",
        "gs://b-b/out",
        "--tags_model",
        str(tmp_path / "missing.npz"),
        "--dry_run_job_file",
        str(tmp_path / "job.json"),
    ]
    assert dataflow.main(argv) == 2
    err = capsys.readouterr().err
    assert "python -m pipeline.dataflow: error: " in err and "missing.npz" in err
    assert not (tmp_path / "job.json").exists()


def test_dataflow_entry_point_does_not_hide_a_bug(tmp_path, monkeypatch):
    monkeypatch.setattr(dataflow, "build_job_description", raising(KeyError("environment")))
    with pytest.raises(KeyError):
        dataflow.main(
            [
                *DATAFLOW_LAUNCH,
                *("--input", "x", "--output", "gs://b-b/out"),
                *("--dry_run_job_file", str(tmp_path / "job.json")),
            ]
        )


@pytest.mark.parametrize(
    "module, argv, phrase",
    [
        ("pipeline", ["--output", "/nonexistent/out"], "missing required flag(s): --input"),
        ("pipeline", ["--log_level", "LOUD"], "--log_level must be one of"),
        ("pipeline.dataflow", [*DATAFLOW_LAUNCH[:4], "--bucket", "gs://b"], "expected gs://BUCKET"),
        ("pipeline.dataflow", ["--region", "r"], "the following arguments are required"),
        ("pipeline.fit_pca", ["/nonexistent/out", "--dims", "2", "--to", "b.npz"], "no results"),
        (
            "pipeline.fit_pca",
            ["out", "--dims", "two", "--to", "b.npz"],
            "argument --dims: must be an integer >= 1",
        ),
        ("pipeline.report", ["/nonexistent/out"], "has no output of a run"),
        ("search", ["search", "/nonexistent/index", "--tag", "dog"], "no index at"),
        ("search", ["search"], "the following arguments are required"),
    ],
)
def test_command_lines_exit_2_with_one_clear_line(module, argv, phrase):
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and phrase in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr


def test_a_reader_that_stops_reading_ends_the_writer_quietly():
    writer = (
        "from core.errors import exit_code\n"
        "import sys\n"
        "def main():\n"
        "    for i in range(200000):\n"
        "        print('line', i)\n"
        "sys.exit(exit_code(main, 'prog'))\n"
    )
    done = subprocess.run(
        f'{sys.executable} -c "{writer}" | head -1; echo "status ${{PIPESTATUS[0]}}"',
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "line 0\nstatus 0\n"
    assert done.stderr == ""
