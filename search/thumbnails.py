"""Thumbnails of indexed images for `./run.sh serve`: JPEGs of at most 256 px, in a bounded LRU.

Made from the original bytes (`search.originals`) by `core.decode.decode_thumbnail` (the job's
decoder: same formats, EXIF rotation, pixel limit, JPEG draft decoding), encoded as JPEG. The cache
holds the encoded thumbnails of the last images asked for, up to `cache_bytes` (64 MiB: some
6,000 thumbnails); at most `max_decodes` are decoded at once, so a page of large originals cannot
take all the memory.
"""

from __future__ import annotations

import collections
import io
import threading

from PIL import Image

from core.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_thumbnail
from search.originals import Location, OriginalError, Originals

MAX_SIDE = 256
JPEG_QUALITY = 85
CACHE_BYTES = 64 << 20
MAX_DECODES = 4


class ThumbnailError(Exception):
    """No thumbnail: the original cannot be read or decoded (a one-line reason)."""


class Thumbnails:
    """`get(cache_key, location) -> JPEG bytes`, cached (thread-safe)."""

    def __init__(
        self,
        originals: Originals | None = None,
        *,
        max_side: int = MAX_SIDE,
        cache_bytes: int = CACHE_BYTES,
        max_decodes: int = MAX_DECODES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.originals = originals or Originals()
        self.max_side, self.cache_bytes, self.max_pixels = max_side, cache_bytes, max_pixels
        self._cache: collections.OrderedDict[object, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(max_decodes)
        self.hits = self.misses = 0

    def get(self, cache_key, at: Location) -> bytes:
        with self._lock:
            found = self._cache.get(cache_key)
            if found is not None:
                self._cache.move_to_end(cache_key)
                self.hits += 1
                return found
            self.misses += 1
        jpeg = self.make(at)
        self._put(cache_key, jpeg)
        return jpeg

    def make(self, at: Location) -> bytes:
        """A thumbnail of `at`, uncached; `ThumbnailError` saying why there is none."""
        try:
            data = self.originals.read(at)
        except OriginalError as e:
            raise ThumbnailError(str(e)) from None
        with self._decoding:
            try:
                pixels = decode_thumbnail(data, self.max_side, self.max_pixels)
            except DecodeError as e:
                raise ThumbnailError(f"{at.source}: {e}") from None
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue()

    def _put(self, cache_key, jpeg: bytes) -> None:
        if len(jpeg) > self.cache_bytes:
            return
        with self._lock:
            old = self._cache.pop(cache_key, None)
            self._bytes -= len(old) if old is not None else 0
            self._cache[cache_key] = jpeg
            self._bytes += len(jpeg)
            while self._bytes > self.cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._bytes -= len(dropped)

    @property
    def cached_bytes(self) -> int:
        return self._bytes
