"""Read encoded images: TFRecord shards, WebDataset tars or image files (ARCHITECTURE.md, "Inputs").

Graph (`ReadImages.expand`):

    patterns -> match (FileSystems, runtime) -> Distinct -> Reshuffle -> shard URIs
    shard URIs -> key pass: (key, (uri, index, source)) -> GroupByKey
               -> losers {(uri, index): winner}
    shard URIs -> read pass (losers as a side input) -> ImageRecord | Failure (tag FAILURES)

Each shard or file is one unit of work, read by a DoFn that yields one record at a time, so memory
stays at one sample. Keys must be unique: when a key occurs more than once, the occurrence with the
smallest (shard URI, index in shard) is kept and the others become read failures "DuplicateKey: key
also read from <winning source>". The key pass reads the shards once more but keeps no image bytes;
it is skipped when every input is an image file (keys are then file URIs, unique by construction).
Measured with a tiny model (bench/scale.py, 100k records in 100 TFRecord shards) it costs ~1% of the
job's wall time on local disk and ~4% on the GCS emulator, under the 10% that would justify a
one-pass key plan; its shuffle holds one small tuple per record and the side input only the
duplicates, so on Dataflow a worker's memory does not depend on the number of keys.

Choices (docs/bad-input.md has the whole table of what bad input gets):
- A zero-byte image file becomes a record (decode fails it with "empty file (0 bytes)").
- A file whose format `auto` cannot tell from its extension becomes one read failure (not silence).
- Non-regular files (FIFOs, devices, sockets, and links to them) are never opened: the match leaves
  them out and counts them (`read_skipped_special`); one that turns into such a file after the
  match is a read failure `NotRegularFileError` (local files are opened non-blocking).
- Every input (file, TFRecord record, tar image member) is measured before it is read: one over
  `max_input_bytes` (--max_input_bytes) is a read failure `InputTooLargeError`, its bytes skipped.
- Names that are not UTF-8 (local files, tar members) get a lossless UTF-8 key: `core.names`.
- A corrupt or truncated TFRecord / tar: records read before it are kept, then ONE failure names the
  shard and byte offset (of the uncompressed stream), keyed `<shard uri>:<index of lost record>`.
  TFRecord framing (length, its CRC, data, its CRC) is checked per record.
- WebDataset tars (samples, link members, damage): `transforms.webdataset`.
- I/O errors in the middle of a shard also become that shard's one failure, so one unreadable file
  never fails the job (Beam's FileSystems already retry transient GCS errors).
- `.gz`/`.bz2`/... suffixes are decompressed transparently by FileSystems for TFRecord/tar inputs;
  `.tgz` tars by tarfile.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import stat
import struct
from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes, FileSystem
from apache_beam.io.filesystems import FileSystems

from core.names import escaped_name_taken, from_element, key_text, to_element
from core.storage import COMPRESSED_EXTS, open_regular_file
from core.tfrecord import (
    KEY_FEATURES,
    check_data,
    check_header,
    crc32c_extend,
    mask,
    masked_crc32c,  # noqa: F401 (re-exported)
)
from transforms import counters, progress
from transforms.entries import (
    DEFAULT_MAX_INPUT_BYTES,
    IMAGE_EXTS,
    CorruptShardError,
    DuplicateKey,
    Entry,
    MissingImageError,
    UnknownFormatError,
    discard,
    fatal,
    read_exact,
    seekable,
    too_large,
)
from transforms.gcs import GcsDoFn
from transforms.records import FAILURES, STAGE_READ, Failure, ImageRecord, error_text
from transforms.webdataset import iter_tar, split_member  # noqa: F401 (split_member re-exported)

INPUT_FORMATS = ("auto", "tfrecord", "webdataset", "images")
TFRECORD_EXTS = (".tfrecord", ".tfrec", ".tfrecords")
TAR_EXTS = (".tar", ".tgz")
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")  # data-00003-of-01024
_LOG = logging.getLogger(__name__)


class ReadResult(NamedTuple):
    """What `ReadImages` returns: the records and the read failures (two PCollections)."""

    records: beam.PCollection  # of ImageRecord
    failures: beam.PCollection  # of Failure, stage "read"


# ---------------------------------------------------------------------------------------- formats


def detect_format(uri: str, input_format: str = "auto") -> Optional[str]:
    """'tfrecord' | 'webdataset' | 'images' for a file, or None when `auto` cannot tell."""
    if input_format != "auto":
        return input_format
    name = posixpath.basename(uri).lower()
    for ext in COMPRESSED_EXTS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    if name.endswith(TFRECORD_EXTS) or _SHARD_SUFFIX.search(name):
        return "tfrecord"
    if name.endswith(TAR_EXTS):
        return "webdataset"
    if name.endswith(IMAGE_EXTS):
        return "images"
    return None


def iter_entries(
    uri: str | bytes,
    fmt: Optional[str],
    key_feature: str = "image/encoded",
    with_data: bool = True,
    max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
) -> Iterator[Entry]:
    """Every item of one file, in order; a shard-level problem ends it with one `fatal` Entry.

    `uri`: the file's URI or local path (a str, with surrogates for a name that is not UTF-8, or a
    PCollection element of `core.names.to_element`); keys, sources and messages name it by
    its key text. `max_bytes`: the size limit of one input (file, record, image member)."""
    uri = from_element(uri)
    name = key_text(uri)
    if escaped_name_taken(uri):
        yield fatal(
            name,
            0,
            DuplicateKey(
                f"key also read from {name} (this name is not UTF-8, and its key text, "
                "with the undecodable bytes escaped, is that file's name)"
            ),
            key=name,
            source=name,
        )
        return
    if fmt is None:
        yield fatal(
            name,
            0,
            UnknownFormatError(
                f"cannot tell the input format of {name} from its extension; "
                f"pass --input_format (one of {', '.join(INPUT_FORMATS[1:])})"
            ),
            key=name,
            source=name,
        )
        return
    if fmt == "images":
        yield from _iter_image_file(uri, name, with_data, max_bytes)
        return
    if fmt not in ("tfrecord", "webdataset"):
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, not {fmt!r}")
    position = [0]  # index of the item being read, for the failure of an unexpected I/O error
    # Offsets into a stream the file system decompresses (`.gz`, ...) cannot be seeked to: such
    # items get no `offset`/`length` (their readers scan the shard; docs/serve.md).
    spans = CompressionTypes.detect_compression_type(uri) == CompressionTypes.UNCOMPRESSED
    try:
        with _open_shard(uri) as f:
            if fmt == "tfrecord":
                items = _iter_tfrecord(name, f, key_feature, with_data, max_bytes, spans)
            else:
                items = iter_tar(name, f, lambda: _open_shard(uri), with_data, max_bytes, spans)
            for entry in items:
                position[0] = entry.index + 1
                yield entry
    except Exception as exc:  # noqa: BLE001 - an unreadable shard is a failure row, not a dead job
        yield fatal(
            name,
            position[0],
            OSError(f"cannot read {name} after {position[0]} items: {error_text(exc)}"),
        )


def _open_shard(uri: str):
    return FileSystems.open(uri, compression_type=CompressionTypes.AUTO)


def _iter_image_file(uri: str, name: str, with_data: bool, max_bytes: int) -> Iterator[Entry]:
    if not with_data:
        yield Entry(name, 0, name)
        return
    try:
        data = read_file(uri, max_bytes)
    except Exception as exc:  # noqa: BLE001
        yield fatal(name, 0, exc, key=name, source=name)
        return
    yield Entry(name, 0, name, data, offset=0, length=len(data))


def read_file(uri: str, max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> bytes:
    """A whole file's bytes, measured first: `InputTooLargeError` over `max_bytes` (nothing read),
    `NotRegularFileError` for a local FIFO, device or socket (opened without blocking)."""
    if "://" in uri:
        with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return _read_capped(f, _stream_size(f), max_bytes)
    with open_regular_file(uri, key_text(uri)) as (f, size):
        return _read_capped(f, size, max_bytes)


def _read_capped(f, size: Optional[int], max_bytes: int) -> bytes:
    if size is None:
        data = read_exact(f, max_bytes + 1)
    elif size > max_bytes:
        raise too_large("the file", size, max_bytes)
    else:
        data = read_exact(f, size + 1)  # one buffer of the file's size (as a plain read() has)
        if len(data) > size:  # it grew since it was measured: the rest, up to the limit
            data += read_exact(f, max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise too_large("the file", len(data), max_bytes)
    return data


def _stream_size(f) -> Optional[int]:
    """The size of an open file without reading it (GCS readers know it), or None."""
    try:
        if seekable(f):
            end = f.seek(0, io.SEEK_END)
            f.seek(0)
            return end
    except (OSError, ValueError, AttributeError):
        pass
    return None


# ---------------------------------------------------------------------------------------- TFRecord


def _iter_tfrecord(
    name: str, f, key_feature: str, with_data: bool, max_bytes: int, spans: bool = True
) -> Iterator[Entry]:
    """The records of a TFRecord stream; each Entry's `offset`/`length` are its record's data
    (the serialized Example, after the 12-byte length header) when `spans`."""
    from tensorflow.core.example import example_pb2  # protobuf only; imported where needed

    offset, index = 0, 0
    while True:
        header = read_exact(f, 12)
        if not header:
            return
        problem, length = check_header(header)
        if problem is None and length > max_bytes:  # measured, skipped, never held
            problem = _skip_record(f, length)
            if problem is None:
                source = f"{name}:{index}"
                yield Entry(
                    source,
                    index,
                    source,
                    error=error_text(too_large("the record", length, max_bytes)),
                )
                offset += 16 + length
                index += 1
                continue
        elif problem is None:
            data = read_exact(f, length)
            footer = read_exact(f, 4) if len(data) == length else b""
            problem = check_data(data, length, footer)
        if problem:
            yield fatal(
                name,
                index,
                CorruptShardError(f"corrupt TFRecord at byte {offset} of {name}: {problem}"),
            )
            return
        entry = _example_entry(example_pb2, data, name, index, key_feature, with_data)
        yield entry._replace(offset=offset + 12, length=length) if spans else entry
        offset += 16 + length
        index += 1


def _skip_record(f, length: int) -> Optional[str]:
    """Reads past a record's data, checking its CRC as it goes; the problem, or None."""
    crc = [0]

    def update(chunk):
        crc[0] = crc32c_extend(crc[0], chunk)

    read = discard(f, length, update)
    footer = read_exact(f, 4) if read == length else b""
    if read < length:
        return f"truncated record ({read} of {length} data bytes)"
    if len(footer) < 4:
        return "truncated record (data CRC missing)"
    if mask(crc[0]) != struct.unpack("<I", footer)[0]:
        return "data CRC mismatch"
    return None


def _example_entry(
    example_pb2, data: bytes, name: str, index: int, key_feature: str, with_data: bool
) -> Entry:
    source = f"{name}:{index}"
    try:
        example = example_pb2.Example.FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError (its text is not shown)
        return Entry(
            source,
            index,
            source,
            error=error_text(
                MissingImageError(f"record is not a tf.train.Example ({type(exc).__name__})")
            ),
        )
    features = example.features.feature
    key = _example_key(features) or source
    image = features[key_feature].bytes_list.value if key_feature in features else ()
    if not image:
        names = ", ".join(sorted(features)) or "none"
        return Entry(
            key,
            index,
            source,
            error=error_text(
                MissingImageError(
                    f"record has no {key_feature!r} bytes feature (features: {names})"
                )
            ),
        )
    return Entry(key, index, source, image[0] if with_data else None)


def _example_key(features) -> Optional[str]:
    for name in KEY_FEATURES:
        if name not in features:
            continue
        feature = features[name]
        if feature.bytes_list.value and feature.bytes_list.value[0]:
            return feature.bytes_list.value[0].decode("utf-8", "backslashreplace")
        if feature.int64_list.value:
            return str(feature.int64_list.value[0])
    return None


# ---------------------------------------------------------------------------------- globs


def split_patterns(patterns) -> list:
    """'a/*.jpg, gs://b/*.tar' (or a list of globs) -> the non-empty globs, stripped."""
    items = patterns.split(",") if isinstance(patterns, str) else list(patterns)
    return [p.strip() for p in items if p and p.strip()]


def match_files(pattern: str) -> list:
    """The file URIs one glob matches (local or gs://), directories left out."""
    return [
        m.path for m in FileSystems.match([pattern])[0].metadata_list if not m.path.endswith("/")
    ]


# ---------------------------------------------------------------------------------- input forms

_GLOB_CHARS = re.compile(r"[*?\[]")


class Expansion(NamedTuple):
    """What one `--input` item stands for: the files to read, and the files left out."""

    files: list  # URIs to read (a glob's matches, or a folder's accepted files)
    skipped: list  # files in a folder whose extension --input_format does not accept
    special: list = []  # local FIFOs, devices, sockets (or links to them): never opened


def normalize_pattern(pattern: str) -> str:
    """A local glob or folder as an absolute path (`~` expanded, `.`/`..` resolved), so a bare
    glob in the current folder matches, and every spelling of a file gives the same key.
    URIs (gs://...) are returned unchanged."""
    if "://" in pattern:
        return pattern
    trailing = "/" if pattern.endswith("/") else ""
    return os.path.abspath(os.path.expanduser(pattern)) + trailing


def is_folder(pattern: str) -> bool:
    """True when a (normalized) pattern without glob characters names a folder: a local
    directory, or an object-store prefix with objects under it and no object of its own name."""
    if _GLOB_CHARS.search(pattern):
        return False
    if "://" not in pattern:
        return os.path.isdir(pattern)
    if not pattern.endswith("/") and FileSystems.exists(pattern):
        return False
    prefix = pattern.rstrip("/") + "/"
    return bool(FileSystems.match([prefix + "**"], limits=[1])[0].metadata_list)


def folder_accepts(uri: str, input_format: str = "auto") -> bool:
    """Whether a file found in a folder is an input: its extension names a format that
    `input_format` reads (`auto`: any known format). Sidecars (.txt, .json ...) are not."""
    found = detect_format(uri, "auto")
    return found is not None and input_format in ("auto", found)


def expand_input(pattern: str, input_format: str = "auto") -> Expansion:
    """The files one `--input` item stands for: a glob's matches (every match is an input; one
    that cannot be read becomes a failure), or every file under a folder, recursively, that
    `folder_accepts` (the others are returned as `skipped`, not failures). Local matches that are
    not regular files (FIFOs, devices, sockets, links to them) are returned as `special`, so they
    are never opened; links to nothing are inputs (reading them gives their failure row)."""
    pattern = normalize_pattern(pattern)
    listed = pattern.rstrip("/") + "/**" if is_folder(pattern) else pattern
    if "://" in pattern:
        found = [(uri, "regular") for uri in match_files(listed)]  # objects are always files
    else:
        found = list(_match_local(listed))
    files, skipped, special = [], [], []
    folder = listed != pattern
    for uri, kind in found:
        if folder and not folder_accepts(uri, input_format):
            skipped.append(uri)
        else:
            (special if kind == "special" else files).append(uri)
    return Expansion(files, skipped, special)


def _match_local(pattern: str) -> Iterator[tuple[str, Optional[str]]]:
    """(path, kind) of every local file a glob matches: the paths and glob syntax of Beam's local
    `FileSystems.match` (a walk under the glob's fixed prefix, `FileSystem.translate_pattern`),
    with one stat a file for its kind (`_file_kind`; Beam's takes two), and links to nothing kept
    (Beam drops them unseen; here they become failure rows)."""
    if pattern.endswith("/"):
        pattern += "*"
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    if prefix == pattern:  # no glob: the file itself
        if os.path.lexists(pattern) and not os.path.isdir(pattern):
            yield pattern, _file_kind(pattern)
        return
    matches = re.compile(FileSystem.translate_pattern(pattern)).match
    for folder, _, names in os.walk(os.path.dirname(prefix)):
        for name in names:
            path = os.path.join(folder, name)
            if matches(path):
                yield path, _file_kind(path)


def _file_kind(path: str) -> Optional[str]:
    """ "regular" or "special" (FIFO, device, socket) for a local path, links followed; None when
    it cannot be stat'ed (a link to nothing or a loop: reading it gives its failure)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return "regular" if stat.S_ISREG(mode) else "special"


def _local_problem(pattern: str, input_format: str) -> Optional[str]:
    """Why a local (normalized) pattern gives no file to read: "none" (it matches nothing),
    "unreadable" (only files the format does not read), "special" (only FIFOs, devices, sockets),
    or None. A folder or glob is walked only up to its first input."""
    if is_folder(pattern):
        found = special = False
        for folder, _, names in os.walk(pattern):
            for name in names:
                found, path = True, os.path.join(folder, name)
                if folder_accepts(path, input_format):
                    if _file_kind(path) != "special":
                        return None
                    special = True
        return "special" if special else "unreadable" if found else "none"
    matched = False
    for _, kind in _match_local(pattern):  # up to the first file that is not special
        if kind != "special":
            return None
        matched = True
    return "special" if matched else "none"


def _no_input_message(pattern: str, input_format: str, problem: str) -> str:
    shown = repr(key_text(pattern))
    if problem == "special":
        return f"input pattern {shown} matched only FIFOs, devices or sockets, which are never read"
    if problem == "unreadable":
        return f"input pattern {shown} matched no files that --input_format {input_format} reads"
    return f"input pattern {shown} matched no files"


# ---------------------------------------------------------------------------------------- Beam


class _MatchFiles(GcsDoFn):
    """Pattern -> the URIs it matches; a pattern matching nothing fails loudly (typos are errors).

    Folder files with extensions no reader accepts are counted (`read_skipped_files`), and so are
    FIFOs, devices and sockets (`read_skipped_special`), and logged. URIs go out as
    `core.names.to_element` makes them (bytes for a local name that is not UTF-8)."""

    def __init__(self, input_format: str = "auto"):
        self._format = input_format

    def process(self, pattern: str | bytes):
        pattern = from_element(pattern)
        paths, skipped, special = expand_input(pattern, self._format)
        shards = sum(detect_format(u, self._format) != "images" for u in paths)
        note = f" ({shards} TFRecord/tar shards)" if shards else ""
        for found, counter, why in (
            (skipped, counters.READ_SKIPPED_FILES, f"--input_format {self._format} does not read"),
            (special, counters.READ_SKIPPED_SPECIAL, "are FIFOs, devices or sockets"),
        ):
            if found:
                counter.metric().inc(len(found))
                examples = ", ".join(key_text(posixpath.basename(s)) for s in found[:3])
                note += f"; skipped {len(found)} file(s) that {why} (e.g. {examples})"
        _LOG.info("input %s: %d file(s)%s", key_text(pattern), len(paths), note)
        if not paths:
            problem = "unreadable" if skipped else "special" if special else "none"
            raise ValueError(_no_input_message(pattern, self._format, problem))
        counters.READ_FILES.metric().inc(len(paths))
        progress.matched(len(paths), shards)
        for path in paths:
            yield to_element(path)


class _ExtractKeys(GcsDoFn):
    """Key pass: (key, (uri, index, source)) of every keyed item; no image bytes kept."""

    def __init__(
        self,
        input_format: str,
        key_feature: str,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    ):
        self._format, self._key_feature = input_format, key_feature
        self._max_bytes = max_input_bytes

    def process(self, element: str | bytes):
        uri = from_element(element)
        name = key_text(uri)
        for entry in iter_entries(
            uri,
            detect_format(uri, self._format),
            self._key_feature,
            with_data=False,
            max_bytes=self._max_bytes,
        ):
            if not entry.fatal:
                yield entry.key, (name, entry.index, entry.source)


def _losers(item):
    """For a key read more than once: the occurrences that lose to the first.

    Yields ((uri, index), winning source) for every occurrence but the first.
    """
    _, occurrences = item
    occurrences = sorted(occurrences, key=lambda o: (o[0], o[1]))
    winner_source = occurrences[0][2]
    for uri, index, _ in occurrences[1:]:
        yield (uri, index), winner_source


class _ReadShard(GcsDoFn):
    """Read pass: one shard/file -> ImageRecords, and Failures on the FAILURES tag."""

    def __init__(
        self,
        input_format: str,
        key_feature: str,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    ):
        self._format, self._key_feature = input_format, key_feature
        self._max_bytes = max_input_bytes
        self._records = counters.READ_IMAGES.metric()
        self._failures = counters.READ_FAILURES.metric()

    def process(self, element: str | bytes, losers=None):
        losers = losers or {}
        uri = from_element(element)
        name = key_text(uri)
        for entry in iter_entries(
            uri, detect_format(uri, self._format), self._key_feature, max_bytes=self._max_bytes
        ):
            error = entry.error
            if error is None and (name, entry.index) in losers:
                error = error_text(
                    DuplicateKey(f"key also read from {losers[(name, entry.index)]}")
                )
            if error is not None:
                self._failures.inc()
                yield beam.pvalue.TaggedOutput(
                    FAILURES, Failure(entry.key, entry.source, STAGE_READ, error)
                )
            else:
                self._records.inc()
                yield ImageRecord(entry.key, entry.source, entry.data, entry.offset, entry.length)
        progress.add(progress.FILES_READ)  # the live total is known once every file is read


class ReadImages(beam.PTransform):
    """Read every input image: `p | ReadImages(patterns)` -> `ReadResult(records, failures)`.

    patterns: globs or folders (local or gs://, already split on commas by the caller; a str is
      one). Local ones may be relative or start with `~`; a folder means its files, recursively,
      whose extension `input_format` reads (see `expand_input`).
    input_format: "auto" (by extension, per file), "tfrecord", "webdataset" or "images".
    key_feature: the tf.train.Example bytes feature holding the encoded image.
    max_input_bytes: the size limit of one input (file, TFRecord record, tar image member); a
      larger one is a read failure `InputTooLargeError`, its bytes never read.
    validate: check at construction that every pattern matches at least one file (a typo must not
      give an empty, successful run); the runtime match checks again.
    Returns `ReadResult(records: PCollection[ImageRecord], failures: PCollection[Failure])`; it
    unpacks as `records, failures = p | ReadImages(...)`.
    Counters (namespace "read"): read_images, read_failures, read_files, read_ignored_members,
      read_skipped_files (folder files with an extension no reader accepts),
      read_skipped_special (FIFOs, devices, sockets: never opened).
    """

    def __init__(
        self,
        patterns,
        input_format: str = "auto",
        key_feature: str = "image/encoded",
        validate: bool = True,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    ):
        super().__init__()
        self._patterns = [
            normalize_pattern(p)
            for p in split_patterns([patterns] if isinstance(patterns, str) else patterns)
        ]
        if not self._patterns:
            raise ValueError("no input patterns given")
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, not {input_format!r}")
        self._format = input_format
        self._key_feature = key_feature
        if max_input_bytes <= 0:
            raise ValueError(f"max_input_bytes must be positive, not {max_input_bytes}")
        self._max_bytes = max_input_bytes
        if validate:
            check_patterns(self._patterns, input_format)

    def _needs_key_pass(self) -> bool:
        if self._format == "images":
            return False
        if self._format == "auto":
            return not all(detect_format(p) == "images" for p in self._patterns)
        return True

    def expand(self, pbegin):
        uris = (
            pbegin
            | "Patterns" >> beam.Create([to_element(p) for p in self._patterns])
            | "Match" >> beam.ParDo(_MatchFiles(self._format))
            | "DistinctFiles" >> beam.Distinct()
            | "SpreadFiles" >> beam.Reshuffle()
        )
        losers = None
        if self._needs_key_pass():
            losers = beam.pvalue.AsDict(
                uris
                | "ExtractKeys"
                >> beam.ParDo(_ExtractKeys(self._format, self._key_feature, self._max_bytes))
                | "GroupKeys" >> beam.GroupByKey()
                | "FindDuplicates" >> beam.FlatMap(_losers)
            )
        read = _ReadShard(self._format, self._key_feature, self._max_bytes)
        outputs = uris | "ReadShards" >> (
            beam.ParDo(read, losers) if losers is not None else beam.ParDo(read)
        ).with_outputs(FAILURES, main="records")
        return ReadResult(outputs.records, outputs[FAILURES])


_CHECK_LISTING = 1000  # objects listed to check a gs:// folder before the job starts


def check_patterns(patterns: list[str], input_format: str = "auto") -> None:
    """Raise ValueError naming every pattern that gives no file to read (or cannot be listed).

    Local patterns are checked as the match will expand them (a folder only up to its first
    readable file), so a folder of sidecars or a lone FIFO is a usage error before the job starts.
    gs:// globs are checked cheaply (one listed object), gs:// folders by their first 1,000
    objects: a bigger one with none the format reads among them fails at run time, in the match."""
    empty, unreadable, remote = [], [], []
    try:
        for pattern in patterns:
            normalized = normalize_pattern(pattern)
            if "://" in normalized:
                folder = is_folder(normalized)
                listed = normalized.rstrip("/") + "/**" if folder else normalized
                remote.append((pattern, listed, folder))
                continue
            problem = _local_problem(normalized, input_format)
            if problem == "none":
                empty.append(pattern)
            elif problem:
                unreadable.append(_no_input_message(pattern, input_format, problem))
        results = FileSystems.match(
            [listed for _, listed, _ in remote],
            limits=[_CHECK_LISTING if folder else 1 for _, _, folder in remote],
        )
    except Exception as exc:  # noqa: BLE001 - BeamIOError lists the failing patterns
        raise ValueError(f"cannot list input files: {error_text(exc)}") from None
    for (pattern, _, folder), result in zip(remote, results):
        found = [m.path for m in result.metadata_list]
        if not found:
            empty.append(pattern)
        elif (
            folder
            and len(found) < _CHECK_LISTING
            and not any(folder_accepts(uri, input_format) for uri in found)
        ):
            unreadable.append(_no_input_message(pattern, input_format, "unreadable"))
    problems = unreadable
    if empty:
        shown = ", ".join(key_text(pattern) for pattern in empty)
        problems = [f"input pattern(s) matched no files: {shown}", *unreadable]
    if problems:
        raise ValueError("; ".join(problems))
