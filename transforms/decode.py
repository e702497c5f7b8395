"""The decode step of the job (ARCHITECTURE.md, "Decode and resize"): Beam adapters around the
pure `core.decode.decode_image`.

`decode_record` is the one place a bad input becomes a `Failure` row, used by both decoders: the
`DecodeAndResize` DoFn here and `transforms.prefetch.PrefetchDecodeAndResize`.
"""

from __future__ import annotations

import logging

import apache_beam as beam

from core.decode import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_PIXELS,
    DecodeError,
    check_resize,
    decode_image,
    type_name,
)
from transforms import counters
from transforms.records import FAILURES, STAGE_DECODE, Decoded, Failure, ImageRecord, error_text

_LOG = logging.getLogger(__name__)


def decode_record(
    record: ImageRecord,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    resize: str = "squash",
) -> Decoded | Failure:
    """One record -> `Decoded`, or the `Failure(stage="decode")` row saying why not (never raises:
    any exception from one image, even an unexpected one, becomes that image's failure row)."""
    try:
        pixels, width, height = decode_image(record.data, image_size, max_pixels, resize)
    except DecodeError as exc:
        return Failure(record.key, record.source, STAGE_DECODE, error_text(exc))
    except Exception as exc:  # noqa: BLE001 - one bad image must never fail the job
        # An exception we did not expect: its message may quote the image's bytes, so the failure
        # names only its type (the debug log has the rest).
        _LOG.debug("unexpected error decoding %s", record.source, exc_info=True)
        return Failure(
            record.key,
            record.source,
            STAGE_DECODE,
            error_text(DecodeError(f"cannot decode image ({type_name(exc)})")),
        )
    return Decoded(
        record.key,
        record.source,
        width,
        height,
        pixels,
        record.source_offset,
        record.source_length,
    )


class DecodeAndResize(beam.DoFn):
    """ImageRecord -> Decoded; bad inputs -> Failure(stage "decode") on the FAILURES tagged output.

    Never raises for bad data: any exception from decoding one image becomes its failure row.
    Use as `beam.ParDo(DecodeAndResize(...)).with_outputs(FAILURES, main="decoded")`.
    Counters (namespace "decode"): decoded_images, decode_failures.
    """

    def __init__(
        self,
        image_size: int = DEFAULT_IMAGE_SIZE,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        resize: str = "squash",
    ):
        check_resize(resize)
        self._args = (image_size, max_pixels, resize)
        self._decoded = counters.DECODED_IMAGES.metric()
        self._failed = counters.DECODE_FAILURES.metric()

    def process(self, record: ImageRecord):
        out = decode_record(record, *self._args)
        if type(out) is Decoded:  # noqa: E721 - exact NamedTuple type, fastest test
            self._decoded.inc()
            yield out
        else:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, out)
