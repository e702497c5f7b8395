"""What report.html costs a run: its size, the time to render it, and the in-pipeline sample.

    .venv/bin/python bench/report_cost.py [--images 1000] [--screenshot docs/report.png]

1. The job (`python -m pipeline`, in-process runner, a random tiny BiT with the 21,843-class head,
   --image_size 64 so the model is cheap) runs on N photo-like JPEGs: random crops of
   scikit-image's sample photos, 200-480 px, in a folder. Reported: job wall time, the size of
   report.html and samples.parquet.
2. `pipeline.report.write_report` re-renders that output (reads the results' key and tags
   columns, the failures, samples.parquet; writes the page): the wall time the report adds at the
   end of every run, here for N result rows.
3. The sample inside the pipeline, isolated: N decoded 224x224 images through
   `SampleThumbnails` (key hash, Top-48 combiner, 48 thumbnails, samples.parquet) against the same
   images through a Map that only hashes the key, in-process runner, median of 3; the difference
   is what the sample adds to a run.
--screenshot PATH: a PNG of the page in headless Chromium (tests/browser.py), for the README.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import TINY, write_checkpoint  # noqa: E402


def make_photos(folder: str, count: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    from tests.sample_photos import COLOUR_PHOTOS, sample_photo

    names = (*COLOUR_PHOTOS, "motorcycle_left", "camera", "coins")
    photos = [Image.fromarray(sample_photo(name)) for name in names]
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        scale = rng.uniform(200, 480) / max(cw, ch)
        crop = crop.resize((max(1, int(cw * scale)), max(1, int(ch * scale))))
        crop.save(os.path.join(folder, f"photo-{i:05d}.jpg"), quality=85)


def time_sample(count: int, rounds: int = 3) -> tuple[float, float]:
    """(median seconds with SampleThumbnails, median seconds hashing keys only)."""
    import apache_beam as beam
    import numpy as np
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from transforms.records import Decoded
    from transforms.sample import SampleThumbnails, key_hash

    def make(i: int) -> Decoded:  # made inside the pipeline: Create would pickle all pixels
        pixels = np.random.default_rng(i).integers(0, 255, (224, 224, 3), dtype=np.uint8)
        return Decoded(f"/data/photo-{i:05d}.jpg", "", 640, 480, pixels)

    timings = {"sample": [], "baseline": []}
    for _ in range(rounds):
        for name in ("sample", "baseline"):
            out = tempfile.mkdtemp()
            started = time.perf_counter()
            with beam.Pipeline(runner=FnApiRunner()) as p:
                decoded = p | beam.Create(range(count), reshuffle=False) | beam.Map(make)
                if name == "sample":
                    _ = decoded | SampleThumbnails(out)
                else:
                    _ = decoded | beam.Map(lambda d: key_hash(d.key))
            timings[name].append(time.perf_counter() - started)
            shutil.rmtree(out)
    return statistics.median(timings["sample"]), statistics.median(timings["baseline"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--screenshot", default=None)
    args = parser.parse_args()
    os.environ.setdefault("NO_GCE_CHECK", "true")
    root = tempfile.mkdtemp(prefix="report-cost-")
    try:
        models = os.path.join(root, "tags.npz")
        write_checkpoint(models, **TINY, seed=1)
        photos, output = os.path.join(root, "photos"), os.path.join(root, "out")
        make_photos(photos, args.images)
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "--input",
                photos,
                "--output",
                output,
                "--tags_model",
                models,
                "--embed_model",
                models,
                "--image_size",
                "64",
                "--log_every_secs",
                "0",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        job = time.perf_counter() - started

        from pipeline.report import write_report

        renders = []
        for _ in range(3):
            started = time.perf_counter()
            write_report(output)
            renders.append(time.perf_counter() - started)
        render = statistics.median(renders)
        page = os.path.getsize(os.path.join(output, "report.html"))
        samples = os.path.getsize(os.path.join(output, "samples.parquet"))
        with_sample, baseline = time_sample(args.images)

        print(f"| measure ({args.images} images) | value |")
        print("| --- | --- |")
        print(f"| job wall time (tiny model, 64 px, in-process) | {job:.1f} s |")
        print(f"| report.html size | {page / 1e6:.2f} MB |")
        print(f"| samples.parquet size | {samples / 1e3:.0f} KB |")
        print(f"| report render at the end of the run (median of 3) | {render:.2f} s |")
        print(
            f"| sample in the pipeline: SampleThumbnails vs hashing only | "
            f"{with_sample:.2f} s vs {baseline:.2f} s (+{with_sample - baseline:.2f} s, "
            f"{(with_sample - baseline) / args.images * 1e3:.2f} ms/image) |"
        )
        if args.screenshot:
            from tests.browser import inspect_page

            shot = os.path.join(root, "page.png")
            errors, _ = inspect_page(os.path.join(output, "report.html"), "1", shot)
            if errors:
                raise SystemExit(f"console errors: {errors}")
            from PIL import Image

            image = Image.open(shot).convert("RGB")
            image = image.crop((0, 0, image.width, min(image.height, 2200)))
            image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
            image.save(args.screenshot, optimize=True)
            size = os.path.getsize(args.screenshot) / 1e3
            print(f"screenshot: {args.screenshot} ({size:.0f} KB)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
