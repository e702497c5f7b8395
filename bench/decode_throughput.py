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
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import sample_photos  # noqa: E402
from transforms.decode import decode_image  # noqa: E402

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
        if scale > 1.0:
            im = im.resize(
                (round(im.width * scale) + 1, round(im.height * scale) + 1), Image.BICUBIC
            )
        photos.append(np.asarray(im))
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
        fn(data, size)
    return len(images) / (time.perf_counter() - start)


def single_core(images, size, rounds):
    """Alternating rounds on one pinned core; (baseline rates, ours rates)."""
    rates = {"baseline": [], "ours": []}
    fns = [("baseline", baseline), ("ours", ours)]
    _rate(baseline, images[:50], size), _rate(ours, images[:50], size)  # warm up
    for r in range(rounds):
        for name, fn in fns if r % 2 == 0 else fns[::-1]:
            rates[name].append(_rate(fn, images, size))
    return rates


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
        rates = []
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(_decode_index, range(len(images)), chunksize=16))
            rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates)


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
    os.sched_setaffinity(0, {cpus[-1]})
    rates = single_core(images, args.size, args.rounds)
    os.sched_setaffinity(0, set(cpus))
    base, mine = statistics.median(rates["baseline"]), statistics.median(rates["ours"])
    print(f"\nsingle core, {args.rounds} alternating rounds, medians")
    print(f"{'path':<34}{'images/s':>10}")
    print(f"{'Pillow draft + resize (baseline)':<34}{base:>10.1f}")
    print(f"{'decode_image':<34}{mine:>10.1f}")
    print(f"{'ratio (target >= 0.90)':<34}{mine / base:>10.2f}")
    print(
        f"RESULT name=decode_throughput ratio={mine / base:.3f} target=>=0.9 "
        f"pass={'yes' if mine / base >= 0.9 else 'no'}"
    )

    print(f"\n{args.workers} workers, decode_image, medians of {max(3, args.rounds // 2)} rounds")
    print(f"{'pool':<34}{'images/s':>10}")
    for kind in ("thread", "process"):
        rate = pool_rate(kind, images, args.size, args.workers, max(3, args.rounds // 2))
        print(f"{kind + ' pool':<34}{rate:>10.1f}")


if __name__ == "__main__":
    main()
