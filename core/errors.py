"""The one error policy of every entry point (`python -m pipeline`, `pipeline.dataflow`,
`pipeline.fit_pca`, `pipeline.report`, `python -m search index|search`):

- a usage or set-up error (a missing or inconsistent flag, inputs that match nothing, an output
  directory holding an earlier run, models that cannot serve the job, a missing index): one clear
  line on stderr, `PROG: error: MESSAGE` (argparse's own form), exit 2;
- the job ran but too many images failed (`--max_failure_rate`): one line, exit 3;
- a reader that stops reading (`... | head`): the output ends quietly, exit 0;
- anything else is a bug or an outage: the exception propagates (traceback), exit 1.

A usage error is any `UsageError`: the layers above raise their own subclasses
(`transforms.outputs.OutputExistsError`, `transforms.infer.ModelError`, `model.pca.PcaBasisError`,
`search.SearchError`), so this module needs to know none of them. `exit_code` applies the policy;
`ArgumentParser` reports argparse's own errors the same way (one line, exit 2, no usage block).
Which error gives which code, command by command: docs/outputs.md, "Exit codes".
"""

import argparse
import os
import sys
from typing import Callable

from core.text import printable

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILURES = 0, 1, 2, 3


class UsageError(Exception):
    """A missing or inconsistent flag, or a set-up the job cannot start with (exit code 2)."""


class JobFailed(RuntimeError):
    """The job ran but breached `--max_failure_rate` (exit code 3)."""


def exit_code(job: Callable[[], object], prog: str) -> int:
    """Runs `job()` and returns the process exit code under the policy above; `prog` names the
    command in the one line (`PROG: error: MESSAGE`)."""
    try:
        job()
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except JobFailed as exc:
        _report(prog, exc)
        return EXIT_FAILURES
    except UsageError as exc:
        _report(prog, exc)
        return EXIT_USAGE
    return EXIT_OK


def _report(prog: str, exc: Exception) -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    print(f"{prog}: error: {printable(exc)}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Points stdout at /dev/null once its reader has gone, so that Python's flush at exit does
    not print "Exception ignored ... BrokenPipeError" (as Python's documentation recommends)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as one line and exit 2 (no usage block)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")
