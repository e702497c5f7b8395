"""The original bytes of an indexed image, read where they live (thumbnails of `./run.sh serve`).

A row of the index names its image by `source` (a file URI, `<shard>:<record index>` for a TFRecord
record, `<shard>:<member>` for a tar member; local or gs://) and, for results written since those
columns exist, `source_offset` / `source_length`: where the bytes of the file, the record's data
(the serialized tf.train.Example) or the member's data are in that file. So one image is one
ranged read, whatever the size of its shard, and what is read is checked before it is used:

- a TFRecord record: its framing at that offset (the length header equals `source_length`, both
  masked CRC-32Cs match), then the Example's key (when it has one) equals the row's key, and the
  image is its `--key_feature` bytes (the run's `summary.json` options; `image/encoded` by default);
- a tar member: the 512-byte header just before the data (its checksum, a regular file, its size
  equals `source_length`, its name is the sample's member);
- a plain file: read whole (its size is the length; a file that changed size since the job read
  it is served with a warning: the key is its path).

When that check fails (the shard was replaced or rewritten), when the member is a link (its bytes
are its target's), and where no offset was recorded, the shard is scanned instead: records counted
up to the index, or members read up to the name (tarfile, links resolved inside the shard only;
`.tgz`/`.tar.gz`/`.gz` decompressed, where offsets into the decompressed stream were never useful,
so they are null in the results). Outputs written before the offset columns existed are scanned
too, with one warning per output. Nothing but the file the row names is ever opened, and only
files the index references are read (the server looks rows up by id, never by path).
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import gzip
import io
import json
import logging
import lzma
import os
import tarfile
import threading
import zlib
from typing import NamedTuple, Optional

from core import storage
from core import tfrecord as tfr
from core.names import key_text, name_bytes

_LOG = logging.getLogger(__name__)

DEFAULT_KEY_FEATURE = "image/encoded"
# The job's --max_input_bytes default: larger originals were never read by the job either.
MAX_ORIGINAL_BYTES = 256 << 20
_TAR_BLOCK = 512
_CACHED_PATHS = 4096
_DECOMPRESSORS = {
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw),
    ".bz2": bz2.BZ2File,
    ".xz": lzma.LZMAFile,
    ".lzma": lzma.LZMAFile,
}


class OriginalError(Exception):
    """The original bytes cannot be read or are not the indexed image (a one-line reason)."""


class Location(NamedTuple):
    """Where an indexed image came from: the index row's key, source, offset, length and run."""

    key: str
    source: str
    offset: Optional[int] = None
    length: Optional[int] = None
    run: Optional[str] = None


class Originals:
    """Reads the encoded bytes of indexed images (thread-safe; caches which paths are files)."""

    def __init__(self, max_bytes: int = MAX_ORIGINAL_BYTES):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._is_file: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self._key_features: dict[str, str] = {}
        self._warned: set = set()

    # --------------------------------------------------------------------------------- reading

    def read(self, at: Location) -> bytes:
        """The encoded image bytes of `at`; `OriginalError` saying why not."""
        if at.length is not None and at.length > self.max_bytes:
            raise OriginalError(f"{at.source} is {at.length} bytes, over {self.max_bytes}")
        path, item = self.locate(at.source)
        try:
            if item is None:
                return self._read_file(path, at)
            if at.offset is not None:
                data = self._read_span(path, item, at)
                if data is not None:
                    return data
            else:
                self._warn_no_offsets(path, at)
            return self._scan(path, item, at)
        except (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError) as e:
            raise OriginalError(f"cannot read {at.source}: {type(e).__name__}: {e}") from None

    def locate(self, source: str) -> tuple[str, Optional[str]]:
        """(file, None) when `source` is a file, else (shard file, record index or member name):
        the first of the source itself, then its prefixes before a ':' (`<shard>:<index>` first),
        that is a file."""
        for path, item in _candidates(source):
            if self._exists(path):
                return path, item
        raise OriginalError(f"{source} is not there any more (no such file)")

    def _exists(self, path: str) -> bool:
        with self._lock:
            if path in self._is_file:
                self._is_file.move_to_end(path)
                return self._is_file[path]
        try:
            if _is_remote(path):
                fs, name = storage.get_filesystem(path)
                found = bool(fs.isfile(name))
            else:
                found = os.path.isfile(path)
        except (OSError, ValueError):
            found = False
        with self._lock:
            self._is_file[path] = found
            while len(self._is_file) > _CACHED_PATHS:
                self._is_file.popitem(last=False)
        return found

    def _read_file(self, path: str, at: Location) -> bytes:
        data = _read_whole(path, self.max_bytes)
        if at.length is not None and len(data) != at.length:
            self._warn_once(
                ("changed", path),
                "%s is %d bytes, %d when the job read it: it changed since (its tags and vector "
                "in the index are the old file's)",
                printable_path(path),
                len(data),
                at.length,
            )
        return data

    def _read_span(self, path: str, item: str, at: Location) -> Optional[bytes]:
        """The image at the recorded offset, checked; None when the check fails (then scanned)."""
        start = max(0, at.offset - _TAR_BLOCK)
        window = _read_range(path, start, at.offset + at.length + tfr.FOOTER_BYTES)
        head = window[: at.offset - start]
        data = window[at.offset - start : at.offset - start + at.length]
        footer = window[at.offset - start + at.length :]
        if len(data) == at.length and len(head) >= tfr.HEADER_BYTES:
            problem, length = tfr.check_header(head[-tfr.HEADER_BYTES :])
            if problem is None and length == at.length:
                if tfr.check_data(data, length, footer) is None:
                    return self._example_image(data, at, item)
        if len(data) == at.length and len(head) == _TAR_BLOCK:
            name = _tar_member_at(head, at.length)
            if name == item:
                return data
            if name is not None:  # the member's data is another's: a link, or a long name
                return None
        self._warn_once(
            ("moved", path),
            "%s: the recorded offsets no longer match its contents (it was replaced or "
            "rewritten since the job read it): its images are found by scanning it",
            printable_path(path),
        )
        return None

    def _example_image(self, record: bytes, at: Location, item: str) -> bytes:
        try:
            features = tfr.example_features(record)
        except (ValueError, UnicodeDecodeError) as e:
            raise OriginalError(
                f"{at.source}: the record is not a tf.train.Example ({e})"
            ) from None
        key = tfr.example_key(features)
        if key is not None and key != at.key:
            raise OriginalError(
                f"{at.source} now holds the image of key {key!r}, not {at.key!r}: the shard "
                "was rewritten since it was indexed"
            )
        feature = self._key_feature(at.run)
        values = features.get(feature)
        if not values or not isinstance(values[0], bytes):
            raise OriginalError(f"{at.source}: the record has no {feature!r} bytes")
        return values[0]

    def _key_feature(self, run: Optional[str]) -> str:
        """The --key_feature of the run that read the image (its summary.json options)."""
        if not run:
            return DEFAULT_KEY_FEATURE
        with self._lock:
            if run in self._key_features:
                return self._key_features[run]
        feature = DEFAULT_KEY_FEATURE
        try:
            with storage.open_file(f"{run.rstrip('/')}/summary.json", "rb") as f:
                options = json.loads(f.read()).get("options") or {}
            feature = str(options.get("key_feature") or DEFAULT_KEY_FEATURE)
        except (OSError, ValueError, AttributeError):
            pass
        with self._lock:
            self._key_features[run] = feature
        return feature

    # ------------------------------------------------------------------------------------ scans

    def _scan(self, path: str, item: str, at: Location) -> bytes:
        if item.isdigit() and _looks_like_tfrecord(path):
            return self._scan_tfrecord(path, int(item), at)
        return self._scan_tar(path, item)

    def _scan_tfrecord(self, path: str, index: int, at: Location) -> bytes:
        with _open_decompressed(path) as f:
            for _ in range(index):
                problem, length = tfr.check_header(f.read(tfr.HEADER_BYTES))
                if problem:
                    raise OriginalError(f"{at.source}: {problem} before record {index}")
                _skip(f, length + tfr.FOOTER_BYTES)
            problem, length = tfr.check_header(f.read(tfr.HEADER_BYTES))
            if problem is None and length > self.max_bytes:
                problem = f"record of {length} bytes, over {self.max_bytes}"
            if problem is None:
                data = f.read(length)
                problem = tfr.check_data(data, length, f.read(tfr.FOOTER_BYTES))
            if problem:
                raise OriginalError(f"{at.source}: {problem}")
        return self._example_image(data, at, str(index))

    def _scan_tar(self, path: str, item: str) -> bytes:
        with (
            storage.open_file(path, "rb") as raw,
            tarfile.open(
                fileobj=raw, mode="r:*", encoding="utf-8", errors="surrogateescape"
            ) as tar,
        ):
            for member in tar:
                if key_text(member.name) != item:
                    continue
                if member.islnk() or member.issym():  # resolved in the shard only (tarfile)
                    member = _link_target(tar, member)
                if not member.isreg():
                    raise OriginalError(f"{path}:{item} is not a file member")
                if member.size > self.max_bytes:
                    raise OriginalError(f"{path}:{item} is {member.size} bytes, over the limit")
                with tar.extractfile(member) as f:
                    return f.read()
        raise OriginalError(f"{path} has no member {item} any more")

    # --------------------------------------------------------------------------------- warnings

    def _warn_no_offsets(self, path: str, at: Location) -> None:
        if _compressed(path):
            return  # by design: offsets into a compressed stream are useless (module docstring)
        self._warn_once(
            ("old", at.run),
            "the images of %s have no recorded offsets (results written before source_offset "
            "and source_length existed): each of their thumbnails scans its shard; run the job "
            "again into a new OUTPUT and index it to read them directly",
            at.run or "an indexed output",
        )

    def _warn_once(self, what, message: str, *args) -> None:
        with self._lock:
            if what in self._warned:
                return
            self._warned.add(what)
        _LOG.warning(message, *args)


# --------------------------------------------------------------------------------------- helpers


def printable_path(path: str) -> str:
    from core.text import printable

    return printable(path)


def _candidates(source: str):
    """(path, item) splits of a source, most likely first (see `Originals.locate`)."""
    yield source, None
    if "%" in source and "://" not in source:  # a local name that was not UTF-8 (core.names)
        yield os.fsdecode(name_bytes(source)), None
    scheme = source.find("://")
    colons = [i for i, c in enumerate(source) if c == ":" and i != scheme]
    shard, _, index = source.rpartition(":")
    if shard and index.isdigit():
        yield shard, index
    for i in colons:
        path, item = source[:i], source[i + 1 :]
        if path and item:
            yield path, item
            if "%" in path and "://" not in path:
                yield os.fsdecode(name_bytes(path)), item


def _is_remote(path: str) -> bool:
    return "://" in path


def _read_whole(path: str, max_bytes: int) -> bytes:
    """A whole file, measured first (never more than `max_bytes`); a local one must be a regular
    file (a FIFO put in its place is refused, not waited on)."""
    if _is_remote(path):
        fs, name = storage.get_filesystem(path)
        size = int(fs.size(name))
        if size > max_bytes:
            raise OriginalError(f"{path} is {size} bytes, over {max_bytes}")
        return fs.cat_file(name)
    with _regular_file(path) as (f, size):
        data = f.read(min(size, max_bytes) + 1)
    if len(data) > max_bytes:
        raise OriginalError(f"{printable_path(path)} is over {max_bytes} bytes")
    return data


def _read_range(path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file (fewer at its end): one ranged request on gs://."""
    if _is_remote(path):
        fs, name = storage.get_filesystem(path)
        return fs.cat_file(name, start=start, end=end)
    with _regular_file(path) as (f, _):
        return os.pread(f.fileno(), end - start, start)


@contextlib.contextmanager
def _regular_file(path: str):
    """`core.storage.open_regular_file`, its refusal an `OriginalError` naming the path."""
    try:
        with storage.open_regular_file(path, printable_path(path)) as opened:
            yield opened
    except storage.NotRegularFileError as e:
        raise OriginalError(str(e)) from None


def _tar_member_at(block: bytes, length: int) -> Optional[str]:
    """The name (as a key text) of the regular file member of `length` bytes whose ustar header
    `block` is, or None when it is not one. The name differs from the sample's member for a link
    (the data is its target's) and for a long name (its PAX/GNU record before the header holds
    the whole name): those are found by a scan."""
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None
    return key_text(info.name) if info.isreg() and info.size == length else None


def _link_target(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tarfile.TarInfo:
    """The file member a link member resolves to, inside the archive (tarfile's own rule: the
    file system is never looked at); OriginalError when there is none."""
    try:
        return tar._find_link_target(member)  # noqa: SLF001 - the rule extractfile applies
    except KeyError:
        raise OriginalError(f"link {key_text(member.name)} has no target in the shard") from None


def _compressed(path: str) -> bool:
    name = path.lower()
    return name.endswith((".tgz", *storage.COMPRESSED_EXTS))


def _open_decompressed(path: str):
    """The file's bytes as a stream, decompressed by its extension (as Beam's reader does)."""
    raw = storage.open_file(path, "rb")
    for ext, opener in _DECOMPRESSORS.items():
        if path.lower().endswith(ext):
            return opener(raw)
    return raw


def _looks_like_tfrecord(path: str) -> bool:
    """Whether the file starts with a TFRecord record header (valid length CRC)."""
    try:
        with _open_decompressed(path) as f:
            problem, _ = tfr.check_header(f.read(tfr.HEADER_BYTES))
    except (OSError, EOFError, zlib.error, lzma.LZMAError):
        return False
    return problem is None


def _skip(f, n: int) -> None:
    if hasattr(f, "seekable") and f.seekable() and not isinstance(f, _SEEK_BY_READING):
        f.seek(n, io.SEEK_CUR)
        return
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError("the shard ends early")
        n -= len(chunk)


_SEEK_BY_READING = (gzip.GzipFile, bz2.BZ2File, lzma.LZMAFile)
