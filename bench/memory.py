"""Peak memory of the whole job at 1,000 and at 4,000 images: it must stay flat (streaming).

    .venv/bin/python bench/memory.py [--small 1000 --large 4000 --image_size 96 --rounds 1]

Each run is a fresh child process running `pipeline.main.run` on the in-process runner with a small
random BiT (units (1,1,1,1), width 1, the real 21,843-class head, in both slots) on 64x64
photo-like JPEG files. Peak RSS is taken two ways: the child's own `ru_maxrss` (exact,
kernel-tracked) and the parent polling the child's RSS with psutil every 20 ms (a cross-check).
Target: peak(large) / peak(small) <= 1.10.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common

TARGET = 1.10


def child(spec: dict) -> dict:
    """One run of the job: peak RSS (MiB), seconds and the summary counts."""
    summary, seconds = common.run_job(
        os.path.join(spec["inputs"], "*.jpg"),
        spec["output"],
        spec["checkpoint"],
        *("--decode_threads", str(spec["decode_threads"])),
        batch_size=spec["batch_size"],
        image_size=spec["image_size"],
    )
    return {"maxrss_mib": common.peak_rss_mib(), "results": summary["results"], "seconds": seconds}


def main(argv=None):
    if common.serve_child({"job": child}, argv):
        return None
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=4000)
    ap.add_argument("--image_size", type=int, default=96)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--decode_threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each size, alternating")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="bench-memory-", dir=os.environ.get("BENCH_TMP"))
    try:
        spec = {k: getattr(args, k) for k in ("batch_size", "image_size", "decode_threads")}
        spec.update(
            checkpoint=common.write_checkpoint(os.path.join(tmp, "tiny.npz"), **common.TINY),
            output=os.path.join(tmp, "out"),
        )
        images = common.small_jpegs(args.large)
        dirs = {n: os.path.join(tmp, f"in{n}") for n in (args.small, args.large)}
        for n, d in dirs.items():
            common.write_files(d, images[:n])
        reports = {n: [] for n in dirs}
        for r in range(args.rounds):
            for n in sorted(dirs) if r % 2 == 0 else sorted(dirs, reverse=True):
                rep = common.in_child(__file__, "job", {**spec, "inputs": dirs[n]}, poll_rss=True)
                shutil.rmtree(spec["output"], ignore_errors=True)
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
        return common.median(rep[key] for rep in reports[n])

    small, large = args.small, args.large
    print(
        f"\nwhole job in a child process, BiT units (1,1,1,1) width 1 + 21k head, 64x64 JPEGs -> "
        f"{args.image_size}x{args.image_size}, batch {args.batch_size}, decode_threads "
        f"{args.decode_threads}, medians of {args.rounds} run(s); {common.load_note()}"
    )
    common.table(
        ["images", "peak RSS, ru_maxrss (MiB)", "peak RSS, polled (MiB)", "job seconds"],
        [
            [n, f"{med(n, 'maxrss_mib'):.1f}", f"{med(n, 'polled_peak_mib'):.1f}"]
            + [f"{med(n, 'seconds'):.1f}"]
            for n in (small, large)
        ],
        text=(),
    )
    ratio = med(large, "maxrss_mib") / med(small, "maxrss_mib")
    polled = med(large, "polled_peak_mib") / med(small, "polled_peak_mib")
    print(f"ratio {large}/{small}: ru_maxrss {ratio:.3f}, polled {polled:.3f} (target <= {TARGET})")
    return common.result_line(
        "memory",
        ratio,
        TARGET,
        higher_is_better=False,
        small_mib=round(med(small, "maxrss_mib")),
        large_mib=round(med(large, "maxrss_mib")),
    )


if __name__ == "__main__":
    main()
