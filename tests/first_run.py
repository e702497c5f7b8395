"""One small, real run of the job as a user starts it (a subprocess, stderr not a terminal), shared
by the console and report tests: a folder of scikit-image sample photos, a broken JPEG, a text
sidecar, tiny random models (so the tags mean nothing; the page and the console are what is tested).
"""

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from tests.sample_photos import COLOUR_PHOTOS, sample_photo

REPO = Path(__file__).resolve().parent.parent
PHOTOS = (*COLOUR_PHOTOS, "camera", "coins", "moon", "page")


def write_photos(folder: Path, names=PHOTOS) -> list:
    """scikit-image's sample photos as JPEGs in `folder` (nested one level for the folder input)."""
    paths = []
    for i, name in enumerate(names):
        target = folder / ("more" if i % 3 == 0 else "") / f"{name}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample_photo(name)).save(target, quality=85)
        paths.append(target)
    return paths


@functools.cache
def first_run(tags_model: str, embed_model: str):
    """(output dir, console text, exit code) of `python -m pipeline --input FOLDER --output OUT`,
    run once per test session."""
    root = Path(tempfile.mkdtemp(prefix="first-run-"))
    atexit.register(shutil.rmtree, root, True)  # shared by several tests: removed at exit
    photos = root / "photos"
    write_photos(photos)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (photos / "notes.txt").write_text("a sidecar the folder input skips")
    output = root / "out"
    # The job's own defaults decide what shows: no TF_CPP_MIN_LOG_LEVEL from the test set-up.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "--input",
            str(photos),
            "--output",
            str(output),
            "--tags_model",
            tags_model,
            "--embed_model",
            embed_model,
            "--image_size",
            "64",
            "--batch_size",
            "8",
            "--log_every_secs",
            "2",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    return output, proc.stdout, proc.returncode
