"""ReadImages: formats, keys, corrupt shards, dedupe, glob errors (ARCHITECTURE.md, "Inputs")."""

import gzip
import hashlib
import os
import struct

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from core.decode import decode_image
from tests import corpus
from transforms.decode import DecodeAndResize
from transforms.read import (
    ReadImages,
    _MatchFiles,
    detect_format,
    iter_entries,
    masked_crc32c,
    split_member,
)
from transforms.records import FAILURES, STAGE_READ


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return corpus.write_shard_corpus(str(tmp_path_factory.mktemp("shards")))


def _entries(path, fmt="auto", with_data=True, **kwargs):
    return list(iter_entries(path, detect_format(path, fmt), with_data=with_data, **kwargs))


# ------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("a/b.tfrecord", "tfrecord"),
        ("x.TFREC", "tfrecord"),
        ("x.tfrecords.gz", "tfrecord"),
        ("gs://b/train-00003-of-01024", "tfrecord"),
        ("s.tar", "webdataset"),
        ("s.tar.gz", "webdataset"),
        ("p.JPG", "images"),
        ("p.jpeg", "images"),
        ("p.tiff", "images"),
        ("p.webp", "images"),
        ("notes.txt", None),
        ("_SUCCESS", None),
    ],
)
def test_detect_format(name, fmt):
    assert detect_format(name) == fmt
    assert detect_format(name, "images") == "images"


def test_split_member_like_webdataset():
    assert split_member("dir/sub/000123.jpg") == ("dir/sub/000123", "jpg")
    assert split_member("k.seg.PNG") == ("k", "seg.png")
    assert split_member("README")[0] is None
    assert split_member("._k.jpg")[0] is None


def test_masked_crc_matches_tensorflow_framing(tmp_path):
    """Our framing reads TF-written files, and TF reads files written with the corpus writer."""
    import tensorflow as tf

    tf_path, our_path = str(tmp_path / "tf.tfrecord"), str(tmp_path / "ours.tfrecord")
    payloads = [corpus.make_example(corpus.make_jpeg(16, 8, seed=i), key=f"k{i}") for i in range(3)]
    with tf.io.TFRecordWriter(tf_path) as w:
        for payload in payloads:
            w.write(payload)
    assert [e.key for e in _entries(tf_path)] == ["k0", "k1", "k2"]
    corpus.write_tfrecord(our_path, payloads)
    assert [r.numpy() for r in tf.data.TFRecordDataset(our_path)] == payloads
    assert masked_crc32c(b"") == 0xA282EAD8


def test_records_and_files_record_where_their_bytes_are(tmp_path):
    """A TFRecord record's offset/length are its data (the serialized Example, framed by the
    length header and the data CRC); an image file's are 0 and its size; a TFRecord shard the
    file system decompresses (.gz) has none."""
    images = [corpus.make_jpeg(32 + 8 * i, 24, seed=i) for i in range(3)]
    path = str(tmp_path / "a.tfrecord")
    starts = corpus.write_tfrecord(path, [(f"k{i}", image) for i, image in enumerate(images)])
    entries = _entries(path)
    with open(path, "rb") as f:
        shard = f.read()
    for start, entry, image in zip(starts, entries, images):
        assert entry.offset == start + 12
        example = shard[entry.offset : entry.offset + entry.length]
        assert corpus.tfrecord_frame(example) == shard[start : entry.offset + entry.length + 4]
        assert image in example and entry.data == image
    photo = tmp_path / "p.jpg"
    photo.write_bytes(images[0])
    [entry] = _entries(str(photo))
    assert (entry.offset, entry.length) == (0, len(images[0]))
    gz = tmp_path / "a.tfrecord.gz"
    gz.write_bytes(gzip.compress(shard))
    assert [(e.key, e.offset, e.length) for e in _entries(str(gz))] == [
        (f"k{i}", None, None) for i in range(3)
    ]


def test_tfrecord_key_fallbacks(tmp_path):
    path = str(tmp_path / "keys.tfrecord")
    image = corpus.make_jpeg(8, 8)
    corpus.write_tfrecord(
        path,
        [
            corpus.make_example(image, key="from-key", **{"image/filename": "f.jpg"}),
            corpus.make_example(image, key="sid", key_name="image/source_id"),
            corpus.make_example(image, key="f2.jpg", key_name="image/filename"),
            corpus.make_example(image),
            corpus.make_example(None, key_feature="x", **{"image/raw": image}),
            b"\xff\xff not a protobuf",
        ],
    )
    entries = _entries(path)
    assert [e.key for e in entries[:5]] == ["from-key", "sid", "f2.jpg", f"{path}:3", f"{path}:4"]
    assert [e.source for e in entries] == [f"{path}:{i}" for i in range(6)]
    assert entries[0].data == image
    assert "no 'image/encoded' bytes feature (features: image/raw)" in entries[4].error
    assert entries[5].error.startswith("MissingImageError: record is not a tf.train.Example")
    custom = list(iter_entries(path, "tfrecord", key_feature="image/raw"))
    assert custom[4].data == image and custom[0].error is not None


RECORDS = 4
_TFRECORD_DAMAGE = [
    # (what happens to record i, the phrase of the failure)
    ("cut inside its length", "truncated record header (4 of 12 bytes)"),
    ("cut at its length CRC", "truncated record header (8 of 12 bytes)"),
    ("cut inside its length CRC", "truncated record header (10 of 12 bytes)"),
    ("cut at its data", "truncated record (0 of "),
    ("cut inside its data", "truncated record ("),
    ("cut at its data CRC", "truncated record (data CRC missing)"),
    ("cut inside its data CRC", "truncated record (data CRC missing)"),
    ("length damaged", "length CRC mismatch"),
    ("length CRC damaged", "length CRC mismatch"),
    ("data damaged", "data CRC mismatch"),
    ("data CRC damaged", "data CRC mismatch"),
    ("impossible length", "record length 1099511627776 is implausible"),
    ("length past the end", "truncated record ("),
]


def _damage_record(path, offsets, i, kind):
    start = offsets[i]
    end = offsets[i + 1] if i + 1 < len(offsets) else os.path.getsize(path)
    data_length = end - start - 16
    cuts = {
        "cut inside its length": start + 4,
        "cut at its length CRC": start + 8,
        "cut inside its length CRC": start + 10,
        "cut at its data": start + 12,
        "cut inside its data": start + 12 + data_length // 2,
        "cut at its data CRC": start + 12 + data_length,
        "cut inside its data CRC": start + 14 + data_length,
    }
    flips = {
        "length damaged": start,
        "length CRC damaged": start + 9,
        "data damaged": start + 12 + data_length // 2,
        "data CRC damaged": start + 13 + data_length,
    }
    if kind in cuts:
        corpus.truncate_file(path, cuts[kind])
    elif kind in flips:
        with open(path, "rb") as f:
            f.seek(flips[kind])
            byte = f.read(1)[0]
        corpus.patch_file(path, flips[kind], bytes([byte ^ 0x55]))
    else:  # a length with a valid CRC that cannot be right
        length = 1 << 40 if kind == "impossible length" else data_length + 10_000_000
        header = struct.pack("<Q", length)
        corpus.patch_file(path, start, header + struct.pack("<I", masked_crc32c(header)))


@pytest.mark.parametrize("i", range(RECORDS))
@pytest.mark.parametrize("kind, phrase", _TFRECORD_DAMAGE, ids=[k for k, _ in _TFRECORD_DAMAGE])
def test_tfrecord_damage_keeps_every_record_before_it(tmp_path, i, kind, phrase):
    path = str(tmp_path / "shard.tfrecord")
    images = [corpus.make_jpeg(16 + 4 * r, 8, seed=r) for r in range(RECORDS)]
    offsets = corpus.write_tfrecord(path, [(f"r{r}", images[r]) for r in range(RECORDS)])
    _damage_record(path, offsets, i, kind)
    entries = _entries(path)
    assert [(e.key, e.data, e.error) for e in entries[:-1]] == [
        (f"r{r}", images[r], None) for r in range(i)
    ]
    last = entries[-1]
    assert last.fatal and last.key == f"{path}:{i}"
    assert f"corrupt TFRecord at byte {offsets[i]} of {path}: {phrase}" in last.error


@pytest.mark.parametrize(
    "garbage, phrase",
    [
        (b"\x00" * 5, "truncated record header (5 of 12 bytes)"),
        (b"GARBAGE" * 9, "length CRC mismatch"),
    ],
)
def test_tfrecord_trailing_garbage_is_reported_after_every_record(tmp_path, garbage, phrase):
    path = str(tmp_path / "shard.tfrecord")
    corpus.write_tfrecord(path, [(f"r{r}", corpus.make_jpeg(8, 8, seed=r)) for r in range(3)])
    end = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(garbage)
    entries = _entries(path)
    assert [e.key for e in entries] == ["r0", "r1", "r2", f"{path}:3"]
    assert f"corrupt TFRecord at byte {end} of {path}: {phrase}" in entries[-1].error


def test_tfrecord_record_over_the_size_limit_is_a_failure_and_the_next_is_read(tmp_path):
    path = str(tmp_path / "big.tfrecord")
    big, small = corpus.make_jpeg(200, 200, seed=1), corpus.make_jpeg(8, 8, seed=2)
    offsets = corpus.write_tfrecord(path, [("big", big), ("small", small)])
    limit = len(big)  # the serialized Example is a little larger than its image
    entries = _entries(path, max_bytes=limit)
    assert [(e.key, e.data) for e in entries] == [(f"{path}:0", None), ("small", small)]
    assert entries[0].error.startswith("InputTooLargeError: the record is ")
    assert f"over the --max_input_bytes limit of {limit}" in entries[0].error
    assert not entries[0].fatal
    # the skipped record's CRC is still checked: damage there ends the shard
    corpus.patch_file(path, offsets[0] + 12 + 100, b"\x00\x01")
    entries = _entries(path, max_bytes=limit)
    assert len(entries) == 1 and "data CRC mismatch" in entries[0].error


def test_image_file_over_the_size_limit_is_a_failure(tmp_path):
    path = str(tmp_path / "big.jpg")
    data = corpus.make_jpeg(64, 64)
    open(path, "wb").write(data)
    [entry] = _entries(path, max_bytes=len(data) - 1)
    assert entry.key == path and entry.data is None
    assert entry.error.startswith(f"InputTooLargeError: the file is {len(data)} bytes")
    assert _entries(path, max_bytes=len(data))[0].data == data


def test_a_huge_file_is_measured_not_read(tmp_path):
    """A 300 MiB (sparse) file named .jpg is over the default 256 MiB limit: no byte is read."""
    import tracemalloc

    path = str(tmp_path / "huge.jpg")
    with open(path, "wb") as f:
        f.truncate(300 << 20)
    tracemalloc.start()
    try:
        [entry] = _entries(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert entry.error.startswith("InputTooLargeError: the file is 314572800 bytes")
    assert peak < 1 << 20


def test_a_fifo_met_at_read_time_is_a_failure_not_a_hang(tmp_path):
    """Listing leaves FIFOs out (test_input_forms.py); one that appears after it must not block."""
    path = str(tmp_path / "pipe.jpg")
    os.mkfifo(path)
    with corpus.fifo_unblocked_after(path, seconds=20):  # a reader that blocks fails, not hangs
        [entry] = _entries(path)
    assert entry.error == f"NotRegularFileError: {path} is not a regular file"


def test_key_pass_keeps_no_bytes_and_sees_same_items(shards):
    for path in shards.paths.values():
        full, light = _entries(path), _entries(path, with_data=False)
        assert [(e.key, e.index, e.source, e.error) for e in full] == [
            (e.key, e.index, e.source, e.error) for e in light
        ]
        assert all(e.data is None for e in light)


def test_truncated_tar_keeps_complete_samples(shards):
    path = shards.paths["truncated_tar"]
    entries = _entries(path)
    assert [e.key for e in entries[:-1]] == ["tt0", "tt1"]
    assert entries[-1].fatal and entries[-1].key == f"{path}:2"
    assert shards.failures[f"{path}:2"] in entries[-1].error


def test_tar_cut_at_member_boundary_is_reported(tmp_path):
    """tarfile silently stops at a missing end-of-archive marker: we must not."""
    path = str(tmp_path / "cut.tar")
    offsets = corpus.write_webdataset(
        path, [(f"s{i}", corpus.make_jpeg(8, 8, i)) for i in range(3)]
    )
    corpus.truncate_file(path, offsets[2])  # exactly before sample 2's header
    entries = _entries(path)
    assert [e.key for e in entries[:-1]] == ["s0", "s1"]
    assert entries[-1].fatal and f"byte {offsets[2]} of {path}" in entries[-1].error


def test_tar_duplicate_member_and_hidden_files(tmp_path):
    path = str(tmp_path / "dup.tar")
    a, b = corpus.make_jpeg(8, 8, 1), corpus.make_jpeg(8, 8, 2)
    corpus.write_webdataset(
        path, [("k", a), ("k", b), ("._k", {"jpg": b"x"}), ("m", {"jpg": a, "png": b})]
    )
    entries = _entries(path)
    assert [(e.key, e.index) for e in entries] == [("k", 0), ("k", 1), ("m", 2)]
    assert entries[2].data == a and entries[2].source.endswith(":m.jpg")


def test_unknown_extension_is_a_read_failure(tmp_path):
    path = str(tmp_path / "notes.txt")
    open(path, "w").write("hello")
    [entry] = _entries(path)
    assert entry.fatal and entry.key == path and "--input_format" in entry.error


def test_pattern_matching_nothing_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="matched no files.*nope"):
        ReadImages([str(tmp_path / "nope-*.tfrecord")])
    with pytest.raises(ValueError, match="matched no files"):
        list(_MatchFiles().process(str(tmp_path / "nope*")))
    with pytest.raises(ValueError, match="input_format"):
        ReadImages([str(tmp_path)], input_format="zip", validate=False)


# ------------------------------------------------------------------------------- pipelines


def test_corrupt_shards_and_dedupe_in_a_pipeline(shards):
    sp = shards.paths
    expected_failures = [(key, phrase) for key, phrase in shards.failures.items()] + [
        ("dup", f"DuplicateKey: key also read from {sp['dup_a']}:0"),  # dup_a:2, within the shard
        ("dup", f"DuplicateKey: key also read from {sp['dup_a']}:0"),  # dup_b:0, across shards
        ("cross", f"DuplicateKey: key also read from {sp['dup_a']}:1"),
    ]

    def check_failures(failures):
        assert all(f.stage == STAGE_READ for f in failures)
        remaining = list(failures)
        for key, phrase in expected_failures:
            match = [f for f in remaining if f.key == key and phrase in f.error]
            assert match, f"no failure {key}: {phrase} in {failures}"
            remaining.remove(match[0])
        assert not remaining, remaining

    p = BeamTestPipeline()
    records, failures = p | ReadImages([os.path.dirname(sp["bad_crc"]) + "/*"])
    assert_that(
        records | beam.Map(lambda r: (r.key, r.source)),
        equal_to(list(shards.records.items())),
        label="records",
    )
    assert_that(failures, check_failures, label="failures")
    result = p.run()
    result.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace("read"))["counters"]
    }
    assert counters["read_images"] == len(shards.records)
    assert counters["read_failures"] == len(expected_failures)
    assert counters["read_ignored_members"] == 1  # non_image.tar's README, once (not per pass)


def _stem(key):
    """Format-independent name of an image: 'tf/x', 'wds/x' and '/dir/x.jpg' all give 'x'."""
    return os.path.splitext(os.path.basename(key))[0]


def test_same_images_as_files_tfrecord_webdataset_give_same_pixels(tmp_path):
    """Every corpus image read as a file, a TFRecord and a WebDataset sample decodes identically."""
    files = corpus.write_image_corpus(str(tmp_path / "files"))
    cases = {name: open(path, "rb").read() for name, path in files.items()}
    file_names = {name: os.path.basename(files[name]) for name in cases}
    corpus.write_tfrecord(
        str(tmp_path / "all.tfrecord"), [(f"tf/{name}", data) for name, data in cases.items()]
    )
    corpus.write_webdataset(
        str(tmp_path / "all.tar"),
        [
            (f"wds/{name}", {os.path.splitext(file_names[name])[1][1:]: data})
            for name, data in cases.items()
        ],
    )

    def outcome(name, data):
        try:
            pixels, w, h = decode_image(data)
            return name, (w, h, hashlib.sha1(pixels.tobytes()).hexdigest())
        except ValueError:
            return name, "decode-failure"

    expected = sorted(outcome(name, data) for name, data in cases.items()) * 3
    with BeamTestPipeline() as p:
        records, read_failures = p | ReadImages(
            [
                str(tmp_path / "files" / "*"),
                str(tmp_path / "all.tfrecord"),
                str(tmp_path / "all.tar"),
            ]
        )
        decoded = records | beam.ParDo(DecodeAndResize()).with_outputs(FAILURES, main="decoded")
        results = decoded.decoded | "Results" >> beam.Map(
            lambda d: (
                _stem(d.key),
                (d.width, d.height, hashlib.sha1(d.pixels.tobytes()).hexdigest()),
            )
        )
        failed = decoded[FAILURES] | "Failed" >> beam.Map(
            lambda f: (_stem(f.key), "decode-failure")
        )
        assert_that((results, failed) | beam.Flatten(), equal_to(expected))
        assert_that(read_failures, equal_to([]), label="no read failures")


def test_image_files_skip_key_pass_and_keep_zero_byte_files(tmp_path):
    paths = corpus.write_image_corpus(str(tmp_path), ["zero_bytes", "one_pixel", "bmp"])
    transform = ReadImages(
        [str(tmp_path / "*.jpg"), str(tmp_path / "*.png"), str(tmp_path / "*.bmp")]
    )
    assert not transform._needs_key_pass()
    with BeamTestPipeline() as p:
        records, _ = p | transform
        assert_that(
            records | beam.Map(lambda r: (r.key, r.source, len(r.data))),
            equal_to([(path, path, os.path.getsize(path)) for path in paths.values()]),
        )


def test_overlapping_patterns_read_each_file_once(tmp_path):
    path = corpus.write_image_corpus(str(tmp_path), ["bmp"])["bmp"]
    with BeamTestPipeline() as p:
        records, _ = p | ReadImages([str(tmp_path / "*"), path, str(tmp_path / "b*.bmp")])
        assert_that(records | beam.Map(lambda r: r.key), equal_to([path]))
