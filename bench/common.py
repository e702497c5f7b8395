"""Helpers shared by the benchmarks: repo on sys.path, inputs on disk, random BiT checkpoints, a
quiet in-process run of the job, child processes, alternating rounds, Markdown tables, and the
machine-readable result line that `bench/run_all.py` collects."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
median = statistics.median

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
    paths = [os.path.join(directory, f"img-{i:06d}.{ext}") for i in range(len(images))]
    for path, data in zip(paths, images):
        with open(path, "wb") as f:
            f.write(data)
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


def job_argv(inputs: str, output: str, checkpoint: str, *extra, batch_size, image_size) -> list:
    """The command line of a quiet run (tests/jobs.py) with `checkpoint` in both model slots."""
    from tests.jobs import job_args

    return job_args(
        inputs,
        output,
        (checkpoint, checkpoint),
        *extra,
        batch_size=batch_size,
        image_size=image_size,
    )


def run_job(
    inputs: str, output: str, checkpoint: str, *extra, batch_size: int, image_size: int
) -> tuple[dict, float]:
    """(summary, wall seconds) of one run of the job in this process (`pipeline.main.run`, the
    command line of `job_argv`); TensorFlow's and Beam's INFO logging off. `extra` flags go last."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    from pipeline.main import run

    argv = job_argv(
        inputs, output, checkpoint, *extra, batch_size=batch_size, image_size=image_size
    )
    start = time.perf_counter()
    summary = run(argv, save_main_session=False)
    return summary, time.perf_counter() - start


def job_model(checkpoint: str, batch_size: int):
    """The job's own model object (`transforms.infer.load_model`, its process-level cache, which
    the job's runs in this process share), `checkpoint` in both slots."""
    from transforms.infer import InferenceConfig, load_model

    return load_model(InferenceConfig(checkpoint, checkpoint, schema=None, batch_size=batch_size))


def run_batches(model, pixels, batch_size: int) -> None:
    """`model` over decoded `pixels` [N, S, S, 3], one batch at a time, as the job calls it."""
    for i in range(0, len(pixels), batch_size):
        model(pixels[i : i + batch_size])


def seconds(fn) -> float:
    """Wall seconds of one call of `fn()`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    """This process's peak resident memory (kernel-tracked `ru_maxrss`, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(script: str, kind: str, spec: dict, env: dict | None = None, poll_rss=False) -> dict:
    """Runs `script --child KIND --spec JSON` in a fresh process and returns the dict its
    `serve_child` printed. `poll_rss`: also the peak RSS of its process tree, polled every 20 ms
    with psutil (a cross-check of the child's own `ru_maxrss`), as `polled_peak_mib`."""
    cmd = [sys.executable, os.path.abspath(script), "--child", kind, "--spec", json.dumps(spec)]
    env = dict(os.environ, **(env or {}))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Files, not pipes: a child that logs much would block on a full pipe while we poll.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True, env=env)
        peak = _poll_peak_rss(proc) if poll_rss else None
        proc.wait()
        out.seek(0), err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("CHILD ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"{kind} child failed (exit {proc.returncode}): {err.read()[-3000:]}"
            )
    report = json.loads(lines[-1][len("CHILD ") :])
    if peak is not None:
        report["polled_peak_mib"] = peak / 2**20
    return report


def _poll_peak_rss(proc) -> int:
    import psutil

    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [ps] + ps.children(recursive=True):
                total += p.memory_info().rss
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.02)
    return peak


def serve_child(children: dict, argv=None) -> bool:
    """In a child started by `in_child`: runs `children[KIND](spec)`, prints its dict as the
    `CHILD {json}` line and returns True; returns False in the parent (no `--child`)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--child" not in argv:
        return False
    kind, spec = argv[argv.index("--child") + 1], json.loads(argv[argv.index("--spec") + 1])
    print("CHILD " + json.dumps(children[kind](spec)), flush=True)
    return True


def alternating(variants: dict, rounds: int, warmup: int = 0) -> dict:
    """{name: [result of variants[name]() in each measured round]}: every round runs each variant
    once, the order rotated a step each round (so no variant always goes first); the first
    `warmup` rounds are not kept."""
    names, results = list(variants), {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            value = variants[name]()
            if r >= warmup:
                results[name].append(value)
    return results


def table(header: list, rows: list, text: tuple = (0,)) -> None:
    """Prints a Markdown table; columns are right-aligned (numbers) but those indexed in `text`."""
    rule = ["---" if i in text else "---:" for i in range(len(header))]
    for row in [header, rule, *rows]:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


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
    fields = [f"name={name}", f"ratio={ratio:.3f}", f"target={op}{target:g}"]
    fields += [f"pass={'yes' if ok else 'no'}"]
    fields += [f"{k}={str(v).replace(' ', '_')}" for k, v in extra.items()]
    line = "RESULT " + " ".join(fields)
    print(line, flush=True)
    return line


def parse_result(line: str) -> dict | None:
    """Inverse of `result_line`: the fields of a `RESULT ...` line, or None."""
    if not line.startswith("RESULT "):
        return None
    return dict(part.partition("=")[::2] for part in line.split()[1:])
