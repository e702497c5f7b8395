"""Every way a user names inputs (transforms/read.py `expand_input`): bare globs, ./ ../ ~ and
absolute globs, folders with or without a trailing slash, locally and on gs:// (the emulator)."""

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
        assert_that(records | beam.Map(lambda r: r.key), equal_to(accepted))
