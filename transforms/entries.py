"""What the readers yield for every item of an input (`Entry`), and the read errors of failure rows.

Shared by `transforms.read` (files, TFRecord, the Beam transform) and `transforms.webdataset` (tar
shards). Error texts name the input, its size and what is wrong with it, never its content
(docs/bad-input.md).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from transforms.records import error_text

IMAGE_EXTS = (
    *(".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    *(".avif", ".heic", ".heif"),
)
# Inputs larger than this are failure rows, never read into memory (--max_input_bytes): a photo of
# up to ~89 megapixels fits even uncompressed (8-bit RGB TIFF, 3 bytes a pixel); a video renamed
# .jpg or a huge file behind a link does not. Memory per image in flight stays bounded by it.
DEFAULT_MAX_INPUT_BYTES = 256 << 20
_CHUNK = 1 << 20


class CorruptShardError(Exception):
    """A TFRecord or tar shard is corrupt or truncated at some byte offset."""


class MissingImageError(ValueError):
    """A record or sample has no image bytes."""


class DuplicateKey(Exception):
    """The key was already read from another source (the failure text reads "DuplicateKey: ...")."""


class UnknownFormatError(ValueError):
    """`auto` could not tell a file's format from its name."""


class InputTooLargeError(ValueError):
    """A file, tar member or TFRecord record is over --max_input_bytes (its bytes are not read)."""


class Entry(NamedTuple):
    """One item of a shard as both passes see it (data is None in the key pass)."""

    key: str
    index: int  # position in the shard (record or sample number); orders duplicates
    source: str
    data: Optional[bytes] = None
    error: Optional[str] = None  # "Type: message" when this item is a failure
    fatal: bool = False  # the shard ends here (corrupt / truncated / unreadable)
    offset: Optional[int] = None  # where the item's bytes start in the file (None: unknown)
    length: Optional[int] = None  # and how many (`ImageRecord.source_offset`, `source_length`)


def fatal(name: str, index: int, exc: BaseException, key: str = None, source: str = None) -> Entry:
    """The one failure that ends a shard, keyed `<name>:<index>` unless told otherwise."""
    at = f"{name}:{index}"
    return Entry(key or at, index, source or at, error=one_line(error_text(exc)), fatal=True)


def one_line(text: str) -> str:
    """A message on one line (tarfile's "could not be opened" lists its attempts on several)."""
    return " ".join(text.split())


def too_large(what: str, size: int, max_bytes: int) -> InputTooLargeError:
    return InputTooLargeError(
        f"{what} is {size} bytes, over the --max_input_bytes limit of {max_bytes}; "
        "raise the limit to read it"
    )


def read_exact(f, n: int) -> bytes:
    """Up to n bytes; fewer only at end of file (streams may return short reads)."""
    chunks, remaining = [], n
    while remaining > 0:
        chunk = f.read(min(remaining, 64 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def seekable(f) -> bool:
    """Whether a file object can seek (Beam's CompressedFile has `seekable` as a property)."""
    flag = getattr(f, "seekable", False)
    try:
        return bool(flag() if callable(flag) else flag)
    except (OSError, ValueError):
        return False


def discard(f, n: int, update=None) -> int:
    """Read and drop n bytes (at most one chunk in memory); the number read (short at end of file).
    `update(chunk)` sees every chunk (a running checksum)."""
    done = 0
    while done < n:
        chunk = f.read(min(_CHUNK, n - done))
        if not chunk:
            break
        if update is not None:
            update(chunk)
        done += len(chunk)
    return done
