"""Generated good and broken inputs, and the writers other tests reuse.

Writers:   `write_tfrecord(path, records)`, `make_example(...)`, `write_webdataset(path, samples)`,
           `write_tar(path, members)` (files, links, folders; any name).
Images:    `make_jpeg(w, h, seed)`, `make_png(w, h, seed)`, `photo_like(w, h, seed)`,
           `quadrants(...)`, `exif_photo(orientation, fmt)` (JPEG, AVIF, HEIF), `heic(array)`.
Damage:    `truncate_file`, `patch_file`, `set_tar_header_field`, `tar_layout(path)` (where each
           member is), `fifo_unblocked_after(path, seconds)`.
Corpus:    `IMAGE_CASES` (name -> (file name, bytes factory)), `EXPECTATIONS` (name -> `Expect`),
           `write_image_corpus(directory)` -> {name: path}.
Shards:    `write_shard_corpus(directory)` -> `ShardCorpus` (paths plus what reading must give).
Results:   `write_results_keys(path, keys)`: a results file of the job holding only keys.

Everything is built from code (no binary fixtures) and is deterministic.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tarfile
import threading
import zlib
from typing import Callable, Iterable, NamedTuple, Optional

import numpy as np
from PIL import Image

# ------------------------------------------------------------------------------------- images

# Upright quadrant colours (top-left, top-right, bottom-left, bottom-right), far apart in RGB.
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
QUADRANT_COLOURS = (RED, GREEN, BLUE, YELLOW)


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB content with fine noise: compresses like a photo, not a flat colour."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(
        0, 256, size=(max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8
    )
    smooth = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16
    )
    noise = rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def encode(array_or_image, fmt: str, **params) -> bytes:
    image = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(array_or_image)
    )
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def make_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    return encode(photo_like(width, height, seed), "JPEG", quality=quality)


def make_png(width: int, height: int, seed: int = 0) -> bytes:
    return encode(photo_like(width, height, seed), "PNG")


def photo_set(count: int, seed: int = 0) -> dict:
    """{name: (ext, bytes)}: `count` small photo-like images of varied sizes, every third a PNG."""
    images = {}
    for i in range(count):
        name, s = f"img{i:03d}", seed + i
        if i % 3 == 2:
            images[name] = ("png", make_png(48 + 8 * i, 40 + 4 * i, seed=s))
        else:
            images[name] = ("jpg", make_jpeg(64 + 8 * i, 48 + 4 * i, seed=s))
    return images


def solid(width: int, height: int, colour) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (height, width, 3)).copy()


def quadrants(width: int, height: int, colours=QUADRANT_COLOURS) -> np.ndarray:
    """An image whose four quadrants have the given colours (TL, TR, BL, BR)."""
    a = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    a[:h, :w], a[:h, w:], a[h:, :w], a[h:, w:] = colours
    return a


# EXIF orientation -> what a viewer does to the stored pixels to show them upright (EXIF 2.3 spec,
# written with NumPy so the test does not share the decoder's table).
EXIF_UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise to view
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
    8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise to view
}
EXIF_STORED_SIZE = (80, 40)  # width, height: non-square so 5-8 swap the reported size


def exif_jpeg(orientation: int) -> bytes:
    return exif_photo(orientation, "JPEG")


def exif_photo(orientation: int, fmt: str) -> bytes:
    """The quadrants image stored as EXIF_STORED_SIZE with an EXIF orientation, as a camera or a
    phone writes it: JPEG, AVIF (Pillow keeps the tag) or HEIF (pillow-heif stores the
    orientation as the container's rotation/mirror, which readers apply)."""
    w, h = EXIF_STORED_SIZE
    exif = Image.Exif()
    exif[0x0112] = orientation
    params = {"subsampling": 0} if fmt == "JPEG" else {}
    if fmt == "HEIF":
        register_heif()
    return encode(quadrants(w, h), fmt, quality=95, exif=exif.tobytes(), **params)


def register_heif() -> None:
    """pillow-heif's HEIF plugin in Pillow (to write HEIC test photos with the library the job
    reads them with)."""
    import pillow_heif

    pillow_heif.register_heif_opener()


def heic(array, **params) -> bytes:
    register_heif()
    return encode(array, "HEIF", **params)


def exif_expected_quadrants(orientation: int) -> tuple:
    """Colours at the centres of the TL, TR, BL, BR quadrants of the upright image."""
    w, h = EXIF_STORED_SIZE
    up = EXIF_UPRIGHT[orientation](quadrants(w, h))
    uh, uw = up.shape[:2]
    return tuple(
        tuple(int(v) for v in up[y, x])
        for y, x in (
            (uh // 4, uw // 4),
            (uh // 4, 3 * uw // 4),
            (3 * uh // 4, uw // 4),
            (3 * uh // 4, 3 * uw // 4),
        )
    )


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose (valid-CRC) IHDR claims width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def cmyk_jpeg() -> bytes:
    """Left half pure red in CMYK (C0 M255 Y255 K0), right half pure blue (C255 M255 Y0 K0)."""
    a = np.zeros((32, 64, 4), np.uint8)
    a[:, :32] = (0, 255, 255, 0)
    a[:, 32:] = (255, 255, 0, 0)
    return encode(Image.fromarray(a, "CMYK"), "JPEG", quality=95)


def png16() -> bytes:
    """16-bit grey: left half 65535 (-> 255), right half 128 * 257 (-> 128)."""
    a = np.zeros((16, 32), np.uint16)
    a[:, :16] = 65535
    a[:, 16:] = 128 * 257
    return encode(Image.fromarray(a), "PNG")  # uint16 -> mode I;16


def png16_rgb() -> bytes:
    """16-bit RGB PNG (written by hand: Pillow cannot save it): pure (65535, 32896, 0)."""
    w, h = 8, 4
    row = b"\x00" + struct.pack(">HHH", 65535, 128 * 257, 0) * w
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(row * h))
        + png_chunk(b"IEND", b"")
    )


def palette_transparent_png() -> bytes:
    """Palette image: left half index 0 (transparent red), right half index 1 (opaque blue)."""
    a = np.zeros((16, 32), np.uint8)
    a[:, 16:] = 1
    im = Image.fromarray(a, "P")
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    return encode(im, "PNG", transparency=0)


def rgba_png() -> bytes:
    """Left half fully transparent (-> white), right half opaque green."""
    a = np.zeros((16, 32, 4), np.uint8)
    a[:, :16] = (0, 0, 0, 0)
    a[:, 16:] = (0, 255, 0, 255)
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def animated_gif() -> bytes:
    """Frame 0 red, frame 1 blue: the decoder must return red."""
    frames = [Image.fromarray(solid(32, 24, c)).convert("P") for c in (RED, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def multipage_tiff() -> bytes:
    """Page 0 green (40x30), page 1 blue and a different size."""
    pages = [Image.fromarray(solid(40, 30, GREEN)), Image.fromarray(solid(20, 20, BLUE))]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
    b"<body><h1>Not Found</h1><p>The requested URL was not found.</p></body></html>\n"
)


class Expect(NamedTuple):
    """What decoding a case gives: a result (width, height, colours) or failure (stage, phrase)."""

    ok: bool
    width: Optional[int] = None
    height: Optional[int] = None
    stage: Optional[str] = None
    phrase: Optional[str] = None  # must appear in the failure's error text
    colours: Optional[dict] = None  # {(x_frac, y_frac): (r, g, b)} in the resized output


def ok(width, height, colours=None) -> Expect:
    return Expect(True, width, height, colours=colours)


def fail(stage, phrase) -> Expect:
    return Expect(False, stage=stage, phrase=phrase)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


L, R = (0.25, 0.5), (0.75, 0.5)  # sample points: left and right half centres

# name -> (file name, bytes factory). Files and shards built from these must give the same outcome.
IMAGE_CASES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "zero_bytes": ("zero_bytes.jpg", lambda: b""),
    "random_bytes": ("random_bytes.jpg", lambda: np.random.default_rng(1).bytes(5000)),
    "html_page": ("html_page.jpg", lambda: HTML_PAGE),
    "truncated_jpeg": ("truncated_jpeg.jpg", lambda: _half(make_jpeg(256, 192, seed=3))),
    "truncated_png": ("truncated_png.png", lambda: _half(make_png(128, 96, seed=4))),
    "bomb_png": ("bomb_png.png", bomb_png),
    "cmyk_jpeg": ("cmyk_jpeg.jpg", cmyk_jpeg),
    "png16_grey": ("png16_grey.png", png16),
    "png16_rgb": ("png16_rgb.png", png16_rgb),
    "grey_png": (
        "grey_png.png",
        lambda: encode(Image.fromarray(np.full((10, 20), 77, np.uint8)), "PNG"),
    ),
    "grey_jpeg": (
        "grey_jpeg.jpg",
        lambda: encode(Image.fromarray(np.full((30, 50), 200, np.uint8)), "JPEG", quality=95),
    ),
    "palette_transparent": ("palette_transparent.png", palette_transparent_png),
    "rgba_png": ("rgba_png.png", rgba_png),
    "animated_gif": ("animated_gif.gif", animated_gif),
    "webp": ("webp.webp", lambda: encode(solid(30, 20, BLUE), "WEBP", lossless=True)),
    "bmp": ("bmp.bmp", lambda: encode(solid(21, 13, RED), "BMP")),
    "multipage_tiff": ("multipage_tiff.tiff", multipage_tiff),
    "one_pixel": ("one_pixel.png", lambda: encode(solid(1, 1, GREEN), "PNG")),
    "wide_10000x10": ("wide_10000x10.jpg", lambda: make_jpeg(10_000, 10, seed=5)),
    "photo_jpeg": ("photo_jpeg.jpg", lambda: make_jpeg(640, 480, seed=6)),
    **{f"exif_{o}": (f"exif_{o}.jpg", (lambda o=o: exif_jpeg(o))) for o in range(1, 9)},
    # Photos as phones and the web have them: HEIC and AVIF, upright and turned.
    "heic_photo": ("heic_photo.heic", lambda: heic(photo_like(64, 48, seed=7), quality=90)),
    "avif_photo": ("avif_photo.avif", lambda: encode(photo_like(64, 48, seed=8), "AVIF")),
    **{
        f"{fmt.lower()}_exif_{o}": (
            f"{fmt.lower()}_exif_{o}.{ext}",
            (lambda o=o, fmt=fmt: exif_photo(o, fmt)),
        )
        for fmt, ext in (("HEIF", "heic"), ("AVIF", "avif"))
        for o in (3, 6, 8)
    },
}


def _exif_expect(o: int) -> Expect:
    w, h = EXIF_STORED_SIZE
    if o >= 5:
        w, h = h, w
    tl, tr, bl, br = exif_expected_quadrants(o)
    return ok(w, h, {(0.25, 0.25): tl, (0.75, 0.25): tr, (0.25, 0.75): bl, (0.75, 0.75): br})


EXPECTATIONS: dict[str, Expect] = {
    "zero_bytes": fail("decode", "empty file (0 bytes)"),
    "random_bytes": fail("decode", "not an image"),
    "html_page": fail("decode", "looks like HTML"),
    "truncated_jpeg": fail("decode", "truncated image file"),
    "truncated_png": fail("decode", "truncated image file"),
    "bomb_png": fail("decode", "image is 100000x100000, over the 178956970-pixel limit"),
    "cmyk_jpeg": ok(64, 32, {L: RED, R: BLUE}),
    "png16_grey": ok(32, 16, {L: (255, 255, 255), R: (128, 128, 128)}),
    "png16_rgb": ok(8, 4, {L: (255, 128, 0), R: (255, 128, 0)}),
    "grey_png": ok(20, 10, {L: (77, 77, 77)}),
    "grey_jpeg": ok(50, 30, {L: (200, 200, 200)}),
    "palette_transparent": ok(32, 16, {L: (255, 255, 255), R: BLUE}),
    "rgba_png": ok(32, 16, {L: (255, 255, 255), R: GREEN}),
    "animated_gif": ok(32, 24, {L: RED, R: RED}),
    "webp": ok(30, 20, {L: BLUE}),
    "bmp": ok(21, 13, {L: RED}),
    "multipage_tiff": ok(40, 30, {L: GREEN, R: GREEN}),
    "one_pixel": ok(1, 1, {L: GREEN}),
    "wide_10000x10": ok(10_000, 10),
    "photo_jpeg": ok(640, 480),
    **{f"exif_{o}": _exif_expect(o) for o in range(1, 9)},
    "heic_photo": ok(64, 48),
    "avif_photo": ok(64, 48),
    **{f"{fmt}_exif_{o}": _exif_expect(o) for fmt in ("heif", "avif") for o in (3, 6, 8)},
}
assert EXPECTATIONS.keys() == IMAGE_CASES.keys()


def case_bytes(name: str) -> bytes:
    return IMAGE_CASES[name][1]()


def write_image_corpus(directory: str, names: Iterable[str] = None) -> dict[str, str]:
    """Write the image cases as files; {case name: path}."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name in names or IMAGE_CASES:
        file_name, factory = IMAGE_CASES[name]
        paths[name] = os.path.join(directory, file_name)
        with open(paths[name], "wb") as f:
            f.write(factory())
    return paths


# ------------------------------------------------------------------------------------- TFRecord


def _masked_crc32c(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
    """One TFRecord record with correct masked CRC-32C of the length and of the data."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", _masked_crc32c(length))
        + data
        + struct.pack("<I", _masked_crc32c(data))
    )


def make_example(
    image: Optional[bytes],
    key: Optional[str] = None,
    key_feature: str = "image/encoded",
    key_name: str = "image/key",
    **extra,
) -> bytes:
    """A serialized tf.train.Example: image bytes under key_feature, key under key_name, extra
    bytes/str features under their names (names with '/' can be passed through a dict: **{...})."""
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    feature = example.features.feature
    if image is not None:
        feature[key_feature].bytes_list.value.append(image)
    if key is not None:
        feature[key_name].bytes_list.value.append(key.encode())
    for name, value in extra.items():
        feature[name].bytes_list.value.append(value.encode() if isinstance(value, str) else value)
    return example.SerializeToString()


def write_tfrecord(path: str, records: Iterable) -> list[int]:
    """Write serialized records (bytes), or (key, image bytes) pairs turned into Examples.

    Returns the byte offset of each record (for corruption tests)."""
    offsets, position = [], 0
    with open(path, "wb") as f:
        for record in records:
            if isinstance(record, tuple):
                record = make_example(record[1], key=record[0])
            frame = tfrecord_frame(record)
            offsets.append(position)
            f.write(frame)
            position += len(frame)
    return offsets


# ------------------------------------------------------------------------------------- WebDataset


def write_webdataset(path: str, samples: Iterable, ext: str = "jpg") -> list[int]:
    """Write a WebDataset tar from (key, image bytes) -> KEY.<ext>, or (key, {ext: bytes}) samples.

    Returns the byte offset of each member header."""
    offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            if isinstance(members, (bytes, bytearray)):
                members = {ext: members}
            for member_ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{member_ext}" if member_ext else key)
                info.size = len(data)
                info.mtime = 1_700_000_000
                offsets.append(tar.offset)
                tar.addfile(info, io.BytesIO(data))
    return offsets


def truncate_file(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def patch_file(path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes at `offset` (damage for the shard tests)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@contextlib.contextmanager
def fifo_unblocked_after(path: str, seconds: float):
    """Within the block, a reader left waiting on the FIFO at `path` gets end of file after
    `seconds` (a writer opens and closes it), so a test of code that must never open a FIFO fails
    instead of hanging when that code does."""
    done = threading.Event()

    def unblock():
        while not done.wait(seconds):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader waiting (ENXIO), or gone
                pass

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


class TarMember(NamedTuple):
    """Where one member of a tar is (tarfile in random-access mode, independent of the reader)."""

    name: str
    header: int  # offset of its (first) header block
    data: int  # offset of its data
    size: int
    end: int  # end of its data padded to 512 bytes (the next header)


def tar_layout(path: str) -> tuple[list, int]:
    """The members of a tar file and the offset of its end-of-archive marker."""
    with tarfile.open(path) as tar:
        members = [
            TarMember(
                m.name, m.offset, m.offset_data, m.size, m.offset_data + -(-m.size // 512) * 512
            )
            for m in tar.getmembers()
        ]
    return members, members[-1].end


def set_tar_header_field(path: str, header: int, start: int, value: bytes) -> None:
    """Write `value` into a ustar header field and fix the header's checksum (a well-formed header
    with a bad value, unlike damage, which the checksum catches)."""
    with open(path, "r+b") as f:
        f.seek(header)
        block = bytearray(f.read(512))
        block[start : start + len(value)] = value
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        f.seek(header)
        f.write(block)


def write_tar(path: str, members: Iterable, format=tarfile.USTAR_FORMAT) -> None:
    """A tar of (name, bytes) files, (name, ("hard" | "symbolic", target)) links and (name, None)
    folders, in order; names may be str with surrogates (bytes that are not UTF-8)."""
    with tarfile.open(path, "w", format=format, encoding="utf-8", errors="surrogateescape") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, tuple):
                kind, info.linkname = content
                info.type = tarfile.LNKTYPE if kind == "hard" else tarfile.SYMTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


# ------------------------------------------------------------------------------------- shards


class ShardCorpus(NamedTuple):
    """Broken shards and what reading them must give."""

    paths: dict  # name -> path
    records: dict  # expected record key -> its source
    failures: dict  # expected failure key -> phrase of its error (stage "read")


def _img(seed: int) -> bytes:
    return make_jpeg(48, 32, seed=seed)


def write_shard_corpus(directory: str) -> ShardCorpus:
    """Broken and tricky shards.

    Bad CRC in the middle, truncated TFRecord, Example without the image, truncated tar, tar with
    non-image members, the same key twice (within and across shards), tar link members, a damaged
    header after a long name, a tar member name that is not UTF-8.
    """
    os.makedirs(directory, exist_ok=True)
    p = {
        name: os.path.join(directory, file_name)
        for name, file_name in (
            ("bad_crc", "bad_crc.tfrecord"),
            ("truncated_tfrecord", "truncated.tfrecord"),
            ("missing_feature", "missing_feature.tfrecord"),
            ("truncated_tar", "truncated.tar"),
            ("non_image_tar", "non_image.tar"),
            ("dup_a", "dup-00000-of-00002"),
            ("dup_b", "dup-00001-of-00002"),
            ("links_tar", "links.tar"),
            ("long_name_tar", "long_name.tar"),
            ("latin1_tar", "latin1.tar"),
        )
    }
    records, failures = {}, {}

    def src(name, where):
        return f"{p[name]}:{where}"

    # bad CRC in the middle: records 0, 1 kept, record 2 corrupt -> one failure, 3 and 4 lost.
    offsets = write_tfrecord(p["bad_crc"], [(f"crc{i}", _img(i)) for i in range(5)])
    with open(p["bad_crc"], "r+b") as f:
        f.seek(offsets[2] + 12 + 20)
        byte = f.read(1)
        f.seek(offsets[2] + 12 + 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    records.update({"crc0": src("bad_crc", 0), "crc1": src("bad_crc", 1)})
    failures[f"{p['bad_crc']}:2"] = (
        f"corrupt TFRecord at byte {offsets[2]} of {p['bad_crc']}: data CRC mismatch"
    )

    # truncated TFRecord: the last of 3 records cut in its data.
    offsets = write_tfrecord(p["truncated_tfrecord"], [(f"tr{i}", _img(10 + i)) for i in range(3)])
    truncate_file(p["truncated_tfrecord"], offsets[2] + 12 + 100)
    records.update({"tr0": src("truncated_tfrecord", 0), "tr1": src("truncated_tfrecord", 1)})
    failures[f"{p['truncated_tfrecord']}:2"] = (
        f"corrupt TFRecord at byte {offsets[2]} of {p['truncated_tfrecord']}: truncated record"
    )

    # an Example without the image feature (record 1), and one without any key feature (record 2).
    write_tfrecord(
        p["missing_feature"],
        [
            make_example(_img(20), key="mf0"),
            make_example(None, key="mf1", **{"image/format": "jpeg"}),
            make_example(_img(22)),
        ],
    )
    records.update(
        {"mf0": src("missing_feature", 0), src("missing_feature", 2): src("missing_feature", 2)}
    )
    failures["mf1"] = "no 'image/encoded' bytes feature (features: image/format, image/key)"

    # truncated tar: 4 samples (jpg + json), cut inside sample 2's image.
    offsets = write_webdataset(
        p["truncated_tar"], [(f"tt{i}", {"jpg": _img(30 + i), "json": b"{}"}) for i in range(4)]
    )
    truncate_file(p["truncated_tar"], offsets[4] + 512 + 100)
    records.update({"tt0": src("truncated_tar", "tt0.jpg"), "tt1": src("truncated_tar", "tt1.jpg")})
    failures[f"{p['truncated_tar']}:2"] = (
        f"truncated tar at byte {offsets[4]} of {p['truncated_tar']}"
    )

    # non-image members: a json+txt-only sample fails, a member without a key is ignored.
    write_webdataset(
        p["non_image_tar"],
        [
            ("dir/ni0", {"jpg": _img(40), "json": b"{}", "txt": b"caption"}),
            ("dir/ni1", {"json": b"{}", "txt": b"caption"}),
            ("README", {"": b"no key here"}),
            ("dir/ni2", {"png": make_png(20, 10, seed=41)}),
        ],
    )
    records.update(
        {
            "dir/ni0": src("non_image_tar", "dir/ni0.jpg"),
            "dir/ni2": src("non_image_tar", "dir/ni2.png"),
        }
    )
    failures["dir/ni1"] = "no image member; members: ni1.json, ni1.txt"

    # duplicates: "dup" twice in shard a (records 0 and 2) and once in shard b; "cross" in a and b.
    write_tfrecord(p["dup_a"], [("dup", _img(50)), ("cross", _img(51)), ("dup", _img(52))])
    write_tfrecord(p["dup_b"], [("dup", _img(53)), ("cross", _img(54)), ("solo", _img(55))])
    records.update({"dup": src("dup_a", 0), "cross": src("dup_a", 1), "solo": src("dup_b", 2)})

    # link members: resolved inside the shard, or failures; never silently gone.
    write_tar(
        p["links_tar"],
        [
            ("lk0.jpg", _img(60)),
            ("lk0.json", b"{}"),
            ("lk1.jpg", ("hard", "lk0.jpg")),
            ("sub/lk2.jpg", ("symbolic", "../lk0.jpg")),
            ("lk3.jpg", ("symbolic", "../../etc/hosts")),
        ],
    )
    records.update(
        {
            "lk0": src("links_tar", "lk0.jpg"),
            "lk1": src("links_tar", "lk1.jpg"),
            "sub/lk2": src("links_tar", "sub/lk2.jpg"),
        }
    )
    failures["lk3"] = "TarLinkError: symbolic link lk3.jpg -> ../../etc/hosts points outside"

    # a damaged header after a GNU long name: tarfile raises, and the sample before must stay.
    write_tar(
        p["long_name_tar"],
        [("ln0.jpg", _img(70)), ("d" * 110 + "/ln1.jpg", _img(71))],
        format=tarfile.GNU_FORMAT,
    )
    members, _ = tar_layout(p["long_name_tar"])
    patch_file(p["long_name_tar"], members[1].data - 512 + 3, b"\x7f")  # the real header
    records["ln0"] = src("long_name_tar", "ln0.jpg")
    failures[f"{p['long_name_tar']}:1"] = (
        f"corrupt or truncated tar at byte {members[1].header} of {p['long_name_tar']}"
    )

    # a member name that is not UTF-8 (Latin-1 e-acute): an escaped, lossless key.
    write_tar(p["latin1_tar"], [(os.fsdecode(b"caf\xe9.jpg"), _img(80))])
    records["caf%E9"] = src("latin1_tar", "caf%E9.jpg")
    return ShardCorpus(p, records, failures)


# ------------------------------------------------------------------------------------ results


def write_results_keys(path, keys, row_group_size: Optional[int] = None, chunk: int = 1 << 20):
    """A results file with the job's results schema and footer (a 1-d zero embedding), holding
    `keys` and nulls elsewhere: what `--skip_keys_from` reads, at a fraction of a real file's size.
    `keys` may be an iterator; it is written `chunk` rows at a time (big files, flat memory)."""
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.schema import results_schema

    schema = results_schema(1, metadata={"image_size": "32", "embedding_dtype": "float32"})
    keys = iter(keys)
    with pq.ParquetWriter(path if hasattr(path, "write") else str(path), schema) as writer:
        while True:
            part = list(itertools.islice(keys, chunk))
            zeros = pa.array(np.zeros(len(part), np.float32))
            columns = [
                pa.array(part, pa.string())
                if f.name == "key"
                else pa.FixedSizeListArray.from_arrays(zeros, 1)
                if f.name == "embedding"
                else pa.nulls(len(part), f.type)
                for f in schema
            ]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema), row_group_size)
            if len(part) < chunk:
                return
