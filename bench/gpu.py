"""GPU throughput of the job's model: BiT R50x1 tags + BiT R101x3 embeddings, by precision and XLA.

    .venv/bin/python bench/gpu.py [--batch_size 64] [--precisions float32,bfloat16,float16]
                                  [--xla off,on] [--seconds 10] [--peak_tflops 989]

Random weights in the official `.npz` layout (R50x1 and R101x3, each with the 21,843-class head, as
the BiT-M files) are written to a temp dir and loaded with `TagAndEmbedModel.load(tags, embed,
precision=, jit_compile=, batch_size=)`, exactly as the job loads them. Each configuration calls the
model on uint8 224x224 batches from host memory (host -> device copy and the outputs' copy back
included, as in the job) for about `--seconds`, after 3 warm-up calls (tracing / XLA compilation),
in `--rounds` rounds; medians. FLOP rate = images/s x (4.3 + 71.4) GMACs x 2; it is reported as a
fraction of the GPU's dense peak for the precision (float32 runs on TF32 tensor cores when TF allows
it, so its peak is the TF32 one). The peak comes from `--peak_tflops` or a table by GPU name.
Exits with status 2 and a clear message when TensorFlow sees no GPU, unless `--allow_cpu` (a smoke
run of this script on the CPU, e.g. `--allow_cpu --image_size 32 --batch_size 2 --seconds 0.2
--rounds 1`: checks every configuration runs; its numbers mean nothing for GPUs).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import R50X1, R101X3, write_checkpoint  # noqa: E402

GMACS = {"R50x1": 4.3, "R101x3": 71.4}  # per 224x224 image (incl. the 21k head)

# Dense (no sparsity) peak TFLOPS by GPU name: (substring of the CUDA device name, upper case),
# {precision: TFLOPS}. "tf32" is float32 on tensor cores, "fp32" plain CUDA cores. First match wins.
PEAKS = [
    ("H100 PCIE", {"fp32": 51.2, "tf32": 378.0, "bfloat16": 756.0, "float16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bfloat16": 835.0, "float16": 835.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4}),  # SXM
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4}),  # SXM
    ("GH200", {"fp32": 66.9, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bfloat16": 362.0, "float16": 362.0}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bfloat16": 121.0, "float16": 121.0}),
    ("A10G", {"fp32": 31.2, "tf32": 35.0, "bfloat16": 70.0, "float16": 70.0}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bfloat16": 125.0, "float16": 125.0}),
    ("V100", {"fp32": 15.7, "tf32": 15.7, "bfloat16": None, "float16": 125.0}),
    ("T4", {"fp32": 8.1, "tf32": 8.1, "bfloat16": None, "float16": 65.0}),
]


def gpu_name(tf) -> str:
    gpus = tf.config.list_physical_devices("GPU")
    details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
    return str(details.get("device_name") or gpus[0].name)


def peak_tflops(name: str, precision: str, tf32: bool, override: float | None):
    """(peak TFLOPS or None, what it is) for this GPU and precision."""
    if override:
        return override, "--peak_tflops"
    key = ("tf32" if tf32 else "fp32") if precision == "float32" else precision
    upper = name.upper()
    for needle, table in PEAKS:
        if needle in upper:
            return table.get(key), f"{needle} dense {key}"
    return None, f"unknown GPU {name!r}: pass --peak_tflops"


def images_per_second(model, images, seconds: float, rounds: int) -> list[float]:
    for _ in range(3):  # trace, compile (XLA), autotune
        model(images)
    rates = []
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while True:
            model(images)  # returns NumPy: synchronises with the device every call
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        rates.append(calls * len(images) / elapsed)
    return rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--precisions", default="float32,bfloat16,float16")
    ap.add_argument("--xla", default="off,on", help="'off', 'on' or 'off,on'")
    ap.add_argument("--seconds", type=float, default=10.0, help="per round and configuration")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="dense peak of the GPU at the precision measured (default: by GPU name)",
    )
    ap.add_argument(
        "--allow_cpu",
        action="store_true",
        help="run on the CPU when there is no GPU (smoke run of the script)",
    )
    ap.add_argument(
        "--checkpoint_dir",
        default=None,
        help="reuse/write r50x1.npz and r101x3.npz here instead of a temp dir",
    )
    args = ap.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    on_cpu = not tf.config.list_physical_devices("GPU")
    if on_cpu and not args.allow_cpu:
        print(
            "bench/gpu.py: no GPU visible to TensorFlow (tf.config.list_physical_devices('GPU') "
            "is empty); run it on a machine with an NVIDIA GPU, CUDA drivers and a CUDA-enabled "
            "TensorFlow (pip install 'tensorflow[and-cuda]'). Nothing measured.",
            file=sys.stderr,
        )
        return 2

    from model.bit import TagAndEmbedModel

    name = "CPU (smoke run, --allow_cpu)" if on_cpu else gpu_name(tf)
    tf32 = (
        tf.config.experimental.tensor_float_32_execution_enabled()
        and os.environ.get("NVIDIA_TF32_OVERRIDE") != "0"
    )
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    xla_modes = [m.strip() == "on" for m in args.xla.split(",") if m.strip()]
    gmacs = (
        GMACS["R50x1"] * (args.image_size / 224) ** 2
        + GMACS["R101x3"] * (args.image_size / 224) ** 2
    )

    tmp = args.checkpoint_dir or tempfile.mkdtemp(
        prefix="bench-gpu-", dir=os.environ.get("BENCH_TMP")
    )
    os.makedirs(tmp, exist_ok=True)
    try:
        paths = {}
        for label, arch in (("r50x1", R50X1), ("r101x3", R101X3)):
            paths[label] = os.path.join(tmp, f"{label}.npz")
            if not os.path.exists(paths[label]):
                print(f"writing random {label} checkpoint ...", flush=True)
                write_checkpoint(paths[label], **arch)
        images = np.random.default_rng(0).integers(
            0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8
        )

        rows = []
        for precision in precisions:
            for xla in xla_modes:
                label = f"{precision}{' + XLA' if xla else ''}"
                try:
                    model = TagAndEmbedModel.load(
                        paths["r50x1"],
                        paths["r101x3"],
                        precision=precision,
                        jit_compile=xla,
                        batch_size=args.batch_size,
                    )
                    finite = bool(np.isfinite(model(images).embeddings).all())
                    rates = images_per_second(model, images, args.seconds, args.rounds)
                except Exception as exc:  # noqa: BLE001 - report the configuration, go on
                    print(f"{label}: failed: {type(exc).__name__}: {exc}", flush=True)
                    rows.append((label, None, None, None, None, f"failed: {type(exc).__name__}"))
                    continue
                finally:
                    model = None
                    gc.collect()
                rate = statistics.median(rates)
                tflops = rate * gmacs * 2 / 1e3
                peak, what = peak_tflops(name, precision, tf32, args.peak_tflops)
                rows.append(
                    (
                        label,
                        rate,
                        (min(rates), max(rates)),
                        tflops,
                        tflops / peak if peak else None,
                        what + ("" if finite else "; NON-FINITE outputs"),
                    )
                )
                print(f"  {label}: {rate:.1f} images/s", flush=True)
    finally:
        if not args.checkpoint_dir:
            shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\n{name}, TF {tf.__version__}, BiT R50x1 tags + R101x3 embeddings (random weights, 21k "
        f"heads), batch {args.batch_size}, {args.image_size}x{args.image_size} uint8 from host, "
        f"{gmacs:.1f} GMACs/image; medians of {args.rounds} rounds of ~{args.seconds:g} s; "
        f"TF32 {'on' if tf32 else 'off'}"
    )
    print("| precision | images/s | min-max | TFLOPS achieved | fraction of peak | peak used |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for label, rate, span, tflops, frac, what in rows:
        if rate is None:
            print(f"| {label} | - | - | - | - | {what} |")
            continue
        frac_text = f"{frac:.1%}" if frac is not None else "n/a"
        print(
            f"| {label} | {rate:.1f} | {span[0]:.1f}-{span[1]:.1f} | {tflops:.1f} | {frac_text} "
            f"| {what} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
