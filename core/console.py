"""What a person sees while a job runs: quiet logging, a header, live progress, a final summary.

At the default verbosity only the job's own INFO lines and all real warnings and errors show.
Hidden, unless `--log_level INFO/DEBUG` (or `-v`, `-vv`) asks for them:
- TensorFlow's C++ start-up lines (glog/absl `I0000 ...` lines, "All log messages before
  absl::InitializeLog()", the CPU-feature note) and, on a machine without an NVIDIA device, the CUDA
  probe's "failed call to cuInit" error: C++ writes them straight to file descriptor 2, so
  `NativeStderrFilter` puts a pipe there and copies every other line through;
- Beam's INFO chatter (typehint conversions, state cache, `WriteImpl min_shards`, shard renames,
  BatchElements statistics) and its "Resource module is not available" warning.

Progress: when stderr is a terminal, a tqdm bar (images done / total, images/s, failures, ETA);
otherwise (CI, log files, Dataflow) one plain line every `--log_every_secs`. The counts come from
any object with a `snapshot() -> Snapshot` method: the job's is `transforms.progress.ProgressSink`
(in-process runs).
"""

import logging
import os
import re
import sys
import threading
from typing import NamedTuple, Optional, Protocol

from core.errors import UsageError
from core.text import PrintableFormatter

_LOG = logging.getLogger("core.console")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
OUR_LOGGERS = ("pipeline", "transforms", "model", "core")

# Python log records hidden at the default verbosity (matched against the message).
NOISY_MESSAGES = re.compile(
    "|".join(
        [
            r"Converting string literal type hint",
            r"min_shards undef",
            r"Resource module is not available",
            r"Creating state cache",
            r"BatchElements statistics",
            r"Renamed \d+ shards",
            # A failing step's error, logged by the runner with its traceback: the same error
            # reaches the launcher, which reports it (one line, or a bug's traceback).
            r"\[while running '",
        ]
    )
)
# Lines C++ code writes to file descriptor 2, hidden at the default verbosity.
NATIVE_NOISE = [
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"^[IW]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\]",  # glog INFO / WARNING lines
    r"^To enable the following instructions: .*rebuild TensorFlow",
]
CUDA_PROBE = r"failed call to cuInit"


def has_nvidia_device() -> bool:
    return (
        any(name.startswith("nvidia") for name in os.listdir("/dev"))
        if os.path.isdir("/dev")
        else False
    )


def split_verbosity(argv: list) -> tuple[Optional[str], list]:
    """(--log_level value or the level `-v`/`-vv` ask for, argv without -v flags).

    None means the default console. `--log_level` stays in argv (it is a job flag)."""
    level, rest = None, []
    for i, arg in enumerate(argv):
        if re.fullmatch(r"-v+", arg):
            level = "DEBUG" if len(arg) > 2 else "INFO"
            continue
        if arg == "--log_level" and i + 1 < len(argv):
            level = argv[i + 1].upper()
        elif arg.startswith("--log_level="):
            level = arg.split("=", 1)[1].upper()
        rest.append(arg)
    if level is not None and level not in LEVELS:
        raise UsageError(f"--log_level must be one of {', '.join(LEVELS)}, not {level!r}")
    return level, rest


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not NOISY_MESSAGES.search(record.getMessage())


class _ConsoleHandler(logging.StreamHandler):
    """A stream handler that prints above a live progress bar instead of through it."""

    bar = None  # the live tqdm bar, when there is one

    def emit(self, record):
        bar = _ConsoleHandler.bar
        if bar is None:
            super().emit(record)
            return
        try:
            bar.write(self.format(record), file=self.stream)
        except Exception:  # pylint: disable=broad-except
            self.handleError(record)


class _Formatter(PrintableFormatter):
    """'12:03:04 message' for the job's INFO lines; level and logger name for everything else.
    Control characters in messages (keys, paths: user data) are escaped, line breaks kept."""

    def format(self, record):
        short = record.levelno == logging.INFO and record.name.split(".")[0] in OUR_LOGGERS
        self._style._fmt = (
            "%(asctime)s %(message)s"
            if short
            else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        return super().format(record)


def configure_logging(level: Optional[str], stream=None) -> logging.Handler:
    """One console handler on the root logger. `level` None: the quiet default (the job's INFO,
    everybody's warnings, noise filtered); a level name: everything at that level, unfiltered."""
    stream = stream or sys.stderr
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(old)
    handler = _ConsoleHandler(stream)
    handler.setFormatter(_Formatter(datefmt="%H:%M:%S"))
    root.addHandler(handler)
    if level is None:
        handler.addFilter(_QuietFilter())
        root.setLevel(logging.WARNING)
        for name in OUR_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    else:
        root.setLevel(level)
        for name in OUR_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
    return handler


class NativeStderrFilter:
    """Context manager: file descriptor 2 becomes a pipe; a thread copies its lines to the real
    stderr, except those matching `patterns`. `stream` (a file on the real stderr) is for Python
    output that should bypass the pipe (log lines, the progress bar)."""

    def __init__(self, patterns):
        self._noise = re.compile("|".join(patterns))
        self._saved = None
        self._thread = None
        self.stream = None

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.stream = os.fdopen(os.dup(self._saved), "w", buffering=1, errors="backslashreplace")
        self._thread = threading.Thread(
            target=self._copy, args=(read_end,), daemon=True, name="stderr-filter"
        )
        self._thread.start()
        return self

    def _copy(self, read_end: int):
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not self._noise.search(line.decode("utf-8", "replace")):
                    os.write(self._saved, line)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's last write end: the copier sees end of file
        self._thread.join(timeout=5)
        os.close(self._saved)
        self.stream.close()
        return False


def native_noise() -> list:
    """The C++ lines to hide here (the CUDA probe only where there is no NVIDIA device)."""
    return NATIVE_NOISE + ([] if has_nvidia_device() else [CUDA_PROBE])


# -------------------------------------------------------------------------------- header / summary


def _short_sha(value) -> str:
    return f" (sha256 {str(value)[:12]})" if value else ""


def header(inputs: list, output: str, runner: str, models: dict, group_norm: str) -> None:
    """A few lines before the run: inputs, models and GroupNorm path, runner, output."""
    _LOG.info("bit-tagger: %s -> %s", ", ".join(inputs), output)
    _LOG.info(
        "  tags model:  %s%s", models.get("tags_model"), _short_sha(models.get("tags_model_sha256"))
    )
    if models.get("embed_model") != models.get("tags_model"):
        _LOG.info(
            "  embed model: %s%s",
            models.get("embed_model"),
            _short_sha(models.get("embed_model_sha256")),
        )
    _LOG.info("  GroupNorm: %s; runner: %s", group_norm.split(" (")[0] or "?", runner)


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Snapshot(NamedTuple):
    """Counts at one moment; `total` is None until every input file has been read (shards)."""

    done: int
    failed: int
    total: Optional[int]
    files: int
    elapsed: float

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def rate(self) -> float:
        """Images (results and failures) per second so far."""
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> Optional[float]:
        """Seconds left at the current rate, when the total is known."""
        if self.total is None or self.rate <= 0:
            return None
        return max(self.total - self.finished, 0) / self.rate


class Counts(Protocol):
    """Where live progress comes from (`transforms.progress.ProgressSink` in the job)."""

    def snapshot(self) -> Snapshot: ...


def progress_line(s: Snapshot) -> str:
    """'progress: 120/1,000 images (12%), 3.4 images/s, 2 failures, ETA 4m18s'."""
    total = f"/{s.total:,}" if s.total is not None else ""
    share = f" ({s.finished / s.total:.0%})" if s.total else ""
    eta = f", ETA {format_duration(s.eta)}" if s.eta is not None else ""
    return (
        f"progress: {s.finished:,}{total} images{share}, {s.rate:.1f} images/s, "
        f"{s.failed:,} failures{eta}"
    )


def summary(result: dict, output: str) -> None:
    """The final lines: counts, failures by stage, wall time, throughput, where the outputs are."""
    stages = ", ".join(f"{n} {stage}" for stage, n in sorted(result["failures_by_stage"].items()))
    _LOG.info(
        "done in %s: %d inputs, %d results, %d failures%s, %.2f images/s",
        format_duration(result["wall_seconds"]),
        result["inputs"],
        result["results"],
        result["failures"],
        f" ({stages})" if stages else "",
        result["images_per_second"],
    )
    if result.get("skipped"):
        _LOG.info("  %d images skipped (already in --skip_keys_from)", result["skipped"])
    _LOG.info(
        "  outputs: %s/ (results-*.parquet, failures-*.parquet, summary.json, report.html)", output
    )


# -------------------------------------------------------------------------------- live progress


class LiveProgress:
    """Context manager around a blocking `p.run()`: shows the sink's counts until the run ends."""

    def __init__(
        self,
        sink: Counts,
        every_secs: float,
        stream=None,
        bar: Optional[bool] = None,
    ):
        self._sink = sink
        self._every = every_secs
        self._stream = stream or sys.stderr
        self._bar_wanted = bar if bar is not None else _isatty(self._stream)
        self._stop = threading.Event()
        self._thread = None
        self._bar = None

    def __enter__(self):
        if self._bar_wanted:
            from tqdm import tqdm

            self._bar = tqdm(
                total=None,
                unit="img",
                file=self._stream,
                dynamic_ncols=True,
                desc="images",
                smoothing=0.1,
            )
            _ConsoleHandler.bar = self._bar
        if self._bar is not None or self._every > 0:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="progress")
            self._thread.start()
        return self

    def _loop(self):
        interval = 0.5 if self._bar is not None else self._every
        while not self._stop.wait(interval):
            self.show(self._sink.snapshot())

    def show(self, snap: Snapshot) -> None:
        if self._bar is None:
            _LOG.info("%s", progress_line(snap))
            return
        if snap.total is not None and self._bar.total != snap.total:
            self._bar.total = snap.total
        self._bar.set_postfix_str(f"{snap.failed:,} failures", refresh=False)
        self._bar.update(snap.finished - self._bar.n)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._bar is not None:
            self.show(self._sink.snapshot())
            self._bar.close()
            _ConsoleHandler.bar = None
        return False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
