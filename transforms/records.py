"""The records that flow between the job's transforms (ARCHITECTURE.md, "Data flow").

Plain NamedTuples: cheap to create, picklable, and Beam encodes them without a custom coder.
"""

from typing import NamedTuple, Optional

import numpy as np

# Stages a failure can come from, in pipeline order.
STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_INFERENCE = "inference"
STAGES = (STAGE_READ, STAGE_DECODE, STAGE_INFERENCE)

# Tag of the failures output of every DoFn that can fail.
FAILURES = "failures"


class ImageRecord(NamedTuple):
    """Encoded image bytes as read from an input, with a stable key."""

    key: str
    source: str  # file URI, or shard URI plus record index / tar member
    data: bytes
    # Where the bytes of the file, TFRecord record (its data) or tar member start in the file,
    # and how many: the `source_offset` / `source_length` result columns (None: unknown, e.g. in
    # a compressed shard, where an offset into the decompressed stream cannot be seeked to).
    source_offset: Optional[int] = None
    source_length: Optional[int] = None


class Decoded(NamedTuple):
    """A decoded, resized image ready for the model."""

    key: str
    source: str
    width: int  # decoded size before resizing, after EXIF rotation
    height: int
    pixels: np.ndarray  # uint8 [S, S, 3] RGB
    source_offset: Optional[int] = None  # as in ImageRecord
    source_length: Optional[int] = None


class Failure(NamedTuple):
    """An input that produced no result, and why."""

    key: str
    source: str
    stage: str  # one of STAGES
    error: str  # "ErrorType: message a user understands"


def error_text(exc: BaseException) -> str:
    """'Type: message' for a failure row (no stack trace)."""
    message = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {message}"
