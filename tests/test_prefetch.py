"""transforms/prefetch.py: decoding one batch ahead in a thread pool, nothing lost, same outputs and
counters as `DecodeAndResize`, and the job with `--decode_threads`."""

import pathlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from tests import corpus
from tests.bit_checkpoints import write_checkpoint
from transforms.decode import DecodeAndResize
from transforms.prefetch import PrefetchDecode, PrefetchDecodeAndResize, decode_record
from transforms.records import FAILURES, STAGE_DECODE, Decoded, Failure, ImageRecord

SIZE = 32


def records(n=23, bad_every=4):
    """n records; every `bad_every`-th one is not an image, one is empty, the rest are JPEG/PNG."""
    out = []
    for i in range(n):
        if i % bad_every == 1:
            data = b"<html>not an image</html>" if i % 2 else b""
        elif i % 3 == 0:
            data = corpus.make_png(40 + i, 30 + i, seed=i)
        else:
            data = corpus.make_jpeg(64 + i, 48 + 2 * i, seed=i)
        out.append(ImageRecord(f"key{i:03d}", f"src{i}", data))
    return out


def expected(recs):
    return {r.key: decode_record(r, SIZE, None, "squash") for r in recs}


def unwrap(item):
    """(tag or None, value) of something a DoFn yielded."""
    tag = None
    if isinstance(item, beam.pvalue.TaggedOutput):
        tag, item = item.tag, item.value
    assert isinstance(item, WindowedValue)
    return tag, item.value


def test_decode_record_never_raises():
    good, bad = records(3)[0], ImageRecord("k", "s", b"garbage bytes")
    out = decode_record(good, SIZE, None, "squash")
    assert isinstance(out, Decoded) and out.pixels.shape == (SIZE, SIZE, 3)
    failure = decode_record(bad, SIZE, None, "squash")
    assert isinstance(failure, Failure) and failure.stage == STAGE_DECODE
    assert failure.key == "k" and failure.source == "s" and "DecodeError" in failure.error


def test_yields_previous_batch_and_flushes_last():
    fn = PrefetchDecode(SIZE, None, threads=2)
    fn.setup()
    try:
        recs = records(10)
        batches = [recs[0:4], recs[4:8], recs[8:10]]
        fn.start_bundle()
        gw = window.GlobalWindow()
        first = list(fn.process(batches[0], timestamp=0, window=gw))
        assert first == []  # decoding is under way, nothing is ready to go yet
        second = [unwrap(x) for x in fn.process(batches[1], timestamp=0, window=gw)]
        assert [v.key for _, v in second] == [r.key for r in batches[0]]
        third = [unwrap(x) for x in fn.process(batches[2], timestamp=0, window=gw)]
        assert [v.key for _, v in third] == [r.key for r in batches[1]]
        last = [unwrap(x) for x in fn.finish_bundle()]
        assert [v.key for _, v in last] == [r.key for r in batches[2]]
        assert list(fn.finish_bundle()) == []  # flushed once
        for tag, value in second + third + last:
            assert (tag == FAILURES) == isinstance(value, Failure)
    finally:
        fn.teardown()


def test_matches_decode_and_resize_in_a_pipeline():
    """Same outputs (pixels too), same failures and same counters as the inline DoFn."""
    recs = records(37)
    want = expected(recs)
    want_ok = sorted(k for k, v in want.items() if isinstance(v, Decoded))
    want_failed = sorted((k, v.stage, v.error) for k, v in want.items() if isinstance(v, Failure))
    assert want_ok and want_failed

    def check_pixels(decoded):
        ref = want[decoded.key]
        assert (decoded.width, decoded.height) == (ref.width, ref.height)
        np.testing.assert_array_equal(decoded.pixels, ref.pixels)
        return decoded.key

    counters = {}
    for name, transform in (
        ("inline", beam.ParDo(DecodeAndResize(SIZE, None)).with_outputs(FAILURES, main="decoded")),
        ("prefetch", PrefetchDecodeAndResize(SIZE, None, threads=2, batch_size=5)),
    ):
        p = beam.Pipeline(runner=FnApiRunner())
        out = p | beam.Create(recs) | transform
        assert_that(out.decoded | "Check" >> beam.Map(check_pixels), equal_to(want_ok), label="ok")
        assert_that(
            out[FAILURES] | "F" >> beam.Map(lambda f: (f.key, f.stage, f.error)),
            equal_to(want_failed),
            label="failed",
        )
        result = p.run()
        result.wait_until_finish()
        counters[name] = {
            c.key.metric.name: c.committed
            for c in result.metrics().query(beam.metrics.MetricsFilter().with_namespace("decode"))[
                "counters"
            ]
        }
    assert (
        counters["prefetch"]
        == counters["inline"]
        == {"decoded_images": len(want_ok), "decode_failures": len(want_failed)}
    )


@pytest.mark.parametrize("threads,batch_size", [(1, 1), (1, 16), (3, 4)])
def test_nothing_lost_for_any_batching(threads, batch_size):
    recs = records(29, bad_every=5)
    p = beam.Pipeline(runner=FnApiRunner())
    out = (
        p
        | beam.Create(recs)
        | PrefetchDecodeAndResize(SIZE, None, threads=threads, batch_size=batch_size)
    )
    keys = (
        (out.decoded | "K1" >> beam.Map(lambda d: d.key)),
        (out[FAILURES] | "K2" >> beam.Map(lambda f: f.key)),
    ) | beam.Flatten()
    assert_that(keys, equal_to([r.key for r in recs]))
    p.run().wait_until_finish()


def test_keeps_each_batch_window_and_timestamp():
    recs = records(12, bad_every=6)
    p = beam.Pipeline(runner=FnApiRunner())
    stamped = (
        p
        | beam.Create(list(enumerate(recs)))
        | beam.Map(lambda ir: window.TimestampedValue(ir[1], 10 * ir[0]))
        | beam.WindowInto(window.FixedWindows(30))
    )
    out = stamped | PrefetchDecodeAndResize(SIZE, None, threads=2, batch_size=2)
    got = (
        (
            (out.decoded | "K1" >> beam.Map(lambda d: d.key)),
            (out[FAILURES] | "K2" >> beam.Map(lambda f: f.key)),
        )
        | beam.Flatten()
        | beam.Map(
            lambda k, ts=beam.DoFn.TimestampParam, w=beam.DoFn.WindowParam: (
                k,
                int(w.start),
                int(ts),
            )
        )
    )

    # Each record's window is [30*j, 30*j+30); its timestamp is that of its batch (the batch's
    # end-of-window timestamp, as BatchElements gives) and lies inside that window.
    def check(rows):
        assert sorted(k for k, _, _ in rows) == [r.key for r in recs]
        for key, start, ts in rows:
            i = int(key[3:])
            assert start == (10 * i) // 30 * 30
            assert start <= ts < start + 30

    assert_that(got, check)
    p.run().wait_until_finish()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        PrefetchDecode(SIZE, threads=0)
    with pytest.raises(ValueError):
        PrefetchDecode(SIZE, resize="stretch")


# ------------------------------------------------------------------------------------ the job


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch_job")
    ckpt = root / "tiny.npz"
    write_checkpoint(ckpt, units=(1, 1, 1, 1), width=1, num_classes=21843, seed=3)
    files = root / "files"
    files.mkdir()
    for i in range(11):
        (files / f"img{i:02d}.jpg").write_bytes(corpus.make_jpeg(70 + i, 50 + i, seed=i))
    (files / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (files / "empty.png").write_bytes(b"")
    return str(ckpt), files


def _run_job(ckpt, files, output, threads):
    from pipeline.main import run

    return run(
        [
            "--input",
            str(files / "*"),
            "--output",
            str(output),
            "--tags_model",
            ckpt,
            "--embed_model",
            ckpt,
            "--batch_size",
            "4",
            "--image_size",
            "48",
            "--log_every_secs",
            "0",
            "--decode_threads",
            str(threads),
        ],
        save_main_session=False,
    )


def _table(output, kind):
    files = sorted(pathlib.Path(output).glob(f"{kind}-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("key")


def test_job_with_decode_threads_matches_inline(job_inputs, tmp_path):
    ckpt, files = job_inputs
    inline = _run_job(ckpt, files, tmp_path / "inline", 0)
    ahead = _run_job(ckpt, files, tmp_path / "ahead", 2)
    for summary in (inline, ahead):
        assert summary["inputs"] == 13 and summary["results"] == 11 and summary["failures"] == 2
        assert summary["accounted"]
    assert ahead["failures_by_stage"] == inline["failures_by_stage"] == {"decode": 2}
    assert ahead["counters"] == inline["counters"]
    a, b = _table(tmp_path / "inline", "results"), _table(tmp_path / "ahead", "results")
    assert a.column("key").to_pylist() == b.column("key").to_pylist()
    assert a.column("tags").to_pylist() == b.column("tags").to_pylist()
    np.testing.assert_allclose(
        np.array(a.column("embedding").to_pylist()),
        np.array(b.column("embedding").to_pylist()),
        rtol=1e-5,
        atol=1e-6,
    )
    fa, fb = _table(tmp_path / "inline", "failures"), _table(tmp_path / "ahead", "failures")
    assert fa.to_pylist() == fb.to_pylist()
    assert set(fb.column("stage").to_pylist()) == {"decode"}


def test_decode_threads_option():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import JobOptions

    opts = PipelineOptions(["--input", "x", "--output", "y", "--decode_threads", "3"])
    assert opts.view_as(JobOptions).decode_threads == 3
