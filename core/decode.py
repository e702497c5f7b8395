"""Decode and resize encoded images (ARCHITECTURE.md, "Decode and resize"): pure, no Beam.

`decode_image` is bytes in, uint8 pixels out, so the job (`transforms.decode`), the search query
(`search.query.embed_image`), tests and benchmarks all decode the same way.

Decoding uses Pillow. JPEGs are decoded with `draft()` (libjpeg DCT scaling) straight to the
smallest power-of-two reduction that is still >= the target size, which is most of the speed. The
pixel-count limit is checked from the header, before any pixel is decoded, and per call: images are
opened through Pillow's plugin registry directly, so Pillow's process-wide `Image.MAX_IMAGE_PIXELS`
is neither read nor changed (no global state shared between threads). HEIC/HEIF photos are read
through pillow-heif's Pillow plugin (registered at import; it applies the photo's orientation
itself), AVIF by Pillow's own plugin.

Failure messages are made of our own words, the format Pillow detected and the byte size, never of
the image's bytes or a plugin's message (which can quote them): a text file named `.jpg` must not
leak into the failures file (docs/bad-input.md).
"""

from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
from PIL import Image, ImageFile

DEFAULT_IMAGE_SIZE = 224
# Pillow's own hard limit (2 * Image.MAX_IMAGE_PIXELS): ~179 megapixels, e.g. 13,000 x 13,000.
DEFAULT_MAX_PIXELS = 178956970
RESIZE_MODES = ("squash", "center_crop")

# Formats we accept, most common first (the open loop tries them in order). A closed list keeps
# rarely used parsers away from untrusted bytes and stops random bytes being "recognised" as TGA.
# MPO is how Pillow opens camera JPEGs with several pictures; HEIF is pillow-heif's (HEIC photos).
FORMATS = ("JPEG", "PNG", "WEBP", "MPO", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
_LOG = logging.getLogger(__name__)

# EXIF orientation -> the transpose making the image upright (as in ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
_WHITE = (255, 255, 255)


def _register_heif() -> None:
    """pillow-heif's opener in Pillow's registry (format "HEIF"; no thumbnails decoded). It
    decodes with the photo's rotation and mirroring applied and sets its EXIF orientation to 1,
    so the EXIF step below does not turn it twice."""
    try:
        import pillow_heif
    except ImportError:  # not installed: HEIC is then an "unsupported image format" failure
        return
    pillow_heif.register_heif_opener(thumbnails=False)


_register_heif()


class DecodeError(ValueError):
    """The bytes are not an image we can decode; the message is for the user (a failure row)."""


def check_resize(resize: str) -> None:
    """Raise ValueError unless `resize` is one of RESIZE_MODES."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, not {resize!r}")


def decode_image(
    data: bytes,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    resize: str = "squash",
) -> tuple[np.ndarray, int, int]:
    """Decode `data` and resize it to `image_size` x `image_size` RGB.

    Returns `(pixels uint8 [S, S, 3], width, height)`, where width/height are the full decoded size
    after EXIF rotation (before any draft or resize). `resize="squash"` stretches the whole image to
    a square (BiT evaluation); `"center_crop"` scales the short side to S and crops the centre.
    `max_pixels` (None or 0: no limit) is checked from the header before decoding.
    Raises `DecodeError` with a short, user-readable message for every kind of bad input.
    """
    check_resize(resize)
    return _guarded(data, lambda opened: _decode(data, image_size, max_pixels, resize, opened))


def decode_thumbnail(
    data: bytes, max_side: int = 256, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode `data` to RGB uint8 [h, w, 3], upright (EXIF), aspect ratio kept, its longer side
    at most `max_side` (never enlarged): a thumbnail (`./run.sh serve`). The same formats, pixel
    limit, JPEG draft decoding and `DecodeError`s as `decode_image`."""
    return _guarded(data, lambda opened: _thumbnail(data, max_side, max_pixels, opened))


def _guarded(data: bytes, decode):
    """`decode(opened)`, every error of a bad image turned into a `DecodeError` in our words."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    opened = []  # the image, once its header is read: its format names the failure
    try:
        return decode(opened)
    except DecodeError:
        raise
    except Image.DecompressionBombError:  # raised by a plugin mid-decode (e.g. GIF frame growth)
        what = _what(opened, data)
        raise DecodeError(f"image is over the decompression-bomb pixel limit ({what})") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        struct.error,
        EOFError,
        IndexError,
        TypeError,
        KeyError,
        zlib.error,
        RuntimeError,  # pillow-heif's decoder errors
    ) as exc:
        raise DecodeError(_describe_pillow_error(exc, _what(opened, data))) from None


def _what(opened: list, data: bytes) -> str:
    """ "JPEG, 1234 bytes": what the failing input is, in words that hold none of its content."""
    fmt = opened[0].format if opened else None
    return f"{fmt}, {len(data)} bytes" if fmt else f"{len(data)} bytes"


_SWAPS_SIDES = (
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90,
)


def _open_checked(data: bytes, max_pixels: int | None, opened: list) -> ImageFile.ImageFile:
    """The image with its header read and its pixel count checked."""
    im = _open(data)
    opened.append(im)
    width, height = im.size
    if max_pixels and width * height > max_pixels:
        raise DecodeError(f"image is {width}x{height}, over the {max_pixels}-pixel limit")
    return im


def _decode(data: bytes, size: int, max_pixels: int | None, resize: str, opened: list):
    im = _open_checked(data, max_pixels, opened)
    width, height = im.size
    transpose = _orientation(im)
    if transpose in _SWAPS_SIDES:
        width, height = height, width
    box = _draft(im, size)
    im = _to_rgb_or_l(im)
    # Resize (and crop) before the EXIF transpose: the transpose is then done on S x S pixels, not
    # the full image. Squash and centre crop both commute with the 8 flips/rotations.
    im = _resize(im, size, box, resize)
    if transpose is not None:
        im = im.transpose(transpose)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im), width, height


def _thumbnail(data: bytes, max_side: int, max_pixels: int | None, opened: list) -> np.ndarray:
    im = _open_checked(data, max_pixels, opened)
    transpose = _orientation(im)
    box = _draft(im, max_side) or (0, 0, im.size[0], im.size[1])
    im = _to_rgb_or_l(im)
    width, height = box[2] - box[0], box[3] - box[1]
    scale = min(1.0, max_side / max(width, height, 1))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if im.size != target or box != (0, 0, *im.size):
        im = im.resize(target, Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)
    if transpose is not None:
        im = im.transpose(transpose)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def _open(data: bytes) -> ImageFile.ImageFile:
    """Identify the format, read the header (like `Image.open`, without its global pixel limit)."""
    fp = io.BytesIO(data)
    prefix = data[:16]
    problems = []
    for fmt in FORMATS:
        if fmt not in Image.OPEN:
            Image.init()
            if fmt not in Image.OPEN:  # plugin not built into this Pillow (e.g. AVIF)
                continue
        factory, accept = Image.OPEN[fmt]
        if accept is not None and accept(prefix) is not True:
            continue
        fp.seek(0)
        try:
            return factory(fp, None)
        except (SyntaxError, IndexError, TypeError, struct.error, ValueError, EOFError) as exc:
            problems.append(f"{fmt}: {type_name(exc)}")  # the message can quote the bytes
    if problems:
        raise DecodeError(f"corrupt image header ({'; '.join(problems)}; {len(data)} bytes)")
    raise DecodeError(_sniff(data))


def _sniff(data: bytes) -> str:
    """Why bytes that no image plugin accepts are not an image, in words."""
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or (
        head.startswith(b"<") and b"<html" in head
    ):
        return "not an image (looks like HTML)"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "not a raster image (looks like SVG, which is not supported)"
    if head.startswith(b"<?xml") or head.startswith(b"<"):
        return "not an image (looks like XML)"
    if head.startswith((b"{", b"[")):
        return "not an image (looks like JSON)"
    if head.startswith(b"%pdf"):
        return "not an image (looks like a PDF document)"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1"):
        return "unsupported image format (HEIC/HEIF)"
    other = _other_pillow_format(data)
    if other:
        return f"unsupported image format ({other})"
    return f"not an image (unrecognised format, {len(data)} bytes)"


def _other_pillow_format(data: bytes) -> str | None:
    """Name of a format Pillow recognises by its signature but that we do not accept, if any."""
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if fmt not in FORMATS and accept is not None:
            try:
                if accept(prefix) is True:
                    return fmt
            except Exception:  # noqa: BLE001 - a plugin's signature test must not fail the decode
                continue
    return None


def _orientation(im: Image.Image) -> Image.Transpose | None:
    """The transpose that EXIF orientation asks for, or None (cheap when there is no EXIF)."""
    if "exif" not in im.info and im.format != "TIFF" and im.format != "PNG":
        return None
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - broken EXIF is common; the pixels are still fine
        return None
    return _ORIENTATION.get(value) if isinstance(value, int) else None


def _draft(im: ImageFile.ImageFile, size: int) -> tuple[float, float, float, float] | None:
    """Let libjpeg decode at the largest 1/2, 1/4, 1/8 scale still >= size; the source box of it."""
    if im.format not in ("JPEG", "MPO"):
        return None
    drafted = im.draft("RGB", (size, size))
    if drafted is None:
        return None
    return drafted[1]


def _to_rgb_or_l(im: Image.Image) -> Image.Image:
    """First frame as RGB, or L for grey (resized as one channel, expanded at the end)."""
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    ):
        return _composite_on_white(im.convert("RGBA"))  # applies a palette / tRNS transparency too
    if mode in ("RGB", "L"):
        return im
    if mode == "P":
        return im.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bit_depth_to_l(im)
    if mode == "1":
        return im.convert("L")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX ...


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float grey to 8 bits by scaling, not clipping (Pillow clips)."""
    arr = np.asarray(im)
    if im.mode == "F":
        top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        out = np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255) + 0.5
    else:
        arr = arr.astype(np.int64)
        top = 65535 if im.mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255
        out = (np.clip(arr, 0, top) * 255 + top // 2) // top
    return Image.fromarray(out.astype(np.uint8), "L")


def _resize(im: Image.Image, size: int, box, resize: str) -> Image.Image:
    if box is None:
        box = (0, 0, im.size[0], im.size[1])
    if resize == "center_crop":
        box = _center_square(box)
    if im.size == (size, size) and box == (0, 0, size, size):
        return im
    return im.resize((size, size), Image.Resampling.BILINEAR, box=box)


def _center_square(box):
    """The centred square of a (left, top, right, bottom) box: short-side resize + crop in one."""
    left, top, right, bottom = box
    side = min(right - left, bottom - top)
    x0 = left + (right - left - side) / 2
    y0 = top + (bottom - top - side) / 2
    return (x0, y0, x0 + side, y0 + side)


def _describe_pillow_error(exc: BaseException, what: str) -> str:
    """The failure in our words: the plugin's message is read to tell truncation from corruption,
    never copied (Pillow's can quote the file's bytes, e.g. a PNG chunk name or a TIFF header)."""
    low = str(exc).lower()
    if "truncated" in low or isinstance(exc, EOFError) or "unexpected end" in low:
        return f"truncated image file ({what})"
    if "broken data stream" in low or isinstance(exc, zlib.error):
        return f"corrupt image data ({what}; {type_name(exc)})"
    return f"cannot decode image ({what}; {type_name(exc)})"


def type_name(exc: BaseException) -> str:
    """`SyntaxError`, `zlib.error`, `struct.error`: the exception's type, readable."""
    kind = type(exc)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
