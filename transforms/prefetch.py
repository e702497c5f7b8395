"""Decode ahead of inference: batches of `ImageRecord`s decoded in a thread pool, one batch ahead.

    records | PrefetchDecodeAndResize(image_size, threads=2, batch_size=16)
            -> DoOutputsTuple: .decoded (Decoded), [FAILURES] (Failure, stage "decode")

`BatchElements` groups the records into batches of the model's batch size.
`PrefetchDecode.process(batch N)` submits batch N's images to a thread pool and then yields the
finished outputs of batch N-1. The downstream `RunInference` is fused into the same thread, so
while it runs the model on batch N-1 (TF releases the GIL) the pool decodes batch N (Pillow
releases the GIL while decoding and resizing). The last batch of a bundle is flushed in
`finish_bundle`. Every output keeps the window and timestamp of its own input batch.

Same contract as `DecodeAndResize`, through the same `decode_record`: every image comes out exactly
once, as a `Decoded` or as a `Failure(stage="decode")` on the FAILURES tag, counted by the same
`counters.DECODED_IMAGES` / `counters.DECODE_FAILURES`. Counters are incremented on the bundle's
thread (Beam metrics live in thread-local state: an `inc()` inside a pool thread would be lost).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from core.decode import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_PIXELS, check_resize
from transforms import counters
from transforms.decode import decode_record
from transforms.records import FAILURES, Decoded


class PrefetchDecode(beam.DoFn):
    """list[ImageRecord] -> Decoded / Failure (tag FAILURES), decoded in `threads` threads, one
    batch ahead of whatever consumes the outputs. Use after `BatchElements`."""

    def __init__(
        self,
        image_size: int = DEFAULT_IMAGE_SIZE,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
        resize: str = "squash",
        threads: int = 2,
    ):
        check_resize(resize)
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        self._args = (image_size, max_pixels, resize)
        self._threads = int(threads)
        self._decoded = counters.DECODED_IMAGES.metric()
        self._failed = counters.DECODE_FAILURES.metric()
        self._pool = None
        self._pending = None

    def setup(self):
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="decode")

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def start_bundle(self):
        self._pending = None

    def process(self, batch, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        if self._pool is None:  # setup() not called (e.g. a DoFn driven by hand)
            self.setup()
        submit, args = self._pool.submit, self._args
        futures = [submit(decode_record, record, *args) for record in batch]
        previous, self._pending = self._pending, (futures, timestamp, window)
        if previous is not None:
            yield from self._emit(*previous)

    def finish_bundle(self):
        previous, self._pending = self._pending, None
        if previous is not None:
            yield from self._emit(*previous)

    def _emit(self, futures, timestamp, window):
        decoded = failed = 0
        try:
            for future in futures:
                out = future.result()
                value = WindowedValue(out, timestamp, (window,))
                if type(out) is Decoded:  # noqa: E721 - exact NamedTuple type, fastest test
                    decoded += 1
                    yield value
                else:
                    failed += 1
                    yield beam.pvalue.TaggedOutput(FAILURES, value)
        finally:
            if decoded:
                self._decoded.inc(decoded)
            if failed:
                self._failed.inc(failed)


class PrefetchDecodeAndResize(beam.PTransform):
    """PCollection[ImageRecord] -> DoOutputsTuple (.decoded: Decoded, [FAILURES]: Failure).

    Drop-in for `beam.ParDo(DecodeAndResize(...)).with_outputs(FAILURES, main="decoded")`, decoding
    batches of `batch_size` in `threads` threads one batch ahead of the consumer. The other
    arguments are `PrefetchDecode`'s (image_size, max_pixels, resize, threads)."""

    def __init__(self, *decode_args, batch_size: int = 16, **decode_kwargs):
        super().__init__()
        self._fn = PrefetchDecode(*decode_args, **decode_kwargs)
        self._batch_size = int(batch_size)

    def expand(self, records):
        return (
            records
            | "Batch"
            >> beam.BatchElements(min_batch_size=self._batch_size, max_batch_size=self._batch_size)
            | "DecodeAhead" >> beam.ParDo(self._fn).with_outputs(FAILURES, main="decoded")
        )
