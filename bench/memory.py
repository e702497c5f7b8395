"""Peak memory of the whole job at 1,000 and at 4,000 images: it must stay flat (streaming).

    .venv/bin/python bench/memory.py [--small 1000 --large 4000 --image_size 96 --rounds 1]

Each run is a fresh child process (`python bench/memory.py --child ...`) running `pipeline.main.run`
on the in-process runner with a small random BiT (units (1,1,1,1), width 1, the real 21,843-class
head, in both slots) on 64x64 photo-like JPEG files. Peak RSS is taken two ways: the child's own
`ru_maxrss` (exact, kernel-tracked) and the parent polling the child's RSS with psutil every 20 ms
(a cross-check). Target: peak(large) / peak(small) <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    TINY,
    load_note,
    result_line,
    run_job,
    small_jpegs,
    write_checkpoint,
    write_files,
)

TARGET = 1.10


def child(args) -> None:
    """Run the job once; print one JSON line with the peak RSS (MiB) and the summary counts."""
    summary, seconds = run_job(
        os.path.join(args.child, "*.jpg"),
        args.output,
        args.checkpoint,
        *("--decode_threads", str(args.decode_threads)),
        batch_size=args.batch_size,
        image_size=args.image_size,
    )
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        "CHILD "
        + json.dumps(
            {
                "maxrss_mib": own,
                "children_maxrss_mib": kids,
                "results": summary["results"],
                "inputs": summary["inputs"],
                "seconds": seconds,
            }
        ),
        flush=True,
    )


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(directory, output, args) -> dict:
    """One child run: its report plus the polled peak RSS of its process tree (MiB)."""
    import psutil

    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        directory,
        "--output",
        output,
        "--checkpoint",
        args.checkpoint,
        "--batch_size",
        str(args.batch_size),
        "--image_size",
        str(args.image_size),
        "--decode_threads",
        str(args.decode_threads),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, _tree_rss(ps))
        except psutil.Error:
            pass
        time.sleep(0.02)
    out = proc.stdout.read()
    shutil.rmtree(output, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith("CHILD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"job child failed (exit {proc.returncode}): {out[-2000:]}")
    report = json.loads(lines[-1][len("CHILD ") :])
    report["polled_peak_mib"] = peak / 2**20
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=4000)
    ap.add_argument("--image_size", type=int, default=96)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--decode_threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each size, alternating")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--output", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    tmp = tempfile.mkdtemp(prefix="bench-memory-", dir=os.environ.get("BENCH_TMP"))
    try:
        args.checkpoint = write_checkpoint(os.path.join(tmp, "tiny.npz"), **TINY)
        images = small_jpegs(args.large)
        dirs = {n: os.path.join(tmp, f"in{n}") for n in (args.small, args.large)}
        for n, d in dirs.items():
            write_files(d, images[:n])
        reports = {n: [] for n in dirs}
        for r in range(args.rounds):
            for n in sorted(dirs) if r % 2 == 0 else sorted(dirs, reverse=True):
                rep = measure(dirs[n], os.path.join(tmp, "out"), args)
                if rep["results"] != n:
                    raise RuntimeError(f"{rep['results']} results for {n} images")
                reports[n].append(rep)
                print(
                    f"  round {r + 1}: {n:>6} images  ru_maxrss {rep['maxrss_mib']:7.1f} MiB  "
                    f"polled {rep['polled_peak_mib']:7.1f} MiB  {rep['seconds']:6.1f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(n, key):
        return statistics.median(rep[key] for rep in reports[n])

    small, large = args.small, args.large
    print(
        f"\nwhole job in a child process, BiT units (1,1,1,1) width 1 + 21k head, 64x64 JPEGs -> "
        f"{args.image_size}x{args.image_size}, batch {args.batch_size}, decode_threads "
        f"{args.decode_threads}, medians of {args.rounds} run(s); {load_note()}"
    )
    print("| images | peak RSS, ru_maxrss (MiB) | peak RSS, polled (MiB) | job seconds |")
    print("| ---: | ---: | ---: | ---: |")
    for n in (small, large):
        print(
            f"| {n} | {med(n, 'maxrss_mib'):.1f} | {med(n, 'polled_peak_mib'):.1f} "
            f"| {med(n, 'seconds'):.1f} |"
        )
    ratio = med(large, "maxrss_mib") / med(small, "maxrss_mib")
    polled = med(large, "polled_peak_mib") / med(small, "polled_peak_mib")
    print(f"ratio {large}/{small}: ru_maxrss {ratio:.3f}, polled {polled:.3f} (target <= {TARGET})")
    return result_line(
        "memory",
        ratio,
        TARGET,
        higher_is_better=False,
        small_mib=round(med(small, "maxrss_mib")),
        large_mib=round(med(large, "maxrss_mib")),
    )


if __name__ == "__main__":
    main()
