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

Choices:
- A zero-byte image file becomes a record (decode fails it with "empty file (0 bytes)").
- A file whose format `auto` cannot tell from its extension becomes one read failure (not silence).
- A corrupt or truncated TFRecord / tar: records read before it are kept, then ONE failure names the
  shard and byte offset (of the uncompressed stream), keyed `<shard uri>:<index of lost record>`.
- WebDataset: tar members are grouped by KEY (path up to the first dot of the basename, as
  webdataset does), consecutive members with the same KEY form a sample; the image is the first
  KEY.<image ext> member. A sample without one is a failure "no image member; members: ...".
  Members without a KEY (no dot in the basename, dotfiles, `__meta__` files) and non-files are
  ignored (counter `read_ignored_members`). On a truncated tar the sample being read is dropped
  into the one failure.
- I/O errors in the middle of a shard also become that shard's one failure, so one unreadable file
  never fails the job (Beam's FileSystems already retry transient GCS errors).
- `.gz`/`.bz2`/... suffixes are decompressed transparently by FileSystems for TFRecord/tar inputs.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import struct
import tarfile
import zlib
from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms import counters, progress
from transforms.gcs import GcsDoFn
from transforms.records import FAILURES, STAGE_READ, Failure, ImageRecord, error_text

INPUT_FORMATS = ("auto", "tfrecord", "webdataset", "images")
TFRECORD_EXTS = (".tfrecord", ".tfrec", ".tfrecords")
TAR_EXTS = (".tar",)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KEY_FEATURES = ("image/key", "image/source_id", "image/filename")
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")  # data-00003-of-01024
_COMPRESSION_EXTS = (".gz", ".bz2", ".deflate", ".zst", ".xz", ".lzma")
# webdataset's own split: KEY is the dirname plus the basename up to its first dot.
_WDS_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_MAX_TFRECORD_LENGTH = 1 << 31
_CHUNK = 1 << 20
_LOG = logging.getLogger(__name__)


class CorruptShardError(Exception):
    """A TFRecord or tar shard is corrupt or truncated at some byte offset."""


class MissingImageError(ValueError):
    """A record or sample has no image bytes."""


class DuplicateKey(Exception):
    """The key was already read from another source (the failure text reads "DuplicateKey: ...")."""


class UnknownFormatError(ValueError):
    """`auto` could not tell a file's format from its name."""


class ReadResult(NamedTuple):
    """What `ReadImages` returns: the records and the read failures (two PCollections)."""

    records: beam.PCollection  # of ImageRecord
    failures: beam.PCollection  # of Failure, stage "read"


class Entry(NamedTuple):
    """One item of a shard as both passes see it (data is None in the key pass)."""

    key: str
    index: int  # position in the shard (record or sample number); orders duplicates
    source: str
    data: Optional[bytes] = None
    error: Optional[str] = None  # "Type: message" when this item is a failure
    fatal: bool = False  # the shard ends here (corrupt / truncated / unreadable)


# ---------------------------------------------------------------------------------------- formats


def detect_format(uri: str, input_format: str = "auto") -> Optional[str]:
    """'tfrecord' | 'webdataset' | 'images' for a file, or None when `auto` cannot tell."""
    if input_format != "auto":
        return input_format
    name = posixpath.basename(uri).lower()
    for ext in _COMPRESSION_EXTS:
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
    uri: str, fmt: Optional[str], key_feature: str = "image/encoded", with_data: bool = True
) -> Iterator[Entry]:
    """Every item of one file, in order; a shard-level problem ends it with one `fatal` Entry."""
    if fmt is None:
        yield _fatal(
            uri,
            0,
            UnknownFormatError(
                f"cannot tell the input format of {uri} from its extension; "
                f"pass --input_format (one of {', '.join(INPUT_FORMATS[1:])})"
            ),
            key=uri,
            source=uri,
        )
        return
    if fmt == "images":
        yield from _iter_image_file(uri, with_data)
        return
    if fmt not in ("tfrecord", "webdataset"):
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, not {fmt!r}")
    position = [0]  # index of the item being read, for the failure of an unexpected I/O error
    try:
        with FileSystems.open(uri, compression_type=CompressionTypes.AUTO) as f:
            if fmt == "tfrecord":
                items = _iter_tfrecord(uri, f, key_feature, with_data)
            else:
                items = _iter_tar(uri, f, with_data)
            for entry in items:
                position[0] = entry.index + 1
                yield entry
    except Exception as exc:  # noqa: BLE001 - an unreadable shard is a failure row, not a dead job
        yield _fatal(
            uri,
            position[0],
            OSError(f"cannot read {uri} after {position[0]} items: {error_text(exc)}"),
        )


def _fatal(uri: str, index: int, exc: BaseException, key: str = None, source: str = None) -> Entry:
    at = f"{uri}:{index}"
    return Entry(key or at, index, source or at, error=error_text(exc), fatal=True)


def _iter_image_file(uri: str, with_data: bool) -> Iterator[Entry]:
    if not with_data:
        yield Entry(uri, 0, uri)
        return
    try:
        with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read()
    except Exception as exc:  # noqa: BLE001
        yield _fatal(uri, 0, exc, key=uri, source=uri)
        return
    yield Entry(uri, 0, uri, data)


def _read_exact(f, n: int) -> bytes:
    """Up to n bytes; fewer only at end of file (streams may return short reads)."""
    chunks, remaining = [], n
    while remaining > 0:
        chunk = f.read(min(remaining, 64 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# ---------------------------------------------------------------------------------------- TFRecord


def _crc32c_function():
    """Fastest CRC-32C at hand: google-crc32c (a Beam[gcp] dependency), crc32c, or pure Python."""
    try:
        import google_crc32c

        return google_crc32c.value
    except ImportError:
        pass
    try:
        import crc32c

        return crc32c.crc32c
    except ImportError:
        return _crc32c_python


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = None


def _crc32c_python(data: bytes) -> int:
    global _TABLE
    if _TABLE is None:
        _TABLE = _crc32c_table()
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_crc32c = _crc32c_function()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _iter_tfrecord(uri: str, f, key_feature: str, with_data: bool) -> Iterator[Entry]:
    from tensorflow.core.example import example_pb2  # protobuf only; imported where needed

    offset, index = 0, 0
    while True:
        header = _read_exact(f, 12)
        if not header:
            return
        problem, length = _check_header(header)
        data = b""
        if problem is None:
            data = _read_exact(f, length)
            footer = _read_exact(f, 4) if len(data) == length else b""
            problem = _check_data(data, length, footer)
        if problem:
            yield _fatal(
                uri,
                index,
                CorruptShardError(f"corrupt TFRecord at byte {offset} of {uri}: {problem}"),
            )
            return
        yield _example_entry(example_pb2, data, uri, index, key_feature, with_data)
        offset += 16 + length
        index += 1


def _check_header(header: bytes):
    if len(header) < 12:
        return f"truncated record header ({len(header)} of 12 bytes)", 0
    length, length_crc = struct.unpack("<QI", header)
    if masked_crc32c(header[:8]) != length_crc:
        return "length CRC mismatch", 0
    if length > _MAX_TFRECORD_LENGTH:
        return f"record length {length} is implausible", 0
    return None, length


def _check_data(data: bytes, length: int, footer: bytes) -> Optional[str]:
    if len(data) < length:
        return f"truncated record ({len(data)} of {length} data bytes)"
    if len(footer) < 4:
        return "truncated record (data CRC missing)"
    if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
        return "data CRC mismatch"
    return None


def _example_entry(
    example_pb2, data: bytes, uri: str, index: int, key_feature: str, with_data: bool
) -> Entry:
    source = f"{uri}:{index}"
    try:
        example = example_pb2.Example.FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError
        return Entry(
            source,
            index,
            source,
            error=error_text(
                MissingImageError(f"record is not a tf.train.Example ({error_text(exc)})")
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


# --------------------------------------------------------------------------------------- WebDataset


class _CountingReader:
    """File wrapper that counts bytes read and notices end of file (to spot a cut-off tar)."""

    def __init__(self, f):
        self._f = f
        self.count = 0
        self.eof = False

    def read(self, n=-1):
        data = self._f.read(n)
        self.count += len(data)
        if not data and n != 0:
            self.eof = True
        return data


class _Sample:
    """Members of one WebDataset sample seen so far (image bytes only for the image member)."""

    def __init__(self, key: str, index: int):
        self.key, self.index = key, index
        self.members: list[str] = []
        self.exts: set[str] = set()
        self.image_member: Optional[str] = None
        self.image: Optional[bytes] = None

    def add(self, name: str, ext: str, data: Optional[bytes]):
        self.members.append(name)
        self.exts.add(ext)
        if self.image_member is None and _is_image_ext(ext):
            self.image_member, self.image = name, data

    def entry(self, uri: str, with_data: bool) -> Entry:
        if self.image_member is None:
            names = ", ".join(posixpath.basename(m) for m in self.members)
            return Entry(
                self.key,
                self.index,
                f"{uri}:{self.members[0]}",
                error=error_text(MissingImageError(f"no image member; members: {names}")),
            )
        return Entry(
            self.key, self.index, f"{uri}:{self.image_member}", self.image if with_data else None
        )


def _is_image_ext(ext: str) -> bool:
    return "." + ext in IMAGE_EXTS


def split_member(name: str) -> tuple[Optional[str], str]:
    """(KEY, ext) of a tar member as webdataset splits it; KEY None when the name has none."""
    match = _WDS_MEMBER.match(name)
    if not match:
        return None, ""
    return match.group(1), match.group(2).lower()


def _iter_tar(uri: str, f, with_data: bool) -> Iterator[Entry]:
    reader = _CountingReader(f)
    sample: Optional[_Sample] = None
    index, offset = 0, 0
    try:
        tar = tarfile.open(fileobj=reader, mode="r|*")
        for member in tar:
            offset = member.offset
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            if key is None:
                _read_member(tar, member, keep=False)
                counters.READ_IGNORED_MEMBERS.metric().inc()
                continue
            if sample is not None and (sample.key != key or ext in sample.exts):
                yield sample.entry(uri, with_data)  # complete: the next sample has started
                index, sample = index + 1, None
            if sample is None:
                sample = _Sample(key, index)
            keep = with_data and _is_image_ext(ext) and sample.image_member is None
            sample.add(member.name, ext, _read_member(tar, member, keep))
        if sample is not None:  # every member of it was read in full
            yield sample.entry(uri, with_data)
            index, sample = index + 1, None
        if tar.fileobj.comptype == "tar" and reader.eof and reader.count < tar.offset + 512:
            offset = tar.offset  # tarfile ends quietly when a cut falls on a header: we do not
            raise tarfile.ReadError("end of file before the end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        yield _fatal(
            uri,
            index,
            CorruptShardError(f"corrupt or truncated tar at byte {offset} of {uri}: {exc}"),
        )


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, keep: bool) -> Optional[bytes]:
    """Read a member's bytes (kept or thrown away): a streamed tar must be read to move on anyway,
    and reading every byte is what detects a cut-off member."""
    fobj = tar.extractfile(member)
    if keep:
        return fobj.read()
    while fobj.read(_CHUNK):
        pass
    return None


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
    """What one `--input` item stands for: the files to read, and the folder files left out."""

    files: list  # URIs to read (a glob's matches, or a folder's accepted files)
    skipped: list  # files in a folder whose extension --input_format does not accept


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
    `folder_accepts` (the others are returned as `skipped`, not failures)."""
    pattern = normalize_pattern(pattern)
    if not is_folder(pattern):
        return Expansion(match_files(pattern), [])
    files, skipped = [], []
    for uri in match_files(pattern.rstrip("/") + "/**"):
        (files if folder_accepts(uri, input_format) else skipped).append(uri)
    return Expansion(files, skipped)


# ---------------------------------------------------------------------------------------- Beam


class _MatchFiles(GcsDoFn):
    """Pattern -> the URIs it matches; a pattern matching nothing fails loudly (typos are errors).

    Folder files with extensions no reader accepts are counted (`read_skipped_files`) and logged."""

    def __init__(self, input_format: str = "auto"):
        self._format = input_format

    def process(self, pattern: str):
        paths, skipped = expand_input(pattern, self._format)
        shards = sum(detect_format(u, self._format) != "images" for u in paths)
        note = f" ({shards} TFRecord/tar shards)" if shards else ""
        if skipped:
            counters.READ_SKIPPED_FILES.metric().inc(len(skipped))
            examples = ", ".join(posixpath.basename(s) for s in skipped[:3])
            note += (
                f"; skipped {len(skipped)} file(s) that --input_format {self._format} "
                f"does not read (e.g. {examples})"
            )
        _LOG.info("input %s: %d file(s)%s", pattern, len(paths), note)
        if not paths:
            raise ValueError(
                f"input pattern {pattern!r} matched no files"
                + (f" that --input_format {self._format} reads" if skipped else "")
            )
        counters.READ_FILES.metric().inc(len(paths))
        progress.matched(len(paths), shards)
        yield from paths


class _ExtractKeys(GcsDoFn):
    """Key pass: (key, (uri, index, source)) of every keyed item; no image bytes kept."""

    def __init__(self, input_format: str, key_feature: str):
        self._format, self._key_feature = input_format, key_feature

    def process(self, uri: str):
        for entry in iter_entries(
            uri, detect_format(uri, self._format), self._key_feature, with_data=False
        ):
            if not entry.fatal:
                yield entry.key, (uri, entry.index, entry.source)


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

    def __init__(self, input_format: str, key_feature: str):
        self._format, self._key_feature = input_format, key_feature
        self._records = counters.READ_IMAGES.metric()
        self._failures = counters.READ_FAILURES.metric()

    def process(self, uri: str, losers=None):
        losers = losers or {}
        for entry in iter_entries(uri, detect_format(uri, self._format), self._key_feature):
            error = entry.error
            if error is None and (uri, entry.index) in losers:
                error = error_text(DuplicateKey(f"key also read from {losers[(uri, entry.index)]}"))
            if error is not None:
                self._failures.inc()
                yield beam.pvalue.TaggedOutput(
                    FAILURES, Failure(entry.key, entry.source, STAGE_READ, error)
                )
            else:
                self._records.inc()
                yield ImageRecord(entry.key, entry.source, entry.data)
        progress.add(progress.FILES_READ)  # the live total is known once every file is read


class ReadImages(beam.PTransform):
    """Read every input image: `p | ReadImages(patterns)` -> `ReadResult(records, failures)`.

    patterns: globs or folders (local or gs://, already split on commas by the caller; a str is
      one). Local ones may be relative or start with `~`; a folder means its files, recursively,
      whose extension `input_format` reads (see `expand_input`).
    input_format: "auto" (by extension, per file), "tfrecord", "webdataset" or "images".
    key_feature: the tf.train.Example bytes feature holding the encoded image.
    validate: check at construction that every pattern matches at least one file (a typo must not
      give an empty, successful run); the runtime match checks again.
    Returns `ReadResult(records: PCollection[ImageRecord], failures: PCollection[Failure])`; it
    unpacks as `records, failures = p | ReadImages(...)`.
    Counters (namespace "read"): read_images, read_failures, read_files, read_ignored_members,
      read_skipped_files (folder files with an extension no reader accepts).
    """

    def __init__(
        self,
        patterns,
        input_format: str = "auto",
        key_feature: str = "image/encoded",
        validate: bool = True,
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
        if validate:
            check_patterns(self._patterns)

    def _needs_key_pass(self) -> bool:
        if self._format == "images":
            return False
        if self._format == "auto":
            return not all(detect_format(p) == "images" for p in self._patterns)
        return True

    def expand(self, pbegin):
        uris = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "Match" >> beam.ParDo(_MatchFiles(self._format))
            | "DistinctFiles" >> beam.Distinct()
            | "SpreadFiles" >> beam.Reshuffle()
        )
        losers = None
        if self._needs_key_pass():
            losers = beam.pvalue.AsDict(
                uris
                | "ExtractKeys" >> beam.ParDo(_ExtractKeys(self._format, self._key_feature))
                | "GroupKeys" >> beam.GroupByKey()
                | "FindDuplicates" >> beam.FlatMap(_losers)
            )
        read = _ReadShard(self._format, self._key_feature)
        outputs = uris | "ReadShards" >> (
            beam.ParDo(read, losers) if losers is not None else beam.ParDo(read)
        ).with_outputs(FAILURES, main="records")
        return ReadResult(outputs.records, outputs[FAILURES])


def check_patterns(patterns: list[str]) -> None:
    """Raise ValueError naming every pattern that matches no file (or cannot be listed).

    Cheap (one listed file per pattern); a folder with files but none the format reads fails at
    run time, in the match."""
    problems = []
    try:
        listed = [normalize_pattern(p) for p in patterns]
        listed = [p.rstrip("/") + "/**" if is_folder(p) else p for p in listed]
        results = FileSystems.match(listed, limits=[1] * len(listed))
    except Exception as exc:  # noqa: BLE001 - BeamIOError lists the failing patterns
        raise ValueError(f"cannot list input files: {error_text(exc)}") from None
    for pattern, result in zip(patterns, results):
        if not result.metadata_list:
            problems.append(pattern)
    if problems:
        raise ValueError("input pattern(s) matched no files: " + ", ".join(problems))
