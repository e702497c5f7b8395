"""Helpers shared by the benchmarks: repo on sys.path, inputs on disk, random BiT checkpoints, a
quiet in-process run of the job, the machine-readable result line that `bench/run_all.py`
collects."""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

R50X1 = dict(units=(3, 4, 6, 3), width=1, num_classes=21843)  # BiT-M R50x1 layout
R101X3 = dict(units=(3, 4, 23, 3), width=3, num_classes=21843)  # BiT-M R101x3 layout
TINY = dict(units=(1, 1, 1, 1), width=1, num_classes=21843)  # smallest net, real 21k head


def write_checkpoint(path: str, units, width: int, num_classes, seed: int = 0) -> str:
    """A random checkpoint in the official `.npz` layout at `path` (tests/bit_checkpoints.py)."""
    from tests.bit_checkpoints import write_checkpoint as write

    write(path, units=tuple(units), width=width, num_classes=num_classes, seed=seed)
    return path


def write_files(directory: str, images: list[bytes], ext: str = "jpg") -> list[str]:
    """Each encoded image as DIRECTORY/img-NNNNNN.EXT; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, data in enumerate(images):
        path = os.path.join(directory, f"img-{i:06d}.{ext}")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def small_jpegs(count: int, width: int = 64, height: int = 64, seed: int = 0) -> list[bytes]:
    """`count` small photo-like JPEGs (tests/corpus.py), cycling through 16 distinct ones."""
    from tests.corpus import make_jpeg

    distinct = [make_jpeg(width, height, seed=seed + i) for i in range(min(count, 16))]
    return [distinct[i % len(distinct)] for i in range(count)]


def sample_photos(names) -> list:
    """scikit-image's sample photos `names` as uint8 RGB arrays (tests/sample_photos.py), less
    those that this release would have to download."""
    from tests.sample_photos import sample_photo

    photos = []
    for name in names:
        try:
            photos.append(sample_photo(name))
        except Exception:  # noqa: BLE001 - a photo that needs a download is skipped
            continue
    return photos


def run_job(
    inputs: str, output: str, checkpoint: str, *extra, batch_size: int, image_size: int
) -> tuple[dict, float]:
    """(summary, wall seconds) of one run of the job in this process (`pipeline.main.run`, the
    command line of tests/jobs.py) with the random `checkpoint` in both model slots; TensorFlow's
    and Beam's INFO logging off. `extra` flags go last."""
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger().setLevel(logging.WARNING)
    from pipeline.main import run
    from tests.jobs import job_args

    argv = job_args(
        inputs,
        output,
        (checkpoint, checkpoint),
        *extra,
        batch_size=batch_size,
        image_size=image_size,
    )
    start = time.perf_counter()
    summary = run(argv, save_main_session=False)
    return summary, time.perf_counter() - start


def load_note() -> str:
    """The 1-minute load average, to print next to timings (the machine is shared)."""
    try:
        return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unknown"


def result_line(
    name: str, ratio: float, target: float, higher_is_better: bool = True, **extra
) -> str:
    """Print and return the one machine-readable line every benchmark ends with:

    RESULT name=pipeline_overhead ratio=0.951 target=>=0.92 pass=yes [key=value ...]
    """
    op = ">=" if higher_is_better else "<="
    ok = ratio >= target if higher_is_better else ratio <= target
    fields = [
        f"name={name}",
        f"ratio={ratio:.3f}",
        f"target={op}{target:g}",
        f"pass={'yes' if ok else 'no'}",
    ]
    fields += [f"{k}={str(v).replace(' ', '_')}" for k, v in extra.items()]
    line = "RESULT " + " ".join(fields)
    print(line, flush=True)
    return line


def parse_result(line: str) -> dict | None:
    """Inverse of `result_line`: the fields of a `RESULT ...` line, or None."""
    if not line.startswith("RESULT "):
        return None
    fields = {}
    for part in line.split()[1:]:
        key, _, value = part.partition("=")
        fields[key] = value
    return fields
