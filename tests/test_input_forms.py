"""Every way a user names inputs (transforms/read.py `expand_input`): bare globs, ./ ../ ~ and
absolute globs, folders with or without a trailing slash, locally and on gs:// (the emulator);
folders as people have them (names that are not UTF-8, FIFOs, sockets, links to devices, HEIC,
AVIF, .tgz)."""

import gzip
import os

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests import corpus
from transforms.read import ReadImages, expand_input, folder_accepts, normalize_pattern


@pytest.fixture
def photos(tmp_path):
    """home/photos: a.jpg, b.png, notes.txt, meta.json and sub/c.jpg (real, decodable images)."""
    root = tmp_path / "home" / "photos"
    (root / "sub").mkdir(parents=True)
    images = corpus.write_image_corpus(str(root), ["one_pixel", "bmp"])
    a, b = root / "a.jpg", root / "b.png"
    os.rename(images["one_pixel"], a)  # the corpus names do not matter, only extensions do
    os.rename(images["bmp"], b)
    (root / "sub" / "c.jpg").write_bytes(a.read_bytes())
    (root / "notes.txt").write_text("sidecar")
    (root / "meta.json").write_text("{}")
    return root


def test_every_glob_spelling_finds_the_same_files(photos, monkeypatch):
    monkeypatch.setenv("HOME", str(photos.parent))
    monkeypatch.chdir(photos / "sub")
    expected = [str(photos / "a.jpg")]
    for pattern in ["../*.jpg", "./../a.*g", str(photos / "*.jpg"), "~/photos/*.jpg"]:
        assert expand_input(pattern).files == expected, pattern
    monkeypatch.chdir(photos)
    assert expand_input("*.jpg").files == expected
    assert expand_input("./*.jpg").files == expected


def test_a_folder_is_every_accepted_file_under_it(photos, monkeypatch):
    monkeypatch.setenv("HOME", str(photos.parent))
    monkeypatch.chdir(photos.parent)
    accepted = sorted(str(photos / name) for name in ("a.jpg", "b.png", "sub/c.jpg"))
    sidecars = sorted(str(photos / name) for name in ("meta.json", "notes.txt"))
    for folder in ["photos", "photos/", "./photos", "~/photos/", str(photos)]:
        found = expand_input(folder)
        assert (sorted(found.files), sorted(found.skipped)) == (accepted, sidecars), folder
    # An explicit --input_format keeps only that format's files.
    assert expand_input("photos", "tfrecord").files == []
    assert not folder_accepts("x.jpg", "webdataset") and folder_accepts("x.tar", "webdataset")


def test_normalize_pattern_leaves_uris_alone():
    assert normalize_pattern("gs://b/photos/") == "gs://b/photos/"
    assert normalize_pattern("/a/./b/../c/*.jpg") == "/a/c/*.jpg"


def test_folder_in_a_pipeline_reads_images_and_counts_skipped_sidecars(photos):
    p = BeamTestPipeline()
    records, failures = p | ReadImages([str(photos) + "/"])
    assert_that(
        records | beam.Map(lambda r: r.key),
        equal_to([str(photos / n) for n in ("a.jpg", "b.png", "sub/c.jpg")]),
        label="keys",
    )
    assert_that(failures, equal_to([]), label="no failures")
    result = p.run()
    result.wait_until_finish()
    [skipped] = result.metrics().query(MetricsFilter().with_name("read_skipped_files"))["counters"]
    assert skipped.committed == 2


def test_a_sidecar_matched_by_a_glob_stays_a_failure(photos):
    with BeamTestPipeline() as p:
        _, failures = p | ReadImages([str(photos / "*.txt")])
        assert_that(
            failures | beam.Map(lambda f: (f.key, f.stage)),
            equal_to([(str(photos / "notes.txt"), "read")]),
        )


def test_a_folder_without_readable_files_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="matched no files that --input_format auto reads"):
        with BeamTestPipeline() as p:
            _ = p | ReadImages([str(tmp_path)])
    with pytest.raises(ValueError, match="matched no files"):
        ReadImages([str(tmp_path / "empty-folder")])


def test_gcs_globs_and_folders(beam_gcs):
    root = f"gs://{beam_gcs.new_bucket()}"
    for name in (
        "photos/a.jpg",
        "photos/b.png",
        "photos/sub/c.jpg",
        "photos/notes.txt",
        "photos-other/x.jpg",
    ):
        beam_gcs.upload(f"{root}/{name}", b"not decoded here")
    accepted = [f"{root}/photos/{n}" for n in ("a.jpg", "b.png", "sub/c.jpg")]
    for folder in (f"{root}/photos", f"{root}/photos/"):
        found = expand_input(folder)
        assert sorted(found.files) == accepted, folder
        assert found.skipped == [f"{root}/photos/notes.txt"]
    assert expand_input(f"{root}/photos/*.jpg").files == [f"{root}/photos/a.jpg"]
    assert expand_input(f"{root}/photos/a.jpg").files == [f"{root}/photos/a.jpg"]
    with BeamTestPipeline() as p:
        records, _ = p | ReadImages([f"{root}/photos"])
        assert_that(
            records | beam.Map(lambda r: (r.key, r.data)),
            equal_to([(uri, b"not decoded here") for uri in accepted]),
        )
    beam_gcs.upload(f"{root}/sidecars/notes.txt", b"x")
    with pytest.raises(ValueError, match="sidecars' matched no files that --input_format auto"):
        ReadImages([f"{root}/sidecars"])
    # the size limit applies before reading an object too (GCS readers know the size)
    with BeamTestPipeline() as p:
        _, failures = p | ReadImages([f"{root}/photos/a.jpg"], max_input_bytes=10)
        assert_that(
            failures | beam.Map(lambda f: f.error),
            equal_to(
                [
                    "InputTooLargeError: the file is 16 bytes, over the --max_input_bytes "
                    "limit of 10; raise the limit to read it"
                ]
            ),
        )


# ------------------------------------------------------------------------ odd files and names


@pytest.fixture
def odd_folder(tmp_path):
    """A folder as people have them: a photo, a Latin-1 name, a FIFO, a socket, a link to
    /dev/zero, HEIC and AVIF photos and a .tgz shard; (folder, {what: path})."""
    import socket

    root = tmp_path / "odd"
    root.mkdir()
    paths = {
        "photo": root / "a.jpg",
        "latin1": os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9.jpg"),
        "fifo": root / "pipe.jpg",
        "socket": root / "sock.jpg",
        "zero": root / "zero.jpg",
        "heic": root / "phone.heic",
        "avif": root / "web.avif",
        "tgz": root / "shard.tgz",
    }
    paths = {k: str(v) for k, v in paths.items()}
    photo = corpus.make_jpeg(32, 24)
    for what in ("photo", "latin1"):
        with open(paths[what], "wb") as f:
            f.write(photo)
    os.mkfifo(paths["fifo"])
    server = socket.socket(socket.AF_UNIX)
    server.bind(paths["socket"])
    os.symlink("/dev/zero", paths["zero"])
    with open(paths["heic"], "wb") as f:
        f.write(corpus.heic(corpus.photo_like(24, 16)))
    with open(paths["avif"], "wb") as f:
        f.write(corpus.encode(corpus.photo_like(24, 16), "AVIF"))
    tar = str(tmp_path / "shard.tar")
    corpus.write_webdataset(tar, [("t0", photo)])
    with open(tar, "rb") as src, open(paths["tgz"], "wb") as dst:
        dst.write(gzip.compress(src.read()))
    yield str(root), paths
    server.close()


def test_a_folder_leaves_special_files_out_and_reads_the_rest(odd_folder):
    root, paths = odd_folder
    found = expand_input(root)
    special = sorted(paths[w] for w in ("fifo", "socket", "zero"))
    readable = sorted(paths[w] for w in ("photo", "latin1", "heic", "avif", "tgz"))
    assert (sorted(found.files), found.skipped, sorted(found.special)) == (readable, [], special)
    # a glob is every match, but special files are still never opened
    found = expand_input(root + "/*.jpg")
    assert sorted(found.files) == sorted(paths[w] for w in ("photo", "latin1"))
    assert sorted(found.special) == special


@pytest.mark.timeout(300)
def test_odd_folder_in_a_pipeline_accounts_every_file(odd_folder):
    root, paths = odd_folder
    p = BeamTestPipeline()
    records, failures = p | ReadImages([root])
    latin1_key = os.path.join(root, "caf%E9.jpg")
    assert_that(
        records | beam.Map(lambda r: (r.key, r.source)),
        equal_to(
            [(paths[w], paths[w]) for w in ("photo", "heic", "avif")]
            + [(latin1_key, latin1_key), ("t0", f"{paths['tgz']}:t0.jpg")]
        ),
        label="records",
    )
    assert_that(failures, equal_to([]), label="no failures")
    with corpus.fifo_unblocked_after(paths["fifo"], seconds=20):
        result = p.run()
        result.wait_until_finish()
    counted = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace("read"))["counters"]
    }
    assert counted["read_skipped_special"] == 3
    assert counted["read_files"] == 5 and counted["read_images"] == 5


def test_a_glob_or_folder_of_only_special_files_is_a_usage_error(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    for pattern in (
        str(tmp_path),
        str(tmp_path / "*.jpg"),
        str(tmp_path / "pipe.jpg"),
        "/dev/zero",
    ):
        with pytest.raises(ValueError, match="matched only FIFOs, devices or sockets"):
            ReadImages([pattern])


def test_a_non_utf8_glob_pattern_matches_its_file(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/\xff\xfe.png"
    with open(raw, "wb") as f:
        f.write(corpus.make_png(8, 8))
    pattern = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff*.png")  # as argv hands it over
    with BeamTestPipeline() as p:
        records, _ = p | ReadImages([pattern])
        assert_that(records | beam.Map(lambda r: r.key), equal_to([str(tmp_path / "%FF%FE.png")]))


def test_an_escaped_name_that_is_taken_is_a_duplicate_key(tmp_path):
    """`x%FF.jpg` (a UTF-8 name) and `x\\xff.jpg` would share a key: the second one fails."""
    (tmp_path / "x%FF.jpg").write_bytes(corpus.make_jpeg(8, 8, seed=1))
    with open(os.fsencode(str(tmp_path)) + b"/x\xff.jpg", "wb") as f:
        f.write(corpus.make_jpeg(8, 8, seed=2))
    key = str(tmp_path / "x%FF.jpg")
    with BeamTestPipeline() as p:
        records, failures = p | ReadImages([str(tmp_path / "*.jpg")])
        assert_that(records | beam.Map(lambda r: r.key), equal_to([key]), label="records")
        assert_that(
            failures | beam.Map(lambda f: (f.key, f.error.split(":")[0])),
            equal_to([(key, "DuplicateKey")]),
            label="failures",
        )


def test_links_to_nothing_are_failures_not_silently_dropped(tmp_path):
    (tmp_path / "a.jpg").write_bytes(corpus.make_jpeg(8, 8))
    os.symlink(tmp_path / "moved-away.jpg", tmp_path / "gone.jpg")
    os.symlink(tmp_path / "loop.jpg", tmp_path / "loop.jpg")
    os.symlink(tmp_path / "moved-away.txt", tmp_path / "gone.txt")  # a sidecar: skipped
    found = expand_input(str(tmp_path))
    links = sorted(str(tmp_path / n) for n in ("gone.jpg", "loop.jpg"))
    assert sorted(found.files) == sorted([str(tmp_path / "a.jpg"), *links])
    assert found.skipped == [str(tmp_path / "gone.txt")]
    with BeamTestPipeline() as p:
        _, failures = p | ReadImages([str(tmp_path)])
        assert_that(
            failures | beam.Map(lambda f: (f.key, f.stage, f.error.split(":")[0])),
            equal_to([(links[0], "read", "FileNotFoundError"), (links[1], "read", "OSError")]),
        )
