"""Run every CPU benchmark, one subprocess each, and print one table of ratios vs their targets.

    .venv/bin/python bench/run_all.py [--only memory,pipeline_overhead] [--log_dir DIR]

Each benchmark ends with one machine-readable line (`RESULT name=... ratio=... target=... pass=...`,
see bench/common.py); this collects them. Settings are small but meaningful (below). Each
benchmark's full output is kept in --log_dir (default: a temp dir, printed). A derived row checks
that decoding on all cores (decode_throughput's best pool) outruns the model (model_throughput's
BiT R50x1 images/s): the two come from different subprocesses, so that ratio is across runs.

Total runtime on the 2-core dev machine: about 15-25 minutes, mostly pipeline_overhead and memory,
and much longer when other work loads the machine (everything here is measured in same-run ratios,
but the machine must not be loaded during a run for the wall-clock ones to mean much).
GPU: bench/gpu_xla.py and bench/gpu_session.sh are separate (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import load_note, parse_result, table

BENCHES = [
    ("model_throughput", ["--rounds", "7", "--warmup", "1", "--batches", "2"]),
    ("decode_throughput", ["--images", "200", "--rounds", "5"]),
    ("parquet_write", ["--rows", "4000", "--rounds", "5"]),
    ("pipeline_overhead", ["--n1", "32", "--n2", "160", "--rounds", "3"]),
    ("memory", ["--small", "1000", "--large", "4000"]),
    ("categories", ["--batches", "100", "--model_batches", "3"]),
]
BASELINES = {
    "model_throughput": "Keras ResNet50V2, same process (img/s)",
    "decode_throughput": "plain Pillow draft + resize, 1 core (img/s)",
    "parquet_write": "bare pyarrow write_table (rows/s)",
    "pipeline_overhead": "bare model on decoded images (marginal img/s)",
    "memory": "peak RSS at 1,000 images (ratio = 4,000 / 1,000; lower is better)",
    "decode_vs_model": "model img/s (decode all cores / model)",
    "categories": "R50x1 model CPU per batch (ratio = categories' share; lower is better)",
}


def run_bench(name, extra, log_dir):
    cmd = [sys.executable, os.path.join(REPO, "bench", f"{name}.py"), *extra]
    env = dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seconds = time.perf_counter() - start
    with open(os.path.join(log_dir, f"{name}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n\n" + proc.stdout)
    result = None
    for line in proc.stdout.splitlines():
        result = parse_result(line) or result
    return proc, seconds, result


def decode_vs_model(outputs):
    """Best decode pool images/s over the model's images/s, if both benchmarks ran."""
    dec, mod = outputs.get("decode_throughput"), outputs.get("model_throughput")
    if not dec or not mod:
        return None
    pools = [float(x) for x in re.findall(r"^(?:thread|process) pool\s+([\d.]+)", dec, re.M)]
    model = re.search(r"^\| BiT R50x1[^|]*\| [\d.]+ \| ([\d.]+) \|", mod, re.M)
    if not pools or not model:
        return None
    return max(pools) / float(model.group(1)), max(pools), float(model.group(1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only", default="", help="comma-separated subset of " + ", ".join(n for n, _ in BENCHES)
    )
    ap.add_argument("--log_dir", default=None)
    args = ap.parse_args(argv)
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench-logs-")
    os.makedirs(log_dir, exist_ok=True)
    print(f"logs in {log_dir}; {load_note()} at start", flush=True)

    rows, outputs, total = [], {}, time.perf_counter()
    for name, extra in BENCHES:
        if only and name not in only:
            continue
        print(f"running {name} {' '.join(extra)} ...", flush=True)
        proc, seconds, result = run_bench(name, extra, log_dir)
        outputs[name] = proc.stdout
        if proc.returncode != 0 or result is None:
            tail = " / ".join(proc.stdout.strip().splitlines()[-3:])
            rows.append((name, "-", "-", "ERROR", seconds, f"exit {proc.returncode}: {tail}"))
        else:
            fields = ("name", "ratio", "target", "pass")
            extras = " ".join(f"{k}={v}" for k, v in result.items() if k not in fields)
            verdict = "pass" if result["pass"] == "yes" else "FAIL"
            rows.append((name, result["ratio"], result["target"], verdict, seconds, extras))
        name, ratio, target, verdict, seconds, _ = rows[-1]
        print(f"  {name}: {ratio} (target {target}) {verdict} in {seconds:.0f} s", flush=True)
    derived = decode_vs_model(outputs)
    if derived:
        ratio, dec, mod = derived
        notes = f"decode_all_cores={dec:.1f} model={mod:.2f} (img/s, separate runs)"
        verdict = "pass" if ratio >= 1 else "FAIL"
        rows.append(("decode_vs_model", f"{ratio:.3f}", ">=1", verdict, 0.0, notes))

    print(f"\n{load_note()} at end; total {time.perf_counter() - total:.0f} s")
    table(
        ["benchmark", "baseline", "ratio", "target", "result", "seconds", "notes"],
        [(r[0], BASELINES.get(r[0], ""), *r[1:4], f"{r[4]:.0f}", r[5]) for r in rows],
        text=(0, 1, 4, 6),
    )
    return 0 if all(r[3] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
