"""report.html: written by every run, re-rendered by `python -m pipeline.report OUTPUT` (local and
gs://), self-contained, and it loads in headless Chromium with every thumbnail it claims."""

import io
import os
import re
import shutil

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from PIL import Image

from pipeline import report
from tests.browser import inspect_page
from tests.first_run import PHOTOS, first_run
from transforms.records import Decoded
from transforms.sample import SampleThumbnails, key_hash, thumbnail

# Every <img> has loaded and has pixels; the count the page claims in the contact-sheet heading.
_PAGE_CHECK = """(() => {
  const imgs = [...document.querySelectorAll('.card img')];
  const heading = [...document.querySelectorAll('h2')]
    .find(h => h.textContent.startsWith('Contact'));
  return {claimed: parseInt(heading.textContent.match(/(\\d+) sample/)[1]), imgs: imgs.length,
          loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
          svgs: document.querySelectorAll('svg').length};
})()"""


def test_every_run_writes_a_self_contained_report(models):
    output, text, code = first_run(*models)
    assert code == 0, text
    page = (output / "report.html").read_text()
    assert len(page.encode()) < 2_000_000
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing from the network
    assert page.count('src="data:image/jpeg;base64,') == len(PHOTOS)  # fewer than 48: all shown
    assert "broken.jpg" in page and "decode" in page  # the failure, with its example row
    assert page.count("<svg") == 2  # tag bar chart and top-1 histogram


def test_sample_thumbnails_come_from_decoded_pixels_with_their_aspect(models):
    output, _, _ = first_run(*models)
    samples = pq.read_table(output / "samples.parquet").to_pylist()
    keys = set(
        pq.ParquetDataset([str(p) for p in output.glob("results-*.parquet")])
        .read(columns=["key"])
        .column("key")
        .to_pylist()
    )
    assert {s["key"] for s in samples} == keys
    assert [s["key"] for s in samples] == sorted(keys, key=key_hash)
    chelsea = next(s for s in samples if s["key"].endswith("chelsea.jpg"))
    image = Image.open(io.BytesIO(chelsea["thumbnail"]))
    assert (image.format, image.size) == ("JPEG", (160, 106))  # 451x300 photo, aspect restored


def test_report_command_renders_the_same_page_again(models, tmp_path):
    output, _, _ = first_run(*models)
    before = (output / "report.html").read_bytes()
    os.remove(output / "report.html")
    assert report.main([str(output)]) == 0
    assert (output / "report.html").read_bytes() == before
    assert report.main([str(tmp_path / "no-run-here")]) == 2


def test_report_command_on_gcs(models, beam_gcs):
    output, _, _ = first_run(*models)
    root = f"gs://{beam_gcs.new_bucket()}/run"
    for path in output.iterdir():
        if path.name != "report.html":
            beam_gcs.upload_file(f"{root}/{path.name}", path)
    assert report.main([root]) == 0
    page = beam_gcs.read(f"{root}/report.html").decode()
    assert page.count("data:image/jpeg;base64,") == len(PHOTOS)


def test_an_incomplete_run_is_reported_as_one_never_as_no_failures(models, tmp_path, capsys):
    """What a run killed after its results were written left (an older version could): results,
    no failures files, no summary.json."""
    output, _, _ = first_run(*models)
    killed = tmp_path / "killed"
    shutil.copytree(output, killed)
    for path in [killed / "summary.json", killed / "report.html", *killed.glob("failures-*")]:
        path.unlink()
    assert report.main([str(killed)]) == 0
    assert "holds an incomplete run" in capsys.readouterr().err
    page = (killed / "report.html").read_text()
    assert "INCOMPLETE RUN" in page and "No failures." not in page
    assert "Unknown: the run did not commit" in page


def test_an_output_that_cannot_be_read_is_an_error_not_no_output(models, beam_gcs, capsys):
    output, _, _ = first_run(*models)
    root = f"gs://{beam_gcs.new_bucket()}/run"
    beam_gcs.upload_file(f"{root}/summary.json", output / "summary.json")
    beam_gcs.fail_next(10, 403)  # permission denied, however many requests the check makes
    try:
        assert report.main([root]) == 2
    finally:
        beam_gcs.fail_next(0)
    err = capsys.readouterr().err
    assert "403" in err and "has no output" not in err and err.count("\n") == 1


def test_report_messages_escape_control_characters(tmp_path, capsys):
    assert report.main([str(tmp_path / "out\x1b]0;pwned\x07")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "out\\x1b]0;pwned\\x07 has no output" in err


def test_report_loads_in_chromium_with_every_thumbnail(models, tmp_path):
    output, _, _ = first_run(*models)
    png = tmp_path / "report.png"
    errors, seen = inspect_page(str(output / "report.html"), _PAGE_CHECK, str(png))
    assert errors == []
    assert seen == {"claimed": len(PHOTOS), "imgs": len(PHOTOS), "loaded": len(PHOTOS), "svgs": 2}
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 600 and pixels.std() > 10  # not blank


def _decoded(key: str) -> Decoded:
    pixels = np.full((8, 8, 3), key_hash(key) % 256, np.uint8)
    return Decoded(key, key, 16, 8, pixels)


def test_sample_is_the_smallest_key_hashes_whatever_the_order(tmp_path):
    keys = [f"img-{i:03d}" for i in range(100)]
    chosen = []
    for run, order in enumerate((keys, keys[::-1])):
        out = tmp_path / f"run{run}"
        out.mkdir()
        with BeamTestPipeline() as p:
            _ = p | beam.Create([_decoded(k) for k in order]) | SampleThumbnails(str(out), n=48)
        chosen.append(pq.read_table(out / "samples.parquet").column("key").to_pylist())
    assert chosen[0] == chosen[1] == sorted(keys, key=key_hash)[:48]


def test_empty_run_writes_an_empty_sample(tmp_path):
    with BeamTestPipeline() as p:
        _ = (
            p
            | beam.Create([], reshuffle=False).with_output_types(Decoded)
            | SampleThumbnails(str(tmp_path))
        )
    assert pq.read_table(tmp_path / "samples.parquet").num_rows == 0


def test_thumbnail_restores_the_aspect_of_a_squashed_image():
    square = np.zeros((224, 224, 3), np.uint8)
    wide = Image.open(io.BytesIO(thumbnail(square, width=800, height=400)))
    assert wide.size == (160, 80)
    cropped = Image.open(io.BytesIO(thumbnail(square, 800, 400, resize="center_crop")))
    assert cropped.size == (160, 160)


def test_the_browser_check_sees_console_errors_and_broken_images(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; img-src data:\"></head><body>"
        "<h2>Contact sheet: 1 sample image</h2><div class='card'>"
        "<img src='data:image/jpeg;base64,AAAA'></div>"
        "<img src='http://127.0.0.1:9/x.png'></body></html>"
    )
    errors, seen = inspect_page(str(page), _PAGE_CHECK, str(tmp_path / "bad.png"))
    assert errors  # the blocked network image
    assert seen["claimed"] == 1 and seen["loaded"] == 0


def test_report_reads_only_the_columns_it_shows(tmp_path, monkeypatch):
    """A results file is mostly embeddings: gathering the page must not read them (nor load whole
    files into memory), so its memory does not grow with the size of the results."""
    import pyarrow as pa

    from core.schema import results_schema

    schema = results_schema(4096)
    rows = 200
    rng = np.random.default_rng(0)
    tag = [{"index": 1, "wnid": "n00000001", "label": "thing", "score": 0.9}]
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(rows)],
            "source": [f"s{i}" for i in range(rows)],
            "source_offset": pa.array([0] * rows, pa.int64()),
            "source_length": pa.array([100] * rows, pa.int64()),
            "width": pa.array([8] * rows, pa.int32()),
            "height": pa.array([8] * rows, pa.int32()),
            "tags": [tag] * rows,
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.random(rows * 4096, dtype=np.float32)), 4096
            ),
        },
        schema=schema,
    )
    path = tmp_path / "results-00000-of-00001.parquet"
    pq.write_table(table, path, compression="none")
    read = []
    open_file = report.FileSystems.open

    def counting_open(name, *args, **kwargs):
        f = open_file(name, *args, **kwargs)
        original = f.read

        def counted(*a):
            data = original(*a)
            read.append(len(data))
            return data

        f.read = counted
        return f

    monkeypatch.setattr(report.FileSystems, "open", counting_open)
    page = report.gather(str(tmp_path))
    assert page["rows"] == rows and page["tag_counts"]["thing"] == rows
    assert sum(read) < 0.05 * os.path.getsize(path)  # 3.3 MB of embeddings left unread


def test_the_page_escapes_every_value_it_shows():
    """Keys, labels, errors, options and the output path come from users' files and flags."""
    import collections

    hostile = "<script>alert('x')</script>"
    data = {
        "summary": {"inputs": 2, "options": {"input": hostile}, "models": {"tags_model": hostile}},
        "samples": [{"key": hostile, "thumbnail": b"\xff\xd8", "tags": [(hostile, 0.5)]}],
        "tag_counts": collections.Counter({hostile: 1}),
        "top1": [0] * report.HISTOGRAM_BINS,
        "rows": 1,
        "failure_counts": collections.Counter({("decode", hostile): 1}),
        "failure_examples": {
            ("decode", hostile): [{"key": hostile, "source": "s", "error": hostile}]
        },
    }
    page = report.render(data, f"out/{hostile}")
    assert "<script" not in page
    assert page.count("&lt;script&gt;") >= 9
