"""The console: a small run's default output is short and free of third-party noise; the progress
line, the verbosity flags and the native stderr filter."""

import io
import logging
import os
import re

import pytest

from core import console
from core.errors import UsageError
from tests.first_run import PHOTOS, first_run
from transforms import progress

NOISE = [
    r"I0000 ",
    r"absl::InitializeLog",
    r"cuInit",
    r"cudart_stub",
    r"cpu_feature_guard",
    r"Converting string literal type hint",
    r"min_shards undef",
    r"Resource module is not",
    r"Creating state cache",
    r"BatchElements statistics",
]


def test_default_console_of_a_small_run_is_short_and_quiet(models):
    output, text, code = first_run(*models)
    assert code == 0, text
    lines = text.strip().splitlines()
    assert len(lines) <= 20, text
    for pattern in NOISE:
        assert not re.search(pattern, text), f"noise {pattern!r} in:\n{text}"
    assert re.search(r"tags model: .*tags\.npz \(sha256 [0-9a-f]{12}\)", text)
    assert "GroupNorm: " in text and "runner: in-process" in text
    images = len(PHOTOS) + 1  # and the broken one
    assert f"{images} file(s); skipped 1 file(s)" in text and "notes.txt" in text
    assert f"{images} inputs, {len(PHOTOS)} results, 1 failures (1 decode)" in lines[-2]
    assert str(output) in lines[-1] and "report.html" in lines[-1]


def test_progress_line_has_total_rate_failures_and_eta():
    snap = console.Snapshot(done=90, failed=10, total=1000, files=1000, elapsed=20.0)
    assert console.progress_line(snap) == (
        "progress: 100/1,000 images (10%), 5.0 images/s, 10 failures, ETA 3m00s"
    )
    unknown = console.Snapshot(done=5, failed=0, total=None, files=2, elapsed=1.0)
    assert console.progress_line(unknown) == "progress: 5 images, 5.0 images/s, 0 failures"


def test_sink_knows_the_total_after_the_match_for_files_and_after_the_read_for_shards():
    files = progress.ProgressSink()
    files.matched(files=40, shards=0)
    assert files.snapshot().total == 40
    shards = progress.ProgressSink()
    shards.matched(files=2, shards=2)
    shards.add(progress.READ, 700)
    shards.add(progress.FILES_READ)
    assert shards.snapshot().total is None
    shards.add(progress.READ, 300)
    shards.add(progress.FILES_READ)
    assert shards.snapshot().total == 1000
    skipping = progress.ProgressSink(skipping=True)
    skipping.matched(files=40, shards=0)
    assert skipping.snapshot().total is None  # known keys are dropped: count what is read


def test_progress_taps_count_only_where_a_sink_is_active():
    tap = progress.Tap(progress.DONE)
    assert list(tap.process("x")) == []  # no sink: nothing happens
    sink = progress.activate()
    try:
        tap.process("x")
        tap.process("y")
        assert sink.snapshot().done == 2
    finally:
        progress.deactivate()


@pytest.mark.parametrize(
    "argv, level, rest",
    [
        (["--input", "x"], None, ["--input", "x"]),
        (["-v", "--input", "x"], "INFO", ["--input", "x"]),
        (["--input", "x", "-vv"], "DEBUG", ["--input", "x"]),
        (["--log_level", "warning"], "WARNING", ["--log_level", "warning"]),
        (["--log_level=DEBUG"], "DEBUG", ["--log_level=DEBUG"]),
    ],
)
def test_split_verbosity(argv, level, rest):
    assert console.split_verbosity(argv) == (level, rest)


def test_unknown_log_level_is_an_error():
    with pytest.raises(UsageError, match="--log_level"):
        console.split_verbosity(["--log_level", "LOUD"])


def test_quiet_logging_hides_beam_chatter_but_not_real_warnings():
    stream = io.StringIO()
    handler = console.configure_logging(None, stream)
    try:
        logging.getLogger("apache_beam.typehints").info("Converting string literal type hint")
        logging.getLogger().warning("Resource module is not available for current platform")
        logging.getLogger("apache_beam.io").warning("a real warning")
        logging.getLogger("transforms.read").info("skipped 2 file(s)")
        logging.getLogger("some.library").info("chatter")
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert "a real warning" in text and "skipped 2 file(s)" in text
    assert "Converting" not in text and "Resource module" not in text and "chatter" not in text


def test_control_characters_in_log_messages_are_escaped_line_breaks_kept():
    stream = io.StringIO()
    handler = console.configure_logging(None, stream)
    try:
        logging.getLogger("pipeline.x").warning("key %s\nsecond line", "a\x1b[2Jb\rc")
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert "key a\\x1b[2Jb\\rc\nsecond line" in text and "\x1b" not in text


def test_native_stderr_filter_drops_matching_lines_written_to_fd_2(tmp_path, capfd):
    with console.NativeStderrFilter(console.NATIVE_NOISE + [console.CUDA_PROBE]) as native:
        os.write(2, b"I0000 00:00:1796002625.632025    8940 cudart_stub.cc:31] Could not find\n")
        os.write(2, b"E0000 00:00:17.1 8940 cuda_platform.cc:52] failed call to cuInit: x\n")
        os.write(2, b"E0000 00:00:17.1 8940 other.cc:1] a real C++ error\n")
        native.stream.write("python line on the real stderr\n")
    err = capfd.readouterr().err
    assert "a real C++ error" in err and "python line on the real stderr" in err
    assert "cudart_stub" not in err and "cuInit" not in err
