"""WebDataset tar shards (transforms/webdataset.py): every kind of damage keeps what came before it,
link members are resolved or fail, names that are not UTF-8, sizes over the limit."""

import gzip
import io
import os
import tarfile

import pytest

from tests import corpus
from transforms.read import iter_entries
from transforms.webdataset import MAX_EXTENDED_HEADER

SAMPLES = 3  # each KEY.jpg + KEY.json: members 2k (image) and 2k+1 (sidecar)
IMAGES = [corpus.make_jpeg(40 + 8 * k, 24, seed=k) for k in range(SAMPLES)]


def _write_shard(path):
    corpus.write_webdataset(
        str(path), [(f"s{k}", {"jpg": IMAGES[k], "json": b'{"k": %d}' % k}) for k in range(SAMPLES)]
    )
    return corpus.tar_layout(str(path))


def _read(path, with_data=True, **kwargs):
    return list(iter_entries(str(path), "webdataset", with_data=with_data, **kwargs))


def _outcome(entries):
    return [(e.key, e.error is None, e.fatal) for e in entries]


# Damage to member m, and what it gives: (kind, where it happens, phrase). `where` is "header"
# (the failure names the member's header offset, and the samples whose image member comes before
# m are kept) or "padding" (the member's data was read whole: its own sample is kept too, and the
# failure names the end of its padding).
def _damage_cases():
    cases = []
    for m in range(2 * SAMPLES):
        cases += [
            (m, "header checksum", "header", "bad checksum"),
            (m, "size not a number", "header", "invalid header"),
            (m, "negative size", "header", "impossible member size"),
            (m, "size past the end", "header", "end of file inside the member's data"),
            (m, "cut at its header", "header", "end of file before the end-of-archive marker"),
            (m, "cut inside its header", "header", "end of file inside a member header"),
            (m, "cut at its data", "header", "end of file inside the member's data"),
            (m, "cut inside its data", "header", "end of file inside the member's data"),
            (m, "cut at its padding", "padding", "end of file inside the padding"),
            (m, "cut inside its padding", "padding", "end of file inside the padding"),
        ]
    return cases


def _damage(path, member, kind):
    name = str(path)
    if kind == "header checksum":
        corpus.patch_file(name, member.header + 3, b"\x7f")  # inside the name: checksum mismatch
    elif kind == "size not a number":
        corpus.set_tar_header_field(name, member.header, 124, b"zz" * 6)
    elif kind == "negative size":
        corpus.set_tar_header_field(name, member.header, 124, b"\xff" * 12)  # base-256 -1
    elif kind == "size past the end":
        corpus.set_tar_header_field(name, member.header, 124, b"07777777777\0")
    elif kind.startswith("cut"):
        at = {
            "cut at its header": member.header,
            "cut inside its header": member.header + 100,
            "cut at its data": member.data,
            "cut inside its data": member.data + member.size // 2,
            "cut at its padding": member.data + member.size,
            "cut inside its padding": member.data + member.size + 3,
        }[kind]
        corpus.truncate_file(name, at)


@pytest.mark.parametrize(
    "m, kind, where, phrase", _damage_cases(), ids=lambda v: str(v).replace(" ", "-")
)
def test_damage_keeps_every_sample_before_it_and_says_where(tmp_path, m, kind, where, phrase):
    path = tmp_path / "shard.tar"
    members, _ = _write_shard(path)
    _damage(path, members[m], kind)
    entries = _read(path)
    kept = [k for k in range(SAMPLES) if 2 * k < m or (where == "padding" and 2 * k <= m)]
    offset = members[m].header if where == "header" else members[m].end
    assert _outcome(entries[:-1]) == [(f"s{k}", True, False) for k in kept]
    assert [e.data for e in entries[:-1]] == [IMAGES[k] for k in kept]
    last = entries[-1]
    assert last.fatal and last.key == f"{path}:{len(kept)}"
    assert last.error.startswith("CorruptShardError: corrupt or truncated tar at byte ")
    assert f"at byte {offset} of {path}" in last.error, last.error
    if offset > 0:  # at byte 0, tarfile's own words for "this is no tar"
        assert phrase in last.error, last.error
    light = _read(path, with_data=False)  # the key pass sees the same items
    assert [(e.key, e.index, e.source, e.error) for e in light] == [
        (e.key, e.index, e.source, e.error) for e in entries
    ]


def test_a_damaged_header_after_a_long_name_keeps_the_sample_before(tmp_path):
    """tarfile raises (rather than ending quietly) when the header after a GNU long name or a PAX
    header is damaged: the complete sample before it was lost."""
    for fmt, name in ((tarfile.GNU_FORMAT, "d" * 120 + "/s1.jpg"), (tarfile.PAX_FORMAT, "ß1.jpg")):
        path = str(tmp_path / f"long-{fmt}.tar")
        corpus.write_tar(path, [("s0.jpg", IMAGES[0]), (name, IMAGES[1])], format=fmt)
        members, _ = corpus.tar_layout(path)
        real_header = members[1].data - 512  # the extended header comes first
        assert real_header > members[1].header
        corpus.patch_file(path, real_header + 3, b"\x7f")
        entries = _read(path)
        assert _outcome(entries) == [("s0", True, False), (f"{path}:1", False, True)], fmt
        assert f"at byte {members[1].header} of {path}" in entries[-1].error


@pytest.mark.parametrize(
    "cut, phrase",
    [
        (0, "end of file before the end-of-archive marker"),
        (100, "end of file inside a member header"),
        (512, None),  # one whole zero block is a proper end (GNU tar accepts it too)
        (612, None),
    ],
)
def test_cut_in_the_end_of_archive_marker(tmp_path, cut, phrase):
    path = tmp_path / "shard.tar"
    _, end = _write_shard(path)
    corpus.truncate_file(str(path), end + cut)
    entries = _read(path)
    assert [e.key for e in entries[:SAMPLES]] == [f"s{k}" for k in range(SAMPLES)]
    if phrase is None:
        assert len(entries) == SAMPLES and all(e.error is None for e in entries)
    else:
        [last] = entries[SAMPLES:]
        assert last.fatal and phrase in last.error and f"at byte {end} of" in last.error


@pytest.mark.parametrize("where", ["in the record padding", "after the padding"])
def test_trailing_garbage_is_reported_after_every_sample(tmp_path, where):
    path = tmp_path / "shard.tar"
    _, end = _write_shard(path)
    if where == "in the record padding":
        at = end + 1024
        corpus.patch_file(str(path), at, b"GARBAGE")
    else:
        at = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(b"\0" * 10 + b"GARBAGE" * 100)
        at += 10
    entries = _read(path)
    assert _outcome(entries) == [(f"s{k}", True, False) for k in range(SAMPLES)] + [
        (f"{path}:{SAMPLES}", False, True)
    ]
    assert f"at byte {at} of" in entries[-1].error
    assert "data after the end-of-archive marker" in entries[-1].error


def test_a_second_archive_appended_is_not_silently_dropped(tmp_path):
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    _write_shard(first)
    corpus.write_webdataset(str(second), [("t0", IMAGES[0])])
    with open(first, "ab") as f:
        f.write(second.read_bytes())
    entries = _read(first)
    assert [e.key for e in entries[:-1]] == [f"s{k}" for k in range(SAMPLES)]
    assert "data after the end-of-archive marker" in entries[-1].error


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_compressed_shard_cut_keeps_a_prefix_and_reports(tmp_path, suffix):
    tar = tmp_path / "shard.tar"
    _write_shard(tar)
    packed = gzip.compress(tar.read_bytes(), mtime=0)
    keys = [f"s{k}" for k in range(SAMPLES)]
    whole = tmp_path / f"whole{suffix}"
    whole.write_bytes(packed)
    assert _outcome(_read(whole)) == [(k, True, False) for k in keys]
    for cut in (len(packed) // 3, len(packed) // 2, len(packed) - 30):
        path = tmp_path / f"cut{cut}{suffix}"
        path.write_bytes(packed[:cut])
        entries = _read(path)
        read = [e.key for e in entries if not e.fatal]
        assert read == keys[: len(read)] and all(e.error is None for e in entries[:-1])
        assert entries[-1].fatal and str(path) in entries[-1].error


def test_a_shard_that_is_no_tar_is_one_failure(tmp_path):
    for name, data in (("empty.tar", b""), ("text.tar", b"hello " * 200)):
        path = tmp_path / name
        path.write_bytes(data)
        [entry] = _read(path)
        assert entry.fatal and entry.key == f"{path}:0" and "at byte 0 of" in entry.error
        assert "\n" not in entry.error


# ------------------------------------------------------------------------------------ links


def test_link_members_get_the_bytes_of_their_target(tmp_path):
    path = str(tmp_path / "links.tar")
    a, b = IMAGES[0], IMAGES[1]
    corpus.write_tar(
        path,
        [
            ("k0.jpg", a),
            ("k0.json", b"{}"),
            ("k1.jpg", ("hard", "k0.jpg")),
            ("k2.jpg", ("symbolic", "k0.jpg")),
            ("d/k3.jpg", ("symbolic", "../k0.jpg")),  # relative to its own folder
            ("k4.jpg", ("symbolic", "k2.jpg")),  # a chain
            ("k5.jpg", ("symbolic", "./later/k9.jpg")),  # forward
            ("k6.json", ("symbolic", "k0.json")),  # no image member: a sidecar link is not read
            ("later/k9.jpg", b),
        ],
    )
    entries = _read(path)
    got = {e.key: (e.data, e.error, e.source) for e in entries}
    for key in ("k0", "k1", "k2", "d/k3", "k4"):
        assert got[key][:2] == (a, None), key
    assert got["k5"][:2] == (b, None) and got["later/k9"][:2] == (b, None)
    assert got["k1"][2] == f"{path}:k1.jpg"
    assert got["k6"][1].startswith("MissingImageError: no image member")
    assert sorted(e.index for e in entries) == list(range(len(entries)))
    light = _read(path, with_data=False)
    assert sorted((e.key, e.index, e.error) for e in light) == sorted(
        (e.key, e.index, e.error) for e in entries
    )


@pytest.mark.parametrize(
    "members, phrase",
    [
        ([("e.jpg", ("symbolic", "../../etc/passwd"))], "points outside the shard"),
        ([("e.jpg", ("symbolic", "/etc/passwd"))], "an absolute path"),
        ([("e.jpg", ("hard", "/etc/passwd"))], "an absolute path"),
        ([("e.jpg", ("hard", "../x.jpg"))], "points outside the shard"),
        ([("e.jpg", ("symbolic", "nothing.jpg"))], "the target is not a file of this shard"),
        ([("e.jpg", ("hard", "later.jpg")), ("later.jpg", b"x")], "not an earlier file"),
        ([("dir", None), ("e.jpg", ("symbolic", "dir"))], "the target is not a file"),
        ([("e.jpg", ("symbolic", "f.jpg")), ("f.jpg", ("symbolic", "e.jpg"))], "a loop"),
    ],
)
def test_links_that_cannot_be_resolved_are_failures(tmp_path, members, phrase):
    path = str(tmp_path / "bad-links.tar")
    corpus.write_tar(path, [("ok.jpg", IMAGES[0]), *members])
    entries = {e.key: e for e in _read(path)}
    assert entries["ok"].error is None
    assert entries["e"].error.startswith("TarLinkError: ") and phrase in entries["e"].error


def test_link_into_a_gzipped_shard_is_read_back(tmp_path):
    tar = tmp_path / "links.tar"
    corpus.write_tar(
        str(tar), [("k0.jpg", IMAGES[0]), ("k1.jpg", IMAGES[1]), ("k2.jpg", ("hard", "k1.jpg"))]
    )
    for suffix in (".tar.gz", ".tgz"):
        path = tmp_path / f"links{suffix}"
        path.write_bytes(gzip.compress(tar.read_bytes()))
        got = {e.key: e.data for e in _read(path)}
        assert got == {"k0": IMAGES[0], "k1": IMAGES[1], "k2": IMAGES[1]}, suffix


def test_link_target_over_the_size_limit_is_a_failure(tmp_path):
    path = str(tmp_path / "big-target.tar")
    corpus.write_tar(path, [("big.json", b"x" * 5000), ("k.jpg", ("hard", "big.json"))])
    [entry] = [e for e in _read(path, max_bytes=4000) if e.key == "k"]
    assert entry.error.startswith("InputTooLargeError: link target of k.jpg is 5000 bytes")


# ------------------------------------------------------------------------------------ names, sizes


def test_member_names_that_are_not_utf8_get_escaped_keys(tmp_path):
    path = str(tmp_path / "latin1.tar")
    name = os.fsdecode(b"caf\xe9/\xff50%.jpg")
    corpus.write_tar(path, [(name, IMAGES[0]), (os.fsdecode(b"only\xe9.json"), b"{}")])
    entries = _read(path)
    assert [(e.key, e.source, e.data) for e in entries[:1]] == [
        ("caf%E9/%FF50%25", f"{path}:caf%E9/%FF50%25.jpg", IMAGES[0])
    ]
    assert entries[1].error == "MissingImageError: no image member; members: only%E9.json"
    for e in entries:
        (e.key + e.source + (e.error or "")).encode("utf-8")


def test_image_member_over_the_size_limit_is_a_failure_and_the_next_is_read(tmp_path):
    path = str(tmp_path / "big.tar")
    big = corpus.make_jpeg(300, 300, seed=1)
    corpus.write_tar(path, [("big.jpg", big), ("big.json", b"{}"), ("small.jpg", IMAGES[0])])
    limit = len(big) - 1
    entries = _read(path, max_bytes=limit)
    assert _outcome(entries) == [("big", False, False), ("small", True, False)]
    assert entries[0].error == (
        f"InputTooLargeError: image member big.jpg is {len(big)} bytes, over the "
        f"--max_input_bytes limit of {limit}; raise the limit to read it"
    )
    assert entries[1].data == IMAGES[0]
    assert _outcome(_read(path, max_bytes=len(big))) == [
        ("big", True, False),
        ("small", True, False),
    ]


def test_an_extended_header_over_1_mib_is_damage_not_read(tmp_path):
    path = str(tmp_path / "pax.tar")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in (
            ("s0.jpg", IMAGES[0], {}),
            ("s1.jpg", IMAGES[1], {"comment": "x" * (MAX_EXTENDED_HEADER + 10)}),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), pax
            tar.addfile(info, io.BytesIO(data))
    members, _ = corpus.tar_layout(path)
    entries = _read(path)
    assert _outcome(entries) == [("s0", True, False), (f"{path}:1", False, True)]
    assert f"at byte {members[1].header} of" in entries[-1].error
    assert "extended header of" in entries[-1].error


def test_folders_and_keyless_members_are_ignored(tmp_path):
    path = str(tmp_path / "dirs.tar")
    corpus.write_tar(path, [("d", None), ("d/README", b"x"), ("d/k.jpg", IMAGES[0])])
    assert _outcome(_read(path)) == [("d/k", True, False)]


def test_a_link_to_a_member_cut_off_by_the_damage_is_a_failure(tmp_path):
    path = str(tmp_path / "cut-target.tar")
    corpus.write_tar(path, [("a.jpg", ("symbolic", "b.jpg")), ("b.jpg", IMAGES[1])])
    members, _ = corpus.tar_layout(path)
    corpus.truncate_file(path, members[1].data + 10)
    entries = _read(path)
    assert entries[0].key == "a" and "the target is not a file of this shard" in entries[0].error
    assert entries[-1].fatal and entries[-1].key == f"{path}:1"


# ------------------------------------------------------------------------------------ offsets


def _bytes_at(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_each_sample_records_where_its_image_bytes_are(tmp_path):
    """`offset`/`length` of an image member's data, for a link its target's: one seek reads the
    image back; PAX long names (extended headers before the member's own) included."""
    path = str(tmp_path / "spans.tar")
    long_name = "d" * 120 + "/k3.jpg"
    corpus.write_tar(
        path,
        [
            ("k0.jpg", IMAGES[0]),
            ("k0.json", b"{}"),
            ("k1.jpg", IMAGES[1]),
            ("k2.jpg", ("symbolic", "k1.jpg")),
            (long_name, IMAGES[2]),
        ],
        format=tarfile.PAX_FORMAT,
    )
    entries = {e.key: e for e in _read(path)}
    assert set(entries) == {"k0", "k1", "k2", long_name[:-4]}
    for entry in entries.values():
        assert entry.length == len(entry.data)
        assert _bytes_at(path, entry.offset, entry.length) == entry.data
    assert entries["k2"].offset == entries["k1"].offset


def test_a_compressed_shard_records_no_offsets(tmp_path):
    """Offsets into a decompressed stream cannot be seeked to: None, for .tgz and .tar.gz."""
    tar = tmp_path / "s.tar"
    _write_shard(tar)
    for suffix in (".tar.gz", ".tgz"):
        path = tmp_path / f"s{suffix}"
        path.write_bytes(gzip.compress(tar.read_bytes()))
        entries = _read(path)
        assert len(entries) == SAMPLES and all(e.data for e in entries), suffix
        assert {(e.offset, e.length) for e in entries} == {(None, None)}, suffix
