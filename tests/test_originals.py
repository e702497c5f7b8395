"""`search.originals`: an indexed image's bytes read at its recorded offset and checked, or found
by a scan (no offsets: old outputs, compressed shards; links; rewritten shards); local and gs://."""

import gzip
import logging
import os

import pytest

from search.originals import Location, OriginalError, Originals
from tests import corpus
from transforms.read import iter_entries

IMAGES = [corpus.make_jpeg(40 + 8 * i, 32, seed=i) for i in range(4)]


def locations(path, fmt):
    """What the job records for each item of a file: Location(key, source, offset, length)."""
    return {
        e.key: Location(e.key, e.source, e.offset, e.length)
        for e in iter_entries(str(path), fmt)
        if e.error is None
    }


@pytest.fixture
def shards(tmp_path):
    corpus.write_tfrecord(
        str(tmp_path / "a.tfrecord"), [(f"r{i}", im) for i, im in enumerate(IMAGES)]
    )
    corpus.write_tar(
        str(tmp_path / "a.tar"),
        [(f"s{i}.jpg", im) for i, im in enumerate(IMAGES)] + [("ln.jpg", ("symbolic", "s1.jpg"))],
    )
    (tmp_path / "p.jpg").write_bytes(IMAGES[0])
    return tmp_path


def test_records_members_links_and_files_are_read_at_their_offsets(shards):
    originals = Originals()
    records = locations(shards / "a.tfrecord", "tfrecord")
    members = locations(shards / "a.tar", "webdataset")
    assert [originals.read(records[f"r{i}"]) for i in range(4)] == IMAGES
    assert [originals.read(members[f"s{i}"]) for i in range(4)] == IMAGES
    assert originals.read(members["ln"]) == IMAGES[1]
    [photo] = locations(shards / "p.jpg", "images").values()
    assert originals.read(photo) == IMAGES[0]


def test_without_offsets_the_shard_is_scanned_with_one_warning(shards, caplog):
    originals = Originals()
    old = [
        at._replace(offset=None, length=None, run="/old/output")
        for fmt, name in (("tfrecord", "a.tfrecord"), ("webdataset", "a.tar"))
        for at in locations(shards / name, fmt).values()
    ]
    with caplog.at_level(logging.WARNING):
        got = [originals.read(at) for at in old]
    assert got == IMAGES + IMAGES + [IMAGES[1]]
    assert [r.getMessage() for r in caplog.records if "/old/output" in r.getMessage()] != []
    assert len(caplog.records) == 1


@pytest.mark.parametrize("name, fmt", [("a.tfrecord", "tfrecord"), ("a.tar", "webdataset")])
def test_compressed_shards_have_no_offsets_and_are_scanned_quietly(shards, name, fmt, caplog):
    data = (shards / name).read_bytes()
    packed = shards / (name.replace(".tar", ".tgz") if fmt == "webdataset" else name + ".gz")
    packed.write_bytes(gzip.compress(data))
    found = locations(packed, fmt)
    assert {(at.offset, at.length) for at in found.values()} == {(None, None)}
    with caplog.at_level(logging.WARNING):
        assert sorted(Originals().read(at) for at in found.values()) == sorted(
            IMAGES + ([IMAGES[1]] if fmt == "webdataset" else [])
        )
    assert caplog.records == []


def test_a_record_that_now_holds_another_key_is_refused(shards):
    records = locations(shards / "a.tfrecord", "tfrecord")
    corpus.write_tfrecord(str(shards / "a.tfrecord"), [("r9", IMAGES[3]), ("r0", IMAGES[0])])
    with pytest.raises(OriginalError, match="now holds the image of key 'r9', not 'r0'"):
        Originals().read(records["r0"])


def test_a_rewritten_tar_is_read_by_member_name(shards, caplog):
    members = locations(shards / "a.tar", "webdataset")
    corpus.write_tar(str(shards / "a.tar"), [("s3.jpg", IMAGES[3]), ("s0.jpg", IMAGES[0])])
    originals = Originals()
    with caplog.at_level(logging.WARNING):
        assert originals.read(members["s0"]) == IMAGES[0]
    assert "no longer match" in caplog.text
    with pytest.raises(OriginalError, match="has no member s1.jpg any more"):
        originals.read(members["s1"])


def test_a_file_that_changed_is_served_with_a_warning_and_a_fifo_is_refused(shards, caplog):
    [photo] = locations(shards / "p.jpg", "images").values()
    (shards / "p.jpg").write_bytes(IMAGES[2])
    with caplog.at_level(logging.WARNING):
        assert Originals().read(photo) == IMAGES[2]
    assert "changed since" in caplog.text
    os.remove(shards / "p.jpg")
    os.mkfifo(shards / "p.jpg")
    with corpus.fifo_unblocked_after(str(shards / "p.jpg"), 5), pytest.raises(OriginalError):
        Originals().read(photo)
    with pytest.raises(OriginalError, match="not there any more"):
        Originals().read(photo._replace(source=str(shards / "gone.jpg")))


def test_originals_over_the_size_limit_are_not_read(shards):
    records = locations(shards / "a.tfrecord", "tfrecord")
    with pytest.raises(OriginalError, match="over 100"):
        Originals(max_bytes=100).read(records["r0"])


def test_gcs_shards_are_read_by_range(shards, gcs_emulator):
    bucket = gcs_emulator.new_bucket()
    for name in ("a.tfrecord", "a.tar", "p.jpg"):
        gcs_emulator.upload(f"gs://{bucket}/{name}", (shards / name).read_bytes())
    originals = Originals()
    for name, fmt in (("a.tfrecord", "tfrecord"), ("a.tar", "webdataset")):
        local = locations(shards / name, fmt)
        for key, at in local.items():
            remote = at._replace(source=at.source.replace(str(shards), f"gs://{bucket}"))
            assert originals.read(remote) == originals.read(at), key
    photo = Location(f"gs://{bucket}/p.jpg", f"gs://{bucket}/p.jpg", 0, len(IMAGES[0]))
    assert originals.read(photo) == IMAGES[0]
