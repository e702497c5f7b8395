"""Peak memory per known key of `--skip_keys_from`, 1M to 30M known keys in 1 to 100 files: a run's
peak RSS may grow by at most 16 bytes per known key between the smallest set of >= 1M keys and
the largest (aim: flat); plus the seconds a million known keys cost (footers, read + hash, merge).

    .venv/bin/python bench/skip_memory.py [--sets 1x1M,10x1M,30x1M,100x100k,1x10M]
                                          [--inputs 2000] [--no_job] [--keep]

A set `FxK` is F results files of K known keys each (~40-character keys, like gs:// URIs; row
groups of 65,536 rows), plus one small results file holding half of the inputs' keys; the
baseline set holds only that file.
Two fresh child processes a set, peak RSS from their own high-water mark (VmHWM: `ru_maxrss` would
include this script's RSS at the fork):
- job: `pipeline.main.run` on the in-process runner with a tiny random BiT (units (1,1,1,1),
  width 1, 21k head) at 32x32 over TFRecord shards of 64x64 JPEGs; checked exact (the results are
  exactly the unknown inputs, `skipped` is the number of known ones);
- keys: the known-key steps alone (transforms/skip.py's functions, no Beam, no model): footers
  checked, read + hash into runs, merge, the merged file opened and every input looked up (checked
  exact), each step timed.
Growth a known key = (peak - peak of the set with the fewest >= 1M keys) / (keys - its keys): the
slope the issue bounds. Over the baseline it is also shown; it includes a fixed part (a 16 MiB run
buffer, the merge's blocks) that does not grow with the keys.
Generated files live under bench/out/skip_memory/ (deleted at the end unless --keep).
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

TARGET = 16.0  # bytes of peak RSS an added known key
OUT = os.path.join(REPO, "bench", "out", "skip_memory")
DEFAULT_SETS = "1x1M,10x1M,30x1M,100x100k,1x10M"
ROW_GROUP = 65_536  # rows a row group of the generated files (the job's own: ~2,700-8,000)


def input_key(i: int) -> str:
    return f"gs://photos/2024/input-{i:07d}.jpg"


def old_key(pool: str, i: int) -> str:
    return f"gs://photos/2023/archive-{pool}/old-{i:09d}.jpg"


def parse_set(text: str) -> tuple[int, int]:
    """'10x1M' -> (10 files, 1,000,000 keys a file)."""
    files, per_file = text.lower().split("x")
    scale = {"k": 1_000, "m": 1_000_000}.get(per_file[-1], 1)
    return int(files), int(float(per_file.rstrip("km")) * scale)


def peak_rss() -> int:
    """This process's own peak RSS in bytes: VmHWM, the high-water mark of its address space.
    Not `ru_maxrss`: Linux keeps that across fork + exec, so a child's `ru_maxrss` is at least its
    parent's RSS at the fork (this script's parent holds the generated keys for a while)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux


def expected_results(inputs: int) -> list:
    return sorted(input_key(i) for i in range(inputs) if i % 2)


def child_job(args) -> dict:
    """The whole job once."""
    import pyarrow.parquet as pq

    summary, seconds = run_job(
        os.path.join(args.data, "inputs", "*.tfrecord"),
        args.output,
        args.checkpoint,
        *("--skip_keys_from", args.skip),
        batch_size=32,
        image_size=32,
    )
    files = sorted(f for f in os.listdir(args.output) if f.startswith("results-"))
    keys = sorted(
        k
        for f in files
        for k in pq.read_table(os.path.join(args.output, f), columns=["key"])["key"].to_pylist()
    )
    left = [f for f in os.listdir(args.output) if f.startswith("beam-temp-known-keys-")]
    return {
        "maxrss": peak_rss(),
        "skipped": summary["skipped"],
        "exact": keys == expected_results(args.inputs) and not left,
        "seconds": seconds,
    }


def child_keys(args) -> dict:
    """The known-key steps alone, timed one by one."""
    from transforms import digests, skip

    work = args.output
    times = {}
    start = time.perf_counter()
    sources = skip.results_files(skip.split_patterns(args.skip))
    times["footers"] = time.perf_counter() - start
    start = time.perf_counter()
    runs = [r for g in skip.group_files(sources) for r in skip.write_runs(g, f"{work}/runs")]
    times["read_hash"] = time.perf_counter() - start
    start = time.perf_counter()
    count = digests.merge_files([r.path for r in runs], f"{work}/{skip.MERGED_NAME}")
    digests.remove([r.path for r in runs])
    times["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    known = digests.DigestSet.open(f"{work}/{skip.MERGED_NAME}", count)
    times["open"] = time.perf_counter() - start
    inputs = [input_key(i) for i in range(args.inputs)]
    kept = []
    for at in range(0, len(inputs), skip.LOOKUP_BATCH):  # as the filter does
        batch = inputs[at : at + skip.LOOKUP_BATCH]
        kept += [k for k, hit in zip(batch, known.contains(batch)) if not hit]
    return {
        "maxrss": peak_rss(),
        "skipped": len(inputs) - len(kept),
        "exact": sorted(kept) == expected_results(args.inputs),
        "rows": sum(s.rows for s in sources),
        "runs": len(runs),
        "times": times,
    }


def prepare(args, sets) -> dict:
    """Inputs, checkpoint, pools of results files and the sets' folders of links to them."""
    from tests.corpus import write_results_keys, write_tfrecord

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
            write_tfrecord(
                os.path.join(inputs + ".tmp/inputs", f"in-{s:05d}-of-{shards:05d}.tfrecord"),
                [(input_key(i), images[i]) for i in range(s, args.inputs, shards)],
            )
        os.rename(inputs + ".tmp", inputs)
    known_inputs = os.path.join(OUT, f"known-inputs{args.inputs}.parquet")
    if not os.path.exists(known_inputs):
        write_results_keys(known_inputs + ".tmp", [input_key(i) for i in range(0, args.inputs, 2)])
        os.rename(known_inputs + ".tmp", known_inputs)

    need = {}  # keys a file -> files
    for files, per_file in sets:
        need[per_file] = max(need.get(per_file, 0), files)
    pools = {}
    for per_file, files in sorted(need.items()):
        pool = os.path.join(OUT, f"pool-{per_file}-rg{ROW_GROUP}")
        os.makedirs(pool, exist_ok=True)
        pools[per_file] = []
        for f in range(files):
            path = os.path.join(pool, f"results-{f:05d}.parquet")
            if not os.path.exists(path):
                keys = (old_key(str(per_file), i) for i in range(f * per_file, (f + 1) * per_file))
                write_results_keys(path + ".tmp", keys, row_group_size=ROW_GROUP)
                os.rename(path + ".tmp", path)
            pools[per_file].append(path)
    patterns = {}
    for files, per_file in [(0, 0)] + sets:
        folder = os.path.join(OUT, f"set-{files}x{per_file}")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        links = [known_inputs] + (pools[per_file][:files] if files else [])
        for i, target in enumerate(links):
            os.symlink(target, os.path.join(folder, f"results-{i:05d}.parquet"))
        patterns[(files, per_file)] = os.path.join(folder, "results-*.parquet")
    return {"checkpoint": checkpoint, "data": inputs, "patterns": patterns}


def measure(kind: str, prepared: dict, skip: str, args) -> dict:
    output = os.path.join(OUT, "run-output")
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind]
    cmd += ["--data", prepared["data"], "--output", output, "--checkpoint", prepared["checkpoint"]]
    cmd += ["--skip", skip, "--inputs", str(args.inputs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(output, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CHILD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} child failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    report = json.loads(lines[-1][len("CHILD ") :])
    if not report["exact"] or report["skipped"] != args.inputs // 2 + args.inputs % 2:
        raise RuntimeError(f"inexact skip ({kind}): {report}")
    return report


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=DEFAULT_SETS, help="FILESxKEYS, comma-separated")
    ap.add_argument("--inputs", type=int, default=2000)
    ap.add_argument("--no_job", action="store_true", help="measure the known-key steps only")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--child", choices=("job", "keys"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--skip", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        report = (child_job if args.child == "job" else child_keys)(args)
        print("CHILD " + json.dumps(report), flush=True)
        return None
    sets = [parse_set(s) for s in args.sets.split(",") if s.strip()]
    kinds = ("keys",) if args.no_job else ("keys", "job")

    started = time.perf_counter()
    prepared = prepare(args, sets)
    print(f"inputs and known keys ready in {time.perf_counter() - started:.0f} s", flush=True)
    loads = [os.getloadavg()[0]]
    reports = {}
    for key in [(0, 0)] + sets:
        reports[key] = {k: measure(k, prepared, prepared["patterns"][key], args) for k in kinds}
        loads.append(os.getloadavg()[0])
        rep = reports[key]
        line = ", ".join(f"{k} peak {mib(rep[k]['maxrss'])} MiB" for k in kinds)
        print(f"  {key[0]} x {key[1]:,} known keys: {line}, exact", flush=True)
    if not args.keep:
        shutil.rmtree(OUT, ignore_errors=True)

    base = reports[(0, 0)]
    ordered = sorted(sets, key=lambda s: (s[0] * s[1], -s[0]))
    ref = min((s for s in ordered if s[0] * s[1] >= 1_000_000), default=ordered[0])
    print(
        f"\n{args.inputs} TFRecord inputs (half known), tiny BiT at 32x32, in-process runner; "
        f"{load_note()} (during the runs: {min(loads):.1f}-{max(loads):.1f})"
    )
    print(
        "| known keys | files | run | peak RSS (MiB) | growth over baseline (MiB) "
        f"| B/key over baseline | B/key added over {ref[0]} x {ref[1]:,} |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        peak = mib(base[kind]["maxrss"])
        print(f"| {args.inputs // 2:,} (baseline) | 1 | {kind} | {peak} | | | |")
    worst = {}
    for files, per_file in ordered:
        keys = files * per_file
        for kind in kinds:
            peak = reports[(files, per_file)][kind]["maxrss"]
            growth = peak - base[kind]["maxrss"]
            added = keys - ref[0] * ref[1]
            slope = (peak - reports[ref][kind]["maxrss"]) / added if added > 0 else None
            if slope is not None:
                worst[kind] = max(worst.get(kind, float("-inf")), slope)
            print(
                f"| {keys:,} | {files} x {per_file:,} | {kind} | {mib(peak)} | {mib(growth)} "
                f"| {growth / keys:.1f} | {'' if slope is None else f'{slope:.2f}'} |"
            )
    print("\nSeconds a million known keys (the keys run, one process, one core):")
    print("| known keys | files | runs | footers | read + hash | merge | open + check |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for files, per_file in ordered:
        rep = reports[(files, per_file)]["keys"]
        per_m = {k: v / (rep["rows"] / 1e6) for k, v in rep["times"].items()}
        print(
            f"| {rep['rows']:,} | {files + 1} | {rep['runs']} | {per_m['footers']:.3f} "
            f"| {per_m['read_hash']:.2f} | {per_m['merge']:.3f} | {per_m['open']:.3f} |"
        )
    kind = "job" if "job" in worst else "keys"
    return result_line(
        "skip_memory",
        worst.get(kind, 0.0),
        TARGET,
        higher_is_better=False,
        run=kind,
        keys_alone=f"{worst.get('keys', 0.0):.2f}",
    )


if __name__ == "__main__":
    main()
