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
--screenshot PATH: a PNG of the page in headless Chromium (tests/browser.py), for docs/running.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common


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

    def run(name: str, out: str) -> None:
        with beam.Pipeline(runner=FnApiRunner()) as p:
            decoded = p | beam.Create(range(count), reshuffle=False) | beam.Map(make)
            if name == "sample":
                _ = decoded | SampleThumbnails(out)
            else:
                _ = decoded | beam.Map(lambda d: key_hash(d.key))

    def timed(name: str) -> float:
        with tempfile.TemporaryDirectory() as out:
            return common.seconds(lambda: run(name, out))

    timings = common.alternating({n: lambda n=n: timed(n) for n in ("sample", "baseline")}, rounds)
    return common.median(timings["sample"]), common.median(timings["baseline"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--screenshot", default=None)
    args = parser.parse_args()
    os.environ.setdefault("NO_GCE_CHECK", "true")
    root = tempfile.mkdtemp(prefix="report-cost-")
    try:
        models = os.path.join(root, "tags.npz")
        common.write_checkpoint(models, **common.TINY, seed=1)
        photos, output = os.path.join(root, "photos"), os.path.join(root, "out")
        make_photos(photos, args.images)
        started = time.perf_counter()
        argv = common.job_argv(photos, output, models, batch_size=16, image_size=64)
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "pipeline", *argv], check=True, **quiet)
        job = time.perf_counter() - started

        from pipeline.report import write_report

        render = common.median(common.seconds(lambda: write_report(output)) for _ in range(3))
        page = os.path.getsize(os.path.join(output, "report.html"))
        samples = os.path.getsize(os.path.join(output, "samples.parquet"))
        with_sample, baseline = time_sample(args.images)

        added = with_sample - baseline
        print(common.load_note())
        common.table(
            [f"measure ({args.images} images)", "value"],
            [
                ("job wall time (tiny model, 64 px, in-process)", f"{job:.1f} s"),
                ("report.html size", f"{page / 1e6:.2f} MB"),
                ("samples.parquet size", f"{samples / 1e3:.0f} KB"),
                ("report render at the end of the run (median of 3)", f"{render:.2f} s"),
                (
                    "sample in the pipeline: SampleThumbnails vs hashing only",
                    f"{with_sample:.2f} s vs {baseline:.2f} s (+{added:.2f} s, "
                    f"{added / args.images * 1e3:.2f} ms/image)",
                ),
            ],
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
