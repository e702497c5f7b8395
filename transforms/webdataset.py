"""WebDataset tar shards, streamed (never extracted): samples, link members, damage.

`iter_tar(name, f, reopen, with_data, max_bytes)` yields every item of one shard, in order, as
`transforms.entries.Entry` (docs/bad-input.md has the table of what each kind of damage gives):

- Samples: members are grouped by KEY (the path up to the first dot of the basename, as webdataset
  splits it); consecutive members with one KEY form a sample, whose image is its first
  KEY.<image ext> member. A sample without one is a failure "no image member; members: ...".
  Members without a KEY (no dot in the basename, dotfiles, `__meta__` files) and members that are
  neither files nor links (folders, devices) are skipped and counted (`read_ignored_members`).
- Links: an image member that is a hard link or a symbolic link gets the bytes of the file member
  it names in the same shard (a hard link names an earlier member; a symbolic link is relative to
  its own folder and may point forward; chains are followed up to 8 links). The bytes are read at
  the end of the shard by a second, forward-only pass over it. A link that points outside the
  shard (an absolute target, or `..` above its root), at no member, at a folder, or in a loop is a
  failure `TarLinkError`; it never reads anything but the shard.
- Size: an image member (or link target) over `max_bytes` is a failure `InputTooLargeError`; its
  bytes are skipped, never held. Extended headers (PAX, GNU long names) over 1 MiB are damage:
  tarfile would read them whole into memory.
- Damage: every sample whose image member was read whole before the damage is kept, then ONE
  failure `CorruptShardError` keyed `<shard>:<index of the first lost sample>` names the shard, the
  byte offset (of the uncompressed stream) and what is wrong: a bad header checksum or field, an
  impossible (negative) size, a header or member cut off, end of file before the end-of-archive
  marker, or data after it (a second tar appended, garbage). tarfile alone ends quietly at most of
  these, or drops the sample before them.

Offsets: each sample's Entry has the `offset` and `length` of its image member's data (of the link
target's, for a link) in the shard, when the shard is a plain tar: in a compressed one (`.tgz`,
`.tar.gz`) they would be offsets into the decompressed stream, which cannot be seeked to, so they
are None there.

Memory: one sample's image bytes, one header, and the shard's member names with their offsets and
sizes (to resolve links).
"""

from __future__ import annotations

import posixpath
import re
import tarfile
import zlib
from typing import Callable, Iterator, NamedTuple, Optional

from core.names import key_text
from transforms import counters
from transforms.entries import (
    DEFAULT_MAX_INPUT_BYTES,
    IMAGE_EXTS,
    CorruptShardError,
    Entry,
    MissingImageError,
    discard,
    fatal,
    one_line,
    read_exact,
    seekable,
    too_large,
)
from transforms.records import error_text

# webdataset's own split: KEY is the dirname plus the basename up to its first dot.
_WDS_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_EXTENDED_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
MAX_EXTENDED_HEADER = 1 << 20
_MAX_LINK_HOPS = 8
# What reading a shard can raise when it is damaged (tarfile, the decompressors, the file system).
_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class TarLinkError(ValueError):
    """A link member cannot be resolved to a file member of the same shard."""


class _HeaderTooLarge(tarfile.HeaderError):
    pass


class _TarInfo(tarfile.TarInfo):
    """tarfile's header, which remembers why a header ended the archive (tarfile's `next()` turns a
    bad header into a quiet end) and refuses extended headers it would read whole into memory."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.header_error = exc
            raise

    def _proc_member(self, tar):
        if self.type in _EXTENDED_TYPES and not 0 <= self.size <= MAX_EXTENDED_HEADER:
            raise _HeaderTooLarge(
                f"extended header of {self.size} bytes (over {MAX_EXTENDED_HEADER})"
            )
        return super()._proc_member(tar)


def split_member(name: str) -> tuple[Optional[str], str]:
    """(KEY, ext) of a tar member as webdataset splits it; KEY None when the name has none."""
    match = _WDS_MEMBER.match(name)
    if not match:
        return None, ""
    return match.group(1), match.group(2).lower()


def is_image_ext(ext: str) -> bool:
    return "." + ext in IMAGE_EXTS


class _Member(NamedTuple):
    """A file or link member, for resolving links: where its data is, or what it links to."""

    position: int  # order in the shard
    offset_data: int
    size: int
    link: Optional[tuple[str, str]] = None  # ("hard" | "symbolic", link name as stored)


class _Sample:
    """Members of one WebDataset sample seen so far (image bytes only for the image member)."""

    def __init__(self, key: str, index: int):
        self.key, self.index = key, index
        self.members: list[str] = []
        self.exts: set[str] = set()
        self.image_member: Optional[str] = None
        self.image: Optional[bytes] = None
        self.link: Optional[tuple[str, int]] = None  # (member name, position) of an image link
        self.error: Optional[str] = None
        self.span: tuple[Optional[int], Optional[int]] = (None, None)  # image data (offset, size)

    def add(self, name: str, ext: str) -> bool:
        """Adds a member; True when it is the sample's image member."""
        self.members.append(name)
        self.exts.add(ext)
        if self.image_member is None and is_image_ext(ext):
            self.image_member = name
            return True
        return False

    def entry(self, shard: str, with_data: bool, spans: bool = False) -> Entry:
        key = key_text(self.key)
        if self.image_member is None:
            names = ", ".join(key_text(posixpath.basename(m)) for m in self.members)
            error = error_text(MissingImageError(f"no image member; members: {names}"))
            return Entry(key, self.index, f"{shard}:{key_text(self.members[0])}", error=error)
        source = f"{shard}:{key_text(self.image_member)}"
        if self.error is not None:
            return Entry(key, self.index, source, error=self.error)
        offset, length = self.span if spans else (None, None)
        data = self.image if with_data else None
        return Entry(key, self.index, source, data, offset=offset, length=length)


def iter_tar(
    shard: str,
    f,
    reopen: Callable[[], object],
    with_data: bool = True,
    max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    spans: bool = True,
) -> Iterator[Entry]:
    """Every item of the tar shard read from `f`; `shard` is its name in keys and messages, and
    `reopen()` opens it again (from the start, same decompression) to read link targets. `spans`:
    False when `f` is decompressed by the caller (no offsets then, see above)."""
    reader = _Reader(shard, f, with_data, max_bytes, spans)
    yield from reader.samples()
    yield from reader.linked(reopen)
    if reader.damage is not None:
        offset, what = reader.damage
        yield fatal(
            shard,
            reader.index,
            CorruptShardError(f"corrupt or truncated tar at byte {offset} of {shard}: {what}"),
        )


class _Reader:
    """One pass over a shard: `samples()`, then `linked()`, then `damage` (offset, what) or None."""

    def __init__(self, shard: str, f, with_data: bool, max_bytes: int, spans: bool = True):
        self.shard, self.f, self.with_data, self.max_bytes = shard, f, with_data, max_bytes
        self.spans = spans
        self.index = 0  # the index of the sample being read (= samples yielded so far)
        self.damage: Optional[tuple[int, str]] = None
        # (name, position, offset, size, link) of every file (read whole) and link member, as
        # read; indexed by normalised name only when a link is resolved (`_by_name`).
        self.seen: list[tuple] = []
        self._index: Optional[dict[str, list[_Member]]] = None
        self.pending: list[_Sample] = []  # samples whose image member is a link
        self.comptype = "tar"
        # Counted in the read pass only (the key pass reads the same members).
        self._ignored = counters.READ_IGNORED_MEMBERS.metric() if with_data else None

    def samples(self) -> Iterator[Entry]:
        try:
            tar = tarfile.open(
                fileobj=self.f,
                mode="r|*",
                tarinfo=_TarInfo,
                encoding="utf-8",
                errors="surrogateescape",
            )
        except _SHARD_ERRORS as exc:
            self.damage = (0, f"not a readable tar ({one_line(str(exc)) or type(exc).__name__})")
            return
        self.comptype = tar.fileobj.comptype
        sample: Optional[_Sample] = None
        position = 0
        while True:
            offset = tar.offset
            try:
                member = tar.next()
            except _SHARD_ERRORS as exc:
                self.damage = (offset, _next_error(exc))
                break
            if member is None:
                self.damage = _end_of_archive(tar, offset)
                break
            tar.header_error = None
            tar.members = []  # tarfile keeps every header of a stream; one at a time is enough
            position += 1
            if member.size < 0:
                self.damage = (member.offset, f"impossible member size {member.size}")
                break
            link = _link_of(member)
            if not member.isfile() and link is None:  # folders, devices, FIFOs
                self._ignore()
                continue
            if link is not None:  # a file member is recorded once its data was read whole
                self._record(member, position, link)
            key, ext = split_member(member.name)
            if key is None:
                self._ignore()
                if link is None and not self._skip(tar, member, position):
                    break
                continue
            if sample is not None and (sample.key != key or ext in sample.exts):
                yield from self._complete(sample)
                sample = None
            if sample is None:
                sample = _Sample(key, self.index)
            is_image = sample.add(member.name, ext)
            if link is not None:
                if is_image:
                    sample.link = (member.name, position)
                continue
            if not is_image:
                if not self._skip(tar, member, position):
                    break
                continue
            if member.size > self.max_bytes:
                sample.error = error_text(
                    too_large(f"image member {key_text(member.name)}", member.size, self.max_bytes)
                )
                if not self._skip(tar, member, position):
                    sample = None  # cut off: the damage covers it
                    break
                continue
            try:
                data = _read_member(tar, member, keep=self.with_data)
            except _SHARD_ERRORS as exc:
                self.damage = (member.offset, _data_error(exc))
                sample = None  # its image is incomplete: the damage covers it
                break
            self._record(member, position)
            sample.image, sample.span = data, (member.offset_data, member.size)
        # At damage, a sample is kept only when its image member was read whole: one without an
        # image member yet may have lost it to the damage.
        if sample is not None and (self.damage is None or sample.image_member is not None):
            yield from self._complete(sample)

    def _ignore(self) -> None:
        if self._ignored is not None:
            self._ignored.inc()

    def _complete(self, sample: _Sample) -> Iterator[Entry]:
        self.index += 1
        if sample.link is not None and sample.error is None:
            self.pending.append(sample)
        else:
            yield sample.entry(self.shard, self.with_data, self._spans())

    def _spans(self) -> bool:
        """Whether offsets in this shard can be seeked to (a plain, uncompressed tar)."""
        return self.spans and self.comptype == "tar"

    def _skip(self, tar, member, position: int) -> bool:
        """Reads past a member's data; False (and `damage` set) when the shard ends inside it."""
        try:
            _read_member(tar, member, keep=False)
        except _SHARD_ERRORS as exc:
            self.damage = (member.offset, _data_error(exc))
            return False
        self._record(member, position)
        return True

    def _record(self, member, position: int, link=None) -> None:
        """A file member read whole, or a link member: what links may resolve to."""
        self.seen.append((member.name, position, member.offset_data, member.size, link))

    def linked(self, reopen: Callable[[], object]) -> Iterator[Entry]:
        """The samples whose image member is a link, resolved (bytes read in one forward pass)."""
        if not self.pending:
            return
        targets = {}
        for sample in self.pending:
            try:
                target = self._resolve(*sample.link)
                if target.size > self.max_bytes:
                    raise too_large(
                        f"link target of {key_text(sample.link[0])}", target.size, self.max_bytes
                    )
                targets[id(sample)] = target
                sample.span = (target.offset_data, target.size)
            except (TarLinkError, ValueError) as exc:
                sample.error = error_text(exc)
        if self.with_data and targets:
            self._read_targets(reopen, targets)
        for sample in self.pending:
            yield sample.entry(self.shard, self.with_data, self._spans())

    def _resolve(self, name: str, position: int) -> _Member:
        """The file member a link member resolves to, following links."""
        seen = set()
        for _ in range(_MAX_LINK_HOPS + 1):
            if (name, position) in seen:
                break
            seen.add((name, position))
            current = self._latest(name, position)
            if current.link is None:
                return current
            kind, target = current.link
            shown = f"{kind} link {key_text(name)} -> {key_text(target)}"
            if target.startswith("/"):
                raise TarLinkError(f"{shown} points outside the shard (an absolute path)")
            if kind == "symbolic":
                target = posixpath.join(posixpath.dirname(_normalise(name)), target)
            target = _normalise(target)
            if target == ".." or target.startswith("../"):
                raise TarLinkError(f"{shown} points outside the shard")
            candidates = self._by_name().get(target, [])
            if kind == "hard":
                candidates = [m for m in candidates if m.position < current.position]
            if not candidates:
                where = "an earlier file" if kind == "hard" else "a file"
                raise TarLinkError(f"{shown}: the target is not {where} of this shard")
            name, position = target, candidates[-1].position
        raise TarLinkError(f"link {key_text(name)}: a loop, or more than {_MAX_LINK_HOPS} links")

    def _latest(self, name: str, position: int) -> _Member:
        for member in self._by_name().get(_normalise(name), []):
            if member.position == position:
                return member
        raise TarLinkError(f"link target {key_text(name)} is not a file of this shard")

    def _by_name(self) -> dict[str, list[_Member]]:
        """Normalised member name -> the members of that name, in shard order."""
        if self._index is None:
            self._index = {}
            for name, *fields in self.seen:
                self._index.setdefault(_normalise(name), []).append(_Member(*fields))
        return self._index

    def _read_targets(self, reopen, targets: dict) -> None:
        by_id = {id(s): s for s in self.pending}
        try:
            with reopen() as raw:
                seek = self.comptype == "tar" and seekable(raw)
                # tarfile's own decompressor when it detected the compression (e.g. `.tgz`, which
                # the file system does not decompress); forward-only, as the targets are sorted.
                stream = raw if seek else tarfile.open(fileobj=raw, mode="r|*").fileobj
                for sample_id, target in sorted(targets.items(), key=lambda t: t[1].offset_data):
                    if seek:
                        raw.seek(target.offset_data)
                    else:
                        discard(stream, target.offset_data - stream.tell())
                    data = read_exact(stream, target.size)
                    if len(data) < target.size:
                        raise OSError("the shard is shorter than when it was listed")
                    by_id[sample_id].image = data
        except _SHARD_ERRORS as exc:
            for sample_id in targets:
                if by_id[sample_id].image is None:
                    by_id[sample_id].error = error_text(
                        OSError(f"cannot read the link target: {one_line(error_text(exc))}")
                    )


def _link_of(member: tarfile.TarInfo) -> Optional[tuple[str, str]]:
    if member.islnk():
        return ("hard", member.linkname)
    if member.issym():
        return ("symbolic", member.linkname)
    return None


def _normalise(name: str) -> str:
    """A member path as links name it: `./a//b` and `a/b` are one member."""
    name = posixpath.normpath(name)
    return name[2:] if name.startswith("./") else name


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, keep: bool) -> Optional[bytes]:
    """Read a member's bytes (kept or thrown away): a streamed tar must be read to move on anyway,
    and reading every byte is what detects a cut-off member."""
    fobj = tar.extractfile(member)
    if keep:
        return fobj.read()
    discard(fobj, member.size)
    return None


def _next_error(exc: BaseException) -> str:
    """What a header that tarfile raises for (rather than ending quietly) has wrong."""
    if isinstance(exc, tarfile.ReadError) and str(exc) == "unexpected end of data":
        return "end of file inside the padding of the member before"
    return f"damaged header ({one_line(str(exc)) or type(exc).__name__})"


def _data_error(exc: BaseException) -> str:
    if isinstance(exc, tarfile.ReadError) and str(exc) == "unexpected end of data":
        return "end of file inside the member's data"
    return f"damaged member data ({one_line(str(exc)) or type(exc).__name__})"


def _end_of_archive(tar: tarfile.TarFile, offset: int) -> Optional[tuple[int, str]]:
    """None for a proper end (an end-of-archive block, then only zeros); else what is wrong."""
    error = getattr(tar, "header_error", None)
    if isinstance(error, tarfile.EOFHeaderError):  # a zero block: the end-of-archive marker
        try:
            trailing = _first_non_zero(tar.fileobj)
        except _SHARD_ERRORS as exc:
            return tar.fileobj.tell(), _data_error(exc)
        if trailing is None:
            return None
        return trailing, "data after the end-of-archive marker (garbage, or a second archive)"
    if isinstance(error, tarfile.EmptyHeaderError):
        return offset, "end of file before the end-of-archive marker"
    if isinstance(error, tarfile.TruncatedHeaderError):
        return offset, "end of file inside a member header"
    if isinstance(error, tarfile.InvalidHeaderError):
        return offset, f"damaged header ({error})"
    return offset, "the archive ends unexpectedly"


def _first_non_zero(stream) -> Optional[int]:
    """Offset of the first non-zero byte from the stream's position to its end, or None."""
    position = stream.tell()
    while True:
        chunk = stream.read(1 << 16)
        if not chunk:
            return None
        stripped = chunk.lstrip(b"\0")
        if stripped:
            return position + len(chunk) - len(stripped)
        position += len(chunk)
