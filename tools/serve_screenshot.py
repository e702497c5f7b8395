"""docs/serve.png: the search page of `./run.sh serve` with results, as a user sees it.

    python -m tools.serve_screenshot [--out docs/serve.png] [--work DIR]

A real run of the job (tiny random BiT checkpoints, as the tests use; no weights are downloaded)
over scikit-image's sample photos, as image files, a TFRecord shard and a WebDataset tar; its
index; `./run.sh serve` on it; then Debian's chromium (tests/browser.py) opens "more like this"
of one photo and takes a screenshot. The tiny model's tags are random, its neighbours real.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = (
    *("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"),
    *("cat", "colorwheel", "coins", "camera", "horse", "moon", "brick", "grass", "gravel"),
    *("motorcycle_left", "retina", "logo", "clock", "text", "page"),
)


def make_output(work: str) -> str:
    from PIL import Image

    from pipeline.main import run
    from search.index import build_index
    from tests import corpus
    from tests.bit_checkpoints import write_checkpoint
    from tests.jobs import job_args
    from tests.sample_photos import sample_photo

    photos = os.path.join(work, "photos")
    os.makedirs(photos, exist_ok=True)
    jpegs = {}
    for name in PHOTOS:
        try:
            pixels = sample_photo(name)
        except Exception:  # noqa: BLE001 - a photo this scikit-image would download is skipped
            continue
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=88)
        jpegs[name] = buf.getvalue()
    names = list(jpegs)
    for name in names[:12]:
        with open(os.path.join(photos, f"{name}.jpg"), "wb") as f:
            f.write(jpegs[name])
    rest = names[12:]
    half = len(rest) // 2
    corpus.write_tfrecord(
        os.path.join(photos, "shard.tfrecord"), [(f"tf/{n}", jpegs[n]) for n in rest[:half]]
    )
    corpus.write_webdataset(
        os.path.join(photos, "shard.tar"), [(f"wds/{n}", jpegs[n]) for n in rest[half:]]
    )
    tags, embed = os.path.join(work, "tags.npz"), os.path.join(work, "embed.npz")
    write_checkpoint(tags, units=(1, 1, 1, 1), width=1, num_classes=21843, seed=1)
    write_checkpoint(embed, units=(1, 1, 1, 1), width=1, num_classes=None, seed=2)
    output = os.path.join(work, "out")
    run(job_args(photos, output, (tags, embed), image_size=64), save_main_session=False)
    build_index(output, log_every_secs=0)
    return output


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "serve.png"))
    ap.add_argument("--work", default=None, help="where the job writes (default a temp dir)")
    ap.add_argument("--key", default="chelsea.jpg", help="the photo whose neighbours to show")
    args = ap.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="serve-screenshot-")
    output = make_output(work)
    server = subprocess.Popen(
        [sys.executable, "-m", "search", "serve", output, "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = re.search(r"at (http://\S+/) ", server.stdout.readline()).group(1)
        key = os.path.join(work, "photos", args.key)
        from urllib.parse import quote

        from tests.browser import playwright_browser

        with playwright_browser() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"{url}?key={quote(key)}")
            page.wait_for_function(
                "() => document.body.dataset.state === 'results' && Array.from("
                "document.querySelectorAll('.card img:not([loading=lazy])')).every(i => i.complete)"
            )
            page.screenshot(path=args.out)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
