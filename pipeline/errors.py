"""One error policy for both entry points (`python -m pipeline`, `python -m pipeline.dataflow`).

- a usage or set-up error (a missing or inconsistent flag, inputs that match nothing, an output
  directory holding an earlier run or claimed by a running one, an output that cannot be written
  (a file, read-only, a full disk), models that cannot serve the job): one clear line, exit 2;
- the job ran but too many images failed (`--max_failure_rate`): one line, exit 3;
- anything else is a bug or an outage: the exception propagates (traceback), exit 1.

The lower layers raise their own specific errors (`transforms.outputs.OutputExistsError`,
`transforms.outputs.OutputError`, `core.claim.ClaimError`, `transforms.infer.ModelError`);
`usage_errors()` is the one list of what counts as set-up.
"""

import logging
from typing import Callable

_LOG = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILURES = 0, 1, 2, 3


class UsageError(Exception):
    """A missing or inconsistent flag, or a set-up the job cannot start with (exit code 2)."""


class JobFailed(RuntimeError):
    """The job ran but breached `--max_failure_rate` (exit code 3)."""


def usage_errors() -> tuple:
    """Exception types reported as one line with exit code 2 (imported lazily: cheap `--help`)."""
    from core.claim import ClaimError
    from transforms.infer import ModelError
    from transforms.outputs import OutputError, OutputExistsError

    return UsageError, OutputExistsError, OutputError, ClaimError, ModelError


def exit_code(job: Callable[[], object]) -> int:
    """Runs `job()` and returns the process exit code under the policy above."""
    try:
        job()
    except JobFailed as exc:
        _LOG.error("%s", exc)
        return EXIT_FAILURES
    except usage_errors() as exc:
        _LOG.error("%s", exc)
        return EXIT_USAGE
    return EXIT_OK
