"""pipeline/errors.py: one error policy for `python -m pipeline` and `python -m pipeline.dataflow`.

Usage and set-up errors: one line, exit 2; too many failures: exit 3; anything else: traceback,
exit 1 (the exception is not caught).
"""

import logging
import subprocess
import sys

import pytest

from core.claim import ClaimedError, ClaimError
from pipeline import dataflow
from pipeline import main as job_main
from pipeline.errors import JobFailed, UsageError, exit_code
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
        (OutputError("no space left on the device of out"), 2),
        (ClaimedError("out", {"what": "a bit-tagger run", "pid": 7}), 2),
        (ClaimError("out is a file, not a directory"), 2),
        (JobFailed("3 of 10 images failed"), 3),
    ],
)
def test_exit_codes_and_one_line(caplog, exc, code):
    with caplog.at_level(logging.ERROR):
        assert exit_code(raising(exc)) == code
    assert [r.getMessage() for r in caplog.records] == [str(exc)]
    assert not any(r.exc_info for r in caplog.records)  # one line, no traceback


def test_success_is_zero():
    assert exit_code(lambda: {"results": 3}) == 0


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("inputs"), RuntimeError("outage")])
def test_anything_else_propagates(exc):
    with pytest.raises(type(exc)):
        exit_code(raising(exc))


def test_job_entry_point_does_not_hide_a_bug_as_a_usage_error(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("a programming error, not the user's")

    monkeypatch.setattr(job_main, "describe_models", bug)
    with pytest.raises(ValueError, match="programming error"):
        job_main.main(["--input", str(tmp_path / "*.jpg"), "--output", str(tmp_path / "out")])


def test_dataflow_entry_point_reports_set_up_errors_in_one_line(tmp_path, caplog):
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
    with caplog.at_level(logging.ERROR):
        assert dataflow.main(argv) == 2
    assert "missing.npz" in caplog.text and not (tmp_path / "job.json").exists()


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
        ("pipeline.dataflow", [*DATAFLOW_LAUNCH[:4], "--bucket", "gs://b"], "expected gs://BUCKET"),
    ],
)
def test_command_lines_exit_2_with_one_clear_line(module, argv, phrase):
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and phrase in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
