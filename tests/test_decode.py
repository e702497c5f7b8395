"""decode_image and DecodeAndResize: every corpus case, colours, limits, a never-raises property."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.decode import DecodeError, decode_image, decode_thumbnail
from tests import corpus
from transforms.decode import DecodeAndResize
from transforms.records import FAILURES, STAGE_DECODE, Decoded, Failure, ImageRecord

TOLERANCE = 40  # JPEG and bilinear edges; quadrant/half centres are far from any edge


def _colour_at(pixels, fx, fy):
    s = pixels.shape[0]
    return pixels[int(fy * s), int(fx * s)].astype(int)


@pytest.mark.parametrize("name", sorted(corpus.IMAGE_CASES))
def test_corpus_case(name):
    expect = corpus.EXPECTATIONS[name]
    data = corpus.case_bytes(name)
    if not expect.ok:
        with pytest.raises(DecodeError) as info:
            decode_image(data)
        assert expect.phrase in str(info.value)
        assert "Traceback" not in str(info.value)
        return
    pixels, width, height = decode_image(data)
    assert (width, height) == (expect.width, expect.height)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    for (fx, fy), colour in (expect.colours or {}).items():
        got = _colour_at(pixels, fx, fy)
        assert np.abs(got - colour).max() <= TOLERANCE, f"{name} at {(fx, fy)}: {got} != {colour}"


def test_photo_not_flat_and_matches_plain_pillow():
    """The fast path gives what plain Pillow draft + bilinear resize gives."""
    data = corpus.make_jpeg(640, 480, seed=9)
    pixels, _, _ = decode_image(data, 224)
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (224, 224))
    reference = np.asarray(im.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
    assert pixels.std() > 20
    assert np.abs(pixels.astype(int) - reference).max() <= 2


@pytest.mark.parametrize("size", [1, 32, 224, 384, 500])
def test_output_size(size):
    pixels, w, h = decode_image(corpus.make_jpeg(300, 200, seed=1), image_size=size)
    assert pixels.shape == (size, size, 3) and (w, h) == (300, 200)


def test_center_crop_keeps_the_middle():
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100], a[:, 100:200], a[:, 200:] = corpus.RED, corpus.GREEN, corpus.BLUE
    data = corpus.encode(a, "PNG")
    cropped, w, h = decode_image(data, 64, resize="center_crop")
    squashed, _, _ = decode_image(data, 64)
    assert (w, h) == (300, 100)
    assert np.abs(cropped[2:-2, 2:-2].astype(int) - corpus.GREEN).max() <= 10
    assert np.abs(_colour_at(squashed, 0.1, 0.5) - corpus.RED).max() <= 10
    with pytest.raises(ValueError, match="resize"):
        decode_image(data, resize="letterbox")


def test_center_crop_commutes_with_exif_rotation():
    upright_w, upright_h = corpus.EXIF_STORED_SIZE[1], corpus.EXIF_STORED_SIZE[0]
    pixels, w, h = decode_image(corpus.exif_jpeg(6), 64, resize="center_crop")
    assert (w, h) == (upright_w, upright_h)
    # the upright image is 40 wide, 80 tall: its centre square spans the middle of both halves
    tl, tr, bl, br = corpus.exif_expected_quadrants(6)
    assert np.abs(_colour_at(pixels, 0.25, 0.2) - tl).max() <= TOLERANCE
    assert np.abs(_colour_at(pixels, 0.75, 0.8) - br).max() <= TOLERANCE


def test_pixel_limit_is_per_call_and_leaves_pillow_global_alone(monkeypatch):
    data = corpus.make_jpeg(100, 80)
    with pytest.raises(DecodeError, match="image is 100x80, over the 5000-pixel limit"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=None)[1:] == (100, 80)
    before = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # someone else's global setting
    assert decode_image(data)[1:] == (100, 80)
    assert Image.MAX_IMAGE_PIXELS == 10
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", before)


def test_other_formats_are_named():
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"
    with pytest.raises(DecodeError, match="PDF"):
        decode_image(pdf)
    with pytest.raises(DecodeError, match="JSON"):
        decode_image(b'{"error": "rate limited"}')
    with pytest.raises(DecodeError, match="SVG"):
        decode_image(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>')
    with pytest.raises(DecodeError, match="unsupported image format"):
        decode_image(corpus.encode(corpus.solid(4, 4, corpus.RED), "PPM"))


# ------------------------------------------------------------------------------- the DoFn


def _run(fn, record):
    outputs = list(fn.process(record))
    assert len(outputs) == 1
    return outputs[0]


def test_dofn_result_and_failure():
    fn = DecodeAndResize(image_size=32)
    out = _run(fn, ImageRecord("k", "s", corpus.make_jpeg(64, 48)))
    assert isinstance(out, Decoded) and out.pixels.shape == (32, 32, 3)
    assert (out.key, out.source, out.width, out.height) == ("k", "s", 64, 48)
    out = _run(fn, ImageRecord("bad", "src", corpus.HTML_PAGE))
    assert out.tag == FAILURES
    assert out.value == Failure(
        "bad", "src", STAGE_DECODE, "DecodeError: not an image (looks like HTML)"
    )


def test_dofn_turns_unexpected_exceptions_into_failures():
    out = _run(DecodeAndResize(), ImageRecord("k", "s", None))  # not even bytes
    assert out.tag == FAILURES and out.value.stage == STAGE_DECODE and "\n" not in out.value.error


_FN = DecodeAndResize(image_size=16)
_FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(st.binary(max_size=2048))
def test_dofn_never_raises_on_random_bytes(data):
    out = _run(_FN, ImageRecord("k", "s", data))
    assert isinstance(out, Decoded) or out.tag == FAILURES


@st.composite
def encoded_images(draw):
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "LA", "CMYK", "I;16", "1"]))
    fmt = draw(st.sampled_from(["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]))
    seed = draw(st.integers(0, 2**16))
    im = Image.fromarray(corpus.photo_like(w, h, seed)).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        im = Image.fromarray((np.asarray(im, np.uint16) * 257).astype(np.uint16))
    buf = io.BytesIO()
    try:
        im.save(buf, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode: save as PNG
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "PNG")
    return buf.getvalue(), w, h


@_FAST
@given(encoded_images(), st.integers(0, 3), st.integers(0, 255))
def test_dofn_never_raises_on_valid_and_damaged_images(image, damage, byte):
    data, w, h = image
    if damage == 0:  # valid: must decode to the right size
        out = _run(_FN, ImageRecord("k", "s", data))
        assert isinstance(out, Decoded), out
        assert (out.width, out.height) == (w, h) and out.pixels.shape == (16, 16, 3)
        return
    if damage == 1:
        data = data[: len(data) * byte // 256]
    elif damage == 2:
        position = len(data) * byte // 256
        data = data[:position] + bytes([data[position] ^ 0x5A]) + data[position + 1 :]
    else:
        data = data[: len(data) // 2] + bytes(range(byte))
    out = _run(_FN, ImageRecord("k", "s", data))
    assert isinstance(out, Decoded) or out.tag == FAILURES


# ------------------------------------------------------------------------------- privacy

SECRET = b"S3CRETxTOKENq9Zw-hunter2"
# Bytes that look like the start of an image (so a plugin's parser reads on), then the secret.
_DISGUISES = {
    "text file": b"",
    "TIFF header": b"II*\x00",
    "big-endian TIFF": b"MM\x00*",
    "PNG chunk name": b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0d",
    "PNG IHDR body": b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    "JPEG": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    "GIF": b"GIF89a",
    "BMP": b"BM",
    "WebP": b"RIFF\x40\x00\x00\x00WEBPVP8 ",
    "HEIC": b"\x00\x00\x00\x18ftypheic",
    "AVIF": b"\x00\x00\x00\x18ftypavif",
}


def _leaks(text: str, secret: bytes = SECRET) -> bool:
    """Whether `text` holds a piece of `secret`: 5 characters of it, or 4 bytes of it in hex."""
    flat = text.replace(" ", "").replace("\\x", "").lower()
    pieces = [secret[i : i + 5].decode() for i in range(len(secret) - 4)]
    hex_pieces = [secret[i : i + 4].hex() for i in range(len(secret) - 3)]
    return any(p in text for p in pieces) or any(h in flat for h in hex_pieces)


@pytest.mark.parametrize("disguise", sorted(_DISGUISES))
def test_failure_messages_never_quote_the_file(disguise):
    """A text file named .jpg (a symlink to a config file, say) must not leak into the failures
    file: the message names the problem, the format and the size, never the bytes."""
    data = _DISGUISES[disguise] + SECRET * 3 + b"\n"
    out = _run(DecodeAndResize(image_size=16), ImageRecord("k", "s", data))
    assert out.tag == FAILURES
    error = out.value.error
    assert not _leaks(error), error
    assert f"{len(data)} bytes" in error or "looks like" in error or "HEIC" in error, error


@_FAST
@given(st.sampled_from(sorted(_DISGUISES)), st.binary(min_size=8, max_size=64))
def test_failure_messages_never_quote_random_content(disguise, secret):
    data = _DISGUISES[disguise] + secret
    out = _run(_FN, ImageRecord("k", "s", data))
    if not isinstance(out, Decoded):
        flat = out.value.error.replace(" ", "").lower()
        assert secret.hex() not in flat
        printable = secret.decode("latin-1")
        if printable.isprintable() and printable.strip():
            assert printable not in out.value.error


def test_decode_errors_name_format_and_size():
    data = corpus.make_png(64, 48)
    cut = data[: len(data) // 2]
    with pytest.raises(DecodeError, match=rf"^truncated image file \(PNG, {len(cut)} bytes\)$"):
        decode_image(cut)
    with pytest.raises(DecodeError, match=r"^not an image \(unrecognised format, 5 bytes\)$"):
        decode_image(b"\x01\x02\x03\x04\x05")


def test_unexpected_errors_name_only_their_type(monkeypatch):
    import transforms.decode as decode

    def boom(*args, **kwargs):
        raise KeyError(SECRET.decode())

    monkeypatch.setattr(decode, "decode_image", boom)
    out = decode.decode_record(ImageRecord("k", "s", b"x"))
    assert out.error == "DecodeError: cannot decode image (KeyError)"


# ------------------------------------------------------------------------------- HEIC, AVIF


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_and_web_photos_decode_upright(fmt):
    for orientation in range(1, 9):
        w, h = corpus.EXIF_STORED_SIZE
        pixels, width, height = decode_image(corpus.exif_photo(orientation, fmt), 64)
        assert (width, height) == ((h, w) if orientation >= 5 else (w, h)), orientation
        expected = corpus.exif_expected_quadrants(orientation)
        for (fx, fy), colour in zip(
            ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)), expected
        ):
            got = _colour_at(pixels, fx, fy)
            assert np.abs(got - colour).max() <= TOLERANCE, (fmt, orientation, (fx, fy), got)


def test_damaged_heic_is_a_decode_failure():
    data = corpus.heic(corpus.photo_like(64, 48))
    for cut in (len(data) // 2, 40):
        with pytest.raises(DecodeError) as info:
            decode_image(data[:cut])
        assert "HEIF" in str(info.value) or "bytes" in str(info.value)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_thumbnails_keep_the_aspect_ratio_upright_and_never_grow(orientation):
    data = corpus.exif_jpeg(orientation)
    _, width, height = decode_image(data)
    thumb = decode_thumbnail(data, max_side=40)
    assert thumb.dtype == np.uint8 and max(thumb.shape[:2]) == 40
    assert (thumb.shape[1] > thumb.shape[0]) == (width > height)
    assert decode_thumbnail(data, max_side=1000).shape[:2] == (height, width)


def test_thumbnails_of_big_photos_are_drafted_and_checked_like_decoding():
    thumb = decode_thumbnail(corpus.make_jpeg(2000, 1000, seed=3), max_side=256)
    assert thumb.shape == (128, 256, 3)
    with pytest.raises(DecodeError, match="pixel limit"):
        decode_thumbnail(corpus.bomb_png())
    with pytest.raises(DecodeError, match="not an image"):
        decode_thumbnail(b"<html></html>")
