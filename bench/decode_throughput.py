"""Decode-and-resize throughput: `decode_image` against plain Pillow draft + resize.

    .venv/bin/python bench/decode_throughput.py [--images 500] [--rounds 7] [--size 224]

500 photo-like 640x480 JPEGs (quality 90, random crops of scikit-image's sample photos) are decoded
and resized to S x S. Single core: the process is pinned to one CPU, and the baseline and ours run
in alternating rounds (order swapped each round); medians are reported, target ratio >= 0.9. Then
the same work on 2 cores through a thread pool and a process pool (workers return only the shape, so
the pool numbers measure decoding, not pickling 150 kB arrays back).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import alternating, median, result_line, sample_photos, seconds, table
from core.decode import decode_image

# Colour photos, the smaller ones upscaled to crop 640x480 from.
PHOTOS = (
    *("astronaut", "coffee", "chelsea", "rocket"),
    *("immunohistochemistry", "hubble_deep_field", "retina"),
)
_IMAGES: list[bytes] = []
_SIZE = 224


def large_photos() -> list[np.ndarray]:
    """scikit-image's bundled colour photos, upscaled where needed so 640x480 crops exist."""
    photos = []
    for photo in sample_photos(PHOTOS):
        im = Image.fromarray(photo)
        scale = max(640 / im.width, 480 / im.height, 1.0)
        size = (round(im.width * scale) + 1, round(im.height * scale) + 1)
        photos.append(np.asarray(im.resize(size, Image.BICUBIC) if scale > 1.0 else im))
    return photos


def make_images(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    photos = large_photos()
    if not photos:
        from tests.corpus import photo_like

        photos = [photo_like(800, 600, seed=i) for i in range(4)]
    images = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        y = rng.integers(0, photo.shape[0] - 480 + 1)
        x = rng.integers(0, photo.shape[1] - 640 + 1)
        crop = photo[y : y + 480, x : x + 640]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
    return images


def baseline(data: bytes, size: int = 224) -> np.ndarray:
    """Plain Pillow: open, draft, bilinear resize, to NumPy."""
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (size, size))
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))


def ours(data: bytes, size: int = 224) -> np.ndarray:
    return decode_image(data, size)[0]


def _rate(fn, images, size) -> float:
    start = time.perf_counter()
    for data in images:
        fn(data, size)  # results dropped at once: decoding, not holding 500 arrays, is timed
    return len(images) / (time.perf_counter() - start)


def _init(images, size):
    global _IMAGES, _SIZE
    _IMAGES, _SIZE = images, size


def _decode_index(i: int):
    return decode_image(_IMAGES[i], _SIZE)[0].shape


def pool_rate(kind: str, images, size, workers: int, rounds: int) -> float:
    """Median images/s of decode_image over `workers` threads or processes."""
    if kind == "thread":
        _init(images, size)
        pool = ThreadPoolExecutor(workers)
    else:
        pool = ProcessPoolExecutor(workers, initializer=_init, initargs=(images, size))
    with pool:
        list(pool.map(_decode_index, range(min(len(images), 4 * workers))))  # start workers
        decode_all = lambda: list(pool.map(_decode_index, range(len(images)), chunksize=16))
        return median(len(images) / seconds(decode_all) for _ in range(rounds))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    images = make_images(args.images)
    print(
        f"{len(images)} JPEGs 640x480 q90, "
        f"mean {np.mean([len(d) for d in images]) / 1024:.0f} KiB; "
        f"target {args.size}x{args.size}; Pillow {Image.__version__}"
    )
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})  # one pinned core, alternating rounds after a warm-up
    paths = {"Pillow draft + resize (baseline)": baseline, "decode_image": ours}
    rates = alternating(
        {n: lambda f=f: _rate(f, images, args.size) for n, f in paths.items()}, args.rounds, 1
    )
    os.sched_setaffinity(0, set(cpus))
    base, mine = (median(v) for v in rates.values())
    print(f"\nsingle core, {args.rounds} alternating rounds, medians")
    table(["path", "images/s"], [(n, f"{median(v):.1f}") for n, v in rates.items()])
    result_line("decode_throughput", mine / base, 0.9)

    pool_rounds = max(3, args.rounds // 2)
    print(f"\n{args.workers} workers, decode_image, medians of {pool_rounds} rounds")
    for kind in ("thread", "process"):
        rate = pool_rate(kind, images, args.size, args.workers, pool_rounds)
        print(f"{kind} pool {rate:10.1f}")  # run_all.py reads these lines


if __name__ == "__main__":
    main()
