"""A deterministic sample of decoded images with small JPEG thumbnails, for the run report.

`SampleThumbnails(output, n)` keeps the `n` images whose key hashes are smallest (a `Top` combiner:
each bundle pre-combines to n candidates, so it is distributed and only n images per bundle are
shuffled), makes ~160 px thumbnails from the already decoded pixels (inputs are never read again)
and writes them to one small file, `OUTPUT/samples.parquet`. The same inputs give the same sample,
whatever the runner, the order or the number of workers; the hash is SHA-1 of the key, so a sample
looks like a random draw, not the alphabetically first files.

samples.parquet: key string, source string, width int32, height int32 (decoded size),
thumbnail binary (JPEG), sorted by key hash.
"""

import hashlib
import io

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

SAMPLES_FILE = "samples.parquet"
SAMPLE_SIZE = 48
THUMBNAIL_PX = 160
JPEG_QUALITY = 80


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a key (SHA-1 prefix): the same in every process and Python."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def samples_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("thumbnail", pa.binary()),
        ]
    )


def thumbnail(
    pixels: np.ndarray, width: int, height: int, size: int = THUMBNAIL_PX, resize: str = "squash"
) -> bytes:
    """JPEG bytes of a `size`-px thumbnail of the model's input pixels [S, S, 3].

    After a `squash` resize the original aspect ratio (width:height) is restored; after a
    `center_crop` the pixels are the square crop and stay square."""
    from PIL import Image

    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    if resize == "squash" and width > 0 and height > 0:
        scale = size / max(width, height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
    else:
        target = (size, size)
    image = image.resize(target, Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def write_samples(chosen, output: str, resize: str = "squash") -> str:
    """Writes the chosen (hash, Decoded) pairs as OUTPUT/samples.parquet; returns its path."""
    chosen = sorted(chosen, key=lambda item: item[0])
    table = pa.table(
        {
            "key": [d.key for _, d in chosen],
            "source": [d.source for _, d in chosen],
            "width": pa.array([d.width for _, d in chosen], pa.int32()),
            "height": pa.array([d.height for _, d in chosen], pa.int32()),
            "thumbnail": [thumbnail(d.pixels, d.width, d.height, resize=resize) for _, d in chosen],
        },
        schema=samples_schema(),
    )
    path = f"{output}/{SAMPLES_FILE}"
    with FileSystems.create(path, mime_type="application/octet-stream") as f:
        pq.write_table(table, f)
    return path


class SampleThumbnails(beam.PTransform):
    """PCollection[Decoded] -> PCollection with the one path of the written samples file."""

    def __init__(self, output: str, n: int = SAMPLE_SIZE, resize: str = "squash"):
        super().__init__()
        self._output, self._n, self._resize = output.rstrip("/"), int(n), resize

    def expand(self, decoded):
        return (
            decoded
            | "HashKeys" >> beam.Map(lambda d: (key_hash(d.key), d))
            | "SmallestHashes"
            >> beam.combiners.Top.Of(self._n, key=lambda item: item[0], reverse=True)
            | "WriteSamples" >> beam.Map(write_samples, self._output, self._resize)
        )
