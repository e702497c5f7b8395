"""Peak memory per known key of `--skip_keys_from`: 2,000 inputs, half of them known, against 1M
and 3M known keys; the bound is <= 100 bytes a known key (aim: 50).

    .venv/bin/python bench/skip_memory.py [--known 1000000,3000000 --inputs 2000 --files 10]

Each run is a fresh child process running `pipeline.main.run` on the in-process runner with a tiny
random BiT (units (1,1,1,1), width 1, 21k head) at 32x32 over TFRecord shards of 64x64 JPEGs. The
baseline run skips the same 1,000 known inputs from a results file holding only them; the others
add 1M / 3M more known keys (~35-character paths, like gs:// URIs) in `--files` Parquet files.
Peak RSS is the child's `ru_maxrss`; bytes a known key = (peak - baseline peak) / extra keys.
Every run is checked to be exact: the results are exactly the unknown inputs and `skipped` is
1,000. The generated inputs are cached under bench/out/skip_memory/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, TINY, load_note, result_line, run_job, small_jpegs, write_checkpoint  # noqa: E402

TARGET = 100.0  # bytes of peak RSS a known key
OUT = os.path.join(REPO, "bench", "out", "skip_memory")


def input_key(i: int) -> str:
    return f"gs://photos/2024/input-{i:07d}.jpg"


def old_key(i: int) -> str:
    return f"gs://photos/2023/archive/old-{i:09d}.jpg"


def child(args) -> None:
    """Run the job once; print one JSON line: peak RSS, counts, result keys' check."""
    import pyarrow.parquet as pq

    summary, seconds = run_job(
        os.path.join(args.data, "inputs", "*.tfrecord"),
        args.output,
        args.checkpoint,
        *("--skip_keys_from", args.skip),
        batch_size=32,
        image_size=32,
    )
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    files = sorted(f for f in os.listdir(args.output) if f.startswith("results-"))
    keys = sorted(
        k
        for f in files
        for k in pq.read_table(os.path.join(args.output, f), columns=["key"])["key"].to_pylist()
    )
    expected = sorted(input_key(i) for i in range(args.inputs) if i % 2)
    print(
        "CHILD "
        + json.dumps(
            {
                "maxrss": own,
                "skipped": summary["skipped"],
                "results": summary["results"],
                "exact": keys == expected,
                "seconds": seconds,
            }
        ),
        flush=True,
    )


def prepare(args) -> dict:
    """Inputs, checkpoint and skip lists under bench/out/skip_memory (reused when present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.corpus import write_tfrecord

    os.makedirs(OUT, exist_ok=True)
    checkpoint = os.path.join(OUT, "tiny.npz")
    if not os.path.exists(checkpoint):
        write_checkpoint(checkpoint, **TINY)
    inputs = os.path.join(OUT, f"inputs{args.inputs}")
    if not os.path.isdir(inputs):
        os.makedirs(inputs + ".tmp/inputs", exist_ok=True)
        images = small_jpegs(args.inputs)
        shards = 4
        for s in range(shards):
            name = f"in-{s:05d}-of-{shards:05d}.tfrecord"
            write_tfrecord(
                os.path.join(inputs + ".tmp/inputs", name),
                [(input_key(i), images[i]) for i in range(s, args.inputs, shards)],
            )
        os.rename(inputs + ".tmp", inputs)
    known_inputs = [input_key(i) for i in range(0, args.inputs, 2)]  # even inputs are known
    skips = {}
    for extra in [0] + args.known:
        directory = os.path.join(OUT, f"known{args.inputs}_{extra}_{args.files}")
        if not os.path.isdir(directory):
            os.makedirs(directory + ".tmp", exist_ok=True)
            files = max(1, args.files if extra else 1)
            per_file = -(-extra // files) if extra else 0
            for f in range(files):
                keys = [old_key(i) for i in range(f * per_file, min(extra, (f + 1) * per_file))]
                if f == files - 1:
                    keys += known_inputs
                pq.write_table(
                    pa.table({"key": pa.array(keys, pa.string())}),
                    os.path.join(directory + ".tmp", f"results-{f:05d}-of-{files:05d}.parquet"),
                )
                del keys
            os.rename(directory + ".tmp", directory)
        skips[extra] = os.path.join(directory, "results-*.parquet")
    return {"checkpoint": checkpoint, "data": inputs, "skips": skips}


def measure(prepared: dict, skip: str, args) -> dict:
    output = os.path.join(OUT, "run-output")
    shutil.rmtree(output, ignore_errors=True)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--data",
        prepared["data"],
        "--output",
        output,
        "--checkpoint",
        prepared["checkpoint"],
        "--skip",
        skip,
        "--inputs",
        str(args.inputs),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(output, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CHILD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"job child failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    report = json.loads(lines[-1][len("CHILD ") :])
    expected_skips = args.inputs // 2 + args.inputs % 2
    if not report["exact"] or report["skipped"] != expected_skips:
        raise RuntimeError(f"inexact skip: {report}")
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--known", default="1000000,3000000", help="comma-separated numbers of extra known keys"
    )
    ap.add_argument("--inputs", type=int, default=2000)
    ap.add_argument("--files", type=int, default=10, help="Parquet files holding the known keys")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--skip", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    args.known = [int(k) for k in args.known.split(",") if k.strip()]

    started = time.perf_counter()
    prepared = prepare(args)
    print(f"inputs and skip lists ready in {time.perf_counter() - started:.0f} s", flush=True)
    reports = {}
    for extra in [0] + args.known:
        reports[extra] = rep = measure(prepared, prepared["skips"][extra], args)
        print(
            f"  {extra:>9,} extra known keys: peak RSS {rep['maxrss'] / 2**20:8.1f} MiB, "
            f"{rep['results']} results, {rep['skipped']} skipped, exact, {rep['seconds']:.0f} s",
            flush=True,
        )
    base = reports[0]["maxrss"]
    print(
        f"\n{args.inputs} TFRecord inputs (half known), tiny BiT at 32x32, in-process runner, "
        f"known keys in {args.files} Parquet files; {load_note()}"
    )
    print("| known keys | peak RSS (MiB) | growth (MiB) | bytes a known key |")
    print("| ---: | ---: | ---: | ---: |")
    print(f"| {args.inputs // 2:,} (baseline) | {base / 2**20:.0f} | | |")
    worst = 0.0
    for extra in args.known:
        growth = reports[extra]["maxrss"] - base
        per_key = growth / extra
        worst = max(worst, per_key)
        print(
            f"| {extra + args.inputs // 2:,} | {reports[extra]['maxrss'] / 2**20:.0f} "
            f"| {growth / 2**20:.0f} | {per_key:.1f} |"
        )
    return result_line("skip_memory", worst, TARGET, higher_is_better=False)


if __name__ == "__main__":
    main()
