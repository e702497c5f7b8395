"""GPU throughput of the job's model (BiT-M R50x1 tags + BiT-M R101x3 embeddings), loaded as the
job loads it, by precision, XLA, batch size and model copies, within a time budget.

    python bench/gpu.py [--precisions float32,bfloat16,float16] [--xla off,on]
                        [--batch_sizes 16,32,64,128] [--model_copies 1,2]
                        [--shared_model_threads 2] [--seconds 3] [--rounds 3]
                        [--budget_s 480] [--json PATH] [--checkpoint_dir DIR] [--peak_tflops T]
    bash bench/gpu_session.sh     # the one prepared command for a session lent a GPU machine

The model. Random weights in the official `.npz` layout (R50x1 and R101x3, each with the
21,843-class head, as the BiT-M files; `--small_models`: two one-unit-per-block nets, for smoke
runs only) are written once (`--checkpoint_dir` keeps them for the next run) and loaded with
`TagAndEmbedModel.load(tags, embed, precision=, jit_compile=, batch_size=, top_k=10,
keep_scores=False)`: the arguments `transforms.infer.load_model` passes for the job's defaults
(`--top_k 10`, no `--write_all_scores`; `job_load_kwargs` below, checked against load_model by
tests/test_gpu_bench.py). So the 10 best tags are chosen on the device and only 10 indices, 10
scores and the embedding of each image come back to the host, as in the job. A model is loaded
once per (precision, XLA mode, copy) and kept for the other batch sizes: the batch size is its
chunk size, and its tf.function is traced (with XLA: compiled) once per batch shape, as after a
fresh load.

What is timed. Each configuration calls the model on uint8 batches from host memory (the host ->
device copy and the outputs' copy back included, as in the job) for about `--seconds` a round, in
`--rounds` rounds, after 3 warm-up calls per model and batch size (trace / XLA compile /
autotune); median and range of the rounds. `--model_copies N` (N > 1): N independently loaded
models, called concurrently from N Python threads on the same GPU, each on its own batches;
images/s is the total of all threads: does overlapping one copy's host work (host -> device copy,
Python, output copy) with another's GPU work help, which is what Beam's `model_copies` is for.
`--shared_model_threads N`: N threads calling ONE loaded model. That is what the job's
`--model_copies N` gives today: Beam serves its N copies from one process (the first that asks),
where `transforms.infer.load_model` returns the one model it cached for the config.

FLOP rate = images/s x MACs/image x 2, MACs counted from the layouts at `--image_size`
(convolutions and head; GroupNorm, ReLU and adds not counted: 4.13 + 69.6 GMACs at 224x224). It is
reported as a fraction of the GPU's dense peak for the precision (float32 runs on TF32 tensor
cores when TF allows it, so its peak is the TF32 one); the peak comes from `--peak_tflops` or a
table by GPU name.

Budget. With `--budget_s`, counted from the start of this script (TensorFlow's import and writing
the checkpoints included), the configurations run in order of importance: float32 and bfloat16 at
`--ref_batch` (64) without and with XLA, and the job's defaults (float32, no XLA, batch 16); then
the other batch sizes in each precision's faster XLA mode; then model copies and shared-model
threads; then float16; then the rest. Before each one, its cost (model loads, warm-ups /
compilation, timed rounds) is estimated from what was measured so far; one that would not end
inside the budget is skipped and said so, and so are the larger batches and copies of a precision
and XLA mode that failed. A watchdog prints the results so far and exits (status 3) if a step
overruns the budget by more than max(10 s, 5%); SIGTERM prints them too. Every result is printed
as soon as it is measured (a `GPU_RESULT {json}` line, flushed), the markdown table last, then a
`RESULT name=gpu ...` line (bench/common.result_line; ratio: best images/s over the job's
defaults; see `summary_ratio`); `--json PATH` writes all of it, rewritten after each configuration.

Exits with status 2 and a clear message when TensorFlow sees no GPU, unless `--allow_cpu` (a smoke
run of this script on the CPU, e.g. `--allow_cpu --small_models --image_size 32 --batch_sizes 2,4
--seconds 0.2 --rounds 1`: checks every configuration runs; its numbers mean nothing for GPUs).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

START = time.perf_counter()  # the budget counts from here

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import R50X1, R101X3, result_line, write_checkpoint  # noqa: E402

JOB_TOP_K = 10  # the job's --top_k default
# Smoke-run stand-ins (--small_models): one unit per block, both with the real 21k head.
SMALL_TAGS = dict(units=(1, 1, 1, 1), width=1, num_classes=21843)
SMALL_EMBED = dict(units=(1, 1, 1, 1), width=1, num_classes=21843)
FIRST = [("float32", False), ("bfloat16", True), ("float32", True), ("bfloat16", False)]
JOB_DEFAULT = dict(precision="float32", xla=False, batch=16, copies=1, shared_model=False)

# Dense (no sparsity) peak TFLOPS by GPU name: (substring of the CUDA device name, upper case),
# {precision: TFLOPS}. "tf32" is float32 on tensor cores, "fp32" plain CUDA cores. First match wins.
PEAKS = [
    ("H100 PCIE", {"fp32": 51.2, "tf32": 378.0, "bfloat16": 756.0, "float16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bfloat16": 835.0, "float16": 835.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4}),  # SXM
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bfloat16": 835.0, "float16": 835.0}),
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
PRECISION_ORDER = ("float32", "bfloat16", "float16")
# Before anything was measured: seconds to load a model per GB of checkpoints (measured on 2 CPU
# cores: 21.8 s for R50x1 + R101x3, 2.3 GB), and a non-XLA warm-up (XLA: 3x).
LOAD_S_PER_GB, WARMUP_PRIOR_S = 10.0, 10.0


def elapsed() -> float:
    return time.perf_counter() - START


def job_load_kwargs(precision: str, xla: bool, batch: int) -> dict:
    """`TagAndEmbedModel.load` keyword arguments as the job's `transforms.infer.load_model` passes
    them for its default flags (--top_k 10, no --write_all_scores, no --model_cache_dir)."""
    return dict(
        precision=precision,
        jit_compile=bool(xla),
        batch_size=int(batch),
        cache_dir=None,
        top_k=JOB_TOP_K,
        keep_scores=False,
    )


# ---- arguments ---------------------------------------------------------------------------------


def parse_ints(text: str, name: str) -> list[int]:
    """'16,32, 64' -> [16, 32, 64] (order kept, duplicates dropped); '' or '0' -> []."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {part!r} is not an integer") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name}: {value} is negative")
        if value and value not in values:
            values.append(value)
    return values


def parse_xla(text: str) -> list[bool]:
    modes = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part not in ("off", "on"):
            raise argparse.ArgumentTypeError(f"--xla: {part!r} is neither 'off' nor 'on'")
        if (part == "on") not in modes:
            modes.append(part == "on")
    return modes


def parse_precisions(text: str) -> list[str]:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part not in PRECISION_ORDER:
            raise argparse.ArgumentTypeError(
                f"--precisions: {part!r} is not one of {', '.join(PRECISION_ORDER)}"
            )
        if part not in out:
            out.append(part)
    return out


# ---- configurations and their order ------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    precision: str
    xla: bool
    batch: int
    copies: int = 1
    shared: bool = False  # `copies` threads calling ONE model (what the job's --model_copies gives)

    @property
    def label(self) -> str:
        return self.precision + (" + XLA" if self.xla else "")

    @property
    def copies_text(self) -> str:
        if self.copies == 1:
            return "1"
        return f"{self.copies} threads, 1 model" if self.shared else str(self.copies)

    @property
    def name(self) -> str:
        """Short machine-readable name: float32-xla_off-b64-c1 (c2s: 2 threads sharing a model)."""
        xla = "on" if self.xla else "off"
        shared = "s" if self.shared else ""
        return f"{self.precision}-xla_{xla}-b{self.batch}-c{self.copies}{shared}"

    def model_keys(self) -> list[tuple]:
        """The loaded models this configuration calls: (precision, xla, copy index)."""
        count = 1 if self.shared else self.copies
        return [(self.precision, self.xla, i) for i in range(count)]

    def as_dict(self) -> dict:
        return dict(
            name=self.name,
            precision=self.precision,
            xla=self.xla,
            batch=self.batch,
            copies=self.copies,
            shared_model=self.shared,
        )


def matrix(precisions, xla_modes, batch_sizes, copies, shared_threads) -> list[Config]:
    """Every configuration: precisions x XLA modes x batch sizes x (copies, shared threads)."""
    configs = []
    for precision in precisions:
        for xla in xla_modes:
            for batch in batch_sizes:
                for n in copies:
                    configs.append(Config(precision, xla, batch, n))
                for n in shared_threads:
                    if n > 1:
                        configs.append(Config(precision, xla, batch, n, shared=True))
    return list(dict.fromkeys(configs))


def pick_ref_batch(batch_sizes, wanted: int = 64) -> int:
    """`wanted` if listed, else the listed size nearest to it (the larger on a tie)."""
    return min(batch_sizes, key=lambda b: (abs(math.log2(b / wanted)), -b))


def best_xla(precision: str, rates: dict, ref_batch: int, xla_modes) -> bool:
    """The faster XLA mode of `precision` at the reference batch, one copy (measured so far); with
    nothing measured, the first listed mode."""
    measured = {
        c.xla: rate
        for c, rate in rates.items()
        if c.precision == precision and c.batch == ref_batch and c.copies == 1 and rate
    }
    if measured:
        return max(measured, key=measured.get)
    return xla_modes[0]


def is_job_default(config: Config) -> bool:
    """float32, no XLA, batch 16, one copy: the job's default flags."""
    return config.as_dict() | {"name": ""} == dict(JOB_DEFAULT, name="")


def importance(config: Config, ref_batch: int, rates: dict, xla_modes) -> tuple:
    """Sort key (lower first) of a configuration, given the images/s measured so far (`rates`:
    Config -> median, None for a failed one). Tiers: 0 float32/bfloat16 at the reference batch,
    both XLA modes, then the job's defaults (float32, no XLA, batch 16); 1 the other batch sizes of
    float32/bfloat16 in their faster XLA mode; 2 model copies / shared threads there; 3 float16
    at the reference batch; 4 the rest."""
    main = config.precision in ("float32", "bfloat16")
    by_rate = -max(
        (r for c, r in rates.items() if c.precision == config.precision and r), default=0.0
    )
    distance = (abs(math.log2(config.batch / ref_batch)), -config.batch)
    faster = config.xla == best_xla(config.precision, rates, ref_batch, xla_modes)
    first = (config.precision, config.xla)
    if main and config.copies == 1 and config.batch == ref_batch:
        return (0, FIRST.index(first) if first in FIRST else len(FIRST))
    if is_job_default(config):
        return (0, len(FIRST) + 1)
    if main and config.copies == 1 and faster:
        return (1, distance, by_rate, config.precision)
    if main and config.copies > 1 and config.batch == ref_batch and faster:
        return (2, config.shared, config.copies, by_rate, config.precision)
    if not main and config.copies == 1 and config.batch == ref_batch:
        return (3, PRECISION_ORDER.index(config.precision), config.xla)
    return (
        4,
        config.copies != 1,
        PRECISION_ORDER.index(config.precision),
        distance,
        config.xla,
        config.shared,
        config.copies,
    )


class Estimator:
    """Seconds a configuration will take, from what the earlier ones took: each model it has to
    load (the slowest load so far; before any, `load_prior_s`), each warm-up on a new (model,
    batch) (the slowest of the same XLA mode; without one, 3x the slowest non-XLA warm-up for XLA;
    before any, `warmup_prior_s`, 3x for XLA), the timed rounds (plus one call a round, at the
    slowest rate per image seen); +15% and 2 s."""

    MARGIN, SLACK_S, XLA_OVER_PLAIN = 1.15, 2.0, 3.0

    def __init__(self, seconds: float, rounds: int, load_prior_s=0.0, warmup_prior_s=0.0):
        self.seconds, self.rounds = seconds, rounds
        self.load_prior_s, self.warmup_prior_s = load_prior_s, warmup_prior_s
        self.loads: list[float] = []
        self.warmups: dict[bool, list[float]] = {False: [], True: []}
        self.seconds_per_image: list[float] = []

    def record(self, load_s=(), warmups=(), xla=False, rate=None, copies=1):
        self.loads.extend(load_s)
        self.warmups[bool(xla)].extend(warmups)
        if rate:
            self.seconds_per_image.append(copies / rate)  # one thread's time per image

    def warmup_s(self, xla: bool) -> float:
        same, other = self.warmups[xla], self.warmups[not xla]
        if same:
            return max(same)
        if other:
            return max(other) * (self.XLA_OVER_PLAIN if xla else 1.0)
        return self.warmup_prior_s * (self.XLA_OVER_PLAIN if xla else 1.0)

    def estimate(self, config: Config, loaded=(), warmed=()) -> float:
        keys = config.model_keys()
        loads = sum(k not in loaded for k in keys)
        warms = sum((k, config.batch) not in warmed for k in keys)
        call_s = max(self.seconds_per_image, default=0.0) * config.batch
        timed = self.rounds * (self.seconds + call_s)
        load_s = max(self.loads, default=self.load_prior_s)
        work = loads * load_s + warms * self.warmup_s(config.xla) + timed
        return self.MARGIN * work + self.SLACK_S


# ---- FLOPs and peaks ---------------------------------------------------------------------------


def resnet_macs(units, width: int, num_classes, image_size: int) -> int:
    """Multiply-accumulates of one image through a BiT ResNet-v2 (model/resnet.py's layers: the
    7x7/2 root conv, 3x3/2 max-pool, bottleneck units with the stride on the 3x3 conv and the
    projection, the head): convolutions and head only."""
    h = (image_size + 6 - 7) // 2 + 1  # pad 3, 7x7 stride 2
    macs = h * h * 7 * 7 * 3 * 64 * width
    h = (h + 2 - 3) // 2 + 1  # pad 1, max-pool 3x3 stride 2
    cin = 64 * width
    for block, count in enumerate(units):
        cmid = 64 * width * 2**block
        cout = 4 * cmid
        for unit in range(count):
            stride = 2 if unit == 0 and block > 0 else 1
            macs += h * h * cin * cmid  # a: 1x1
            h = (h + 2 - 3) // stride + 1
            macs += h * h * 9 * cmid * cmid  # b: 3x3 (stride)
            macs += h * h * cmid * cout  # c: 1x1
            if unit == 0:
                macs += h * h * cin * cout  # projection (stride)
            cin = cout
    return macs + (cin * num_classes if num_classes else 0)


def gpu_name(tf) -> str:
    gpus = tf.config.list_physical_devices("GPU")
    details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
    return str(details.get("device_name") or gpus[0].name)


def peak_tflops(name: str, precision: str, tf32: bool, override: float | None):
    """(peak TFLOPS or None, what it is) for this GPU and precision."""
    if override:
        return override, "--peak_tflops"
    if name.startswith("CPU"):
        return None, "CPU: no peak"
    key = ("tf32" if tf32 else "fp32") if precision == "float32" else precision
    upper = name.upper()
    for needle, table in PEAKS:
        if needle in upper:
            return table.get(key), f"{needle} dense {key}"
    return None, f"unknown GPU {name!r}: pass --peak_tflops"


# ---- timing ------------------------------------------------------------------------------------


def timed_round(callers, seconds: float, batch: int) -> float:
    """Images/s of one round: each of `callers` (no-argument callables, one model call on one batch
    each) is called in a loop from its own thread (inline for one) until `seconds` have passed;
    total images over the time until the last call ended."""
    if len(callers) == 1:
        calls, start = 0, time.perf_counter()
        while True:
            callers[0]()  # returns NumPy: synchronises with the device every call
            calls += 1
            if time.perf_counter() - start >= seconds:
                break
        return calls * batch / (time.perf_counter() - start)
    counts = [0] * len(callers)
    errors = []
    gate = threading.Barrier(len(callers) + 1)
    stop = [0.0]

    def work(i):
        gate.wait()
        try:
            while True:
                callers[i]()
                counts[i] += 1
                if time.perf_counter() >= stop[0]:
                    break
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(callers))]
    for t in threads:
        t.start()
    start = time.perf_counter()
    stop[0] = start + seconds
    gate.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) * batch / (time.perf_counter() - start)


def check_outputs(out, batch: int) -> str:
    """'' when a call's outputs look like the job's model's (top-k only, finite), else a note."""
    notes = []
    if out.scores is not None or out.top_indices is None:
        notes.append("model not loaded as the job's (full scores kept or no top-k)")
    elif out.top_indices.shape != (batch, JOB_TOP_K):
        notes.append(f"top-k shape {out.top_indices.shape}")
    import numpy as np

    finite = np.isfinite(out.embeddings).all() and (
        out.top_scores is None or np.isfinite(out.top_scores).all()
    )
    if not finite:
        notes.append("NON-FINITE outputs")
    return "; ".join(notes)


# ---- results -----------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    """The markdown table of `rows` (the JSON result dicts), grouped by precision, XLA, copies,
    batch."""

    def order(r):
        return (
            PRECISION_ORDER.index(r["precision"]),
            r["xla"],
            r["shared_model"],
            r["copies"],
            r["batch"],
        )

    lines = [
        "| configuration | batch | copies | images/s (median) | range | achieved TFLOPS "
        "| fraction of peak | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(rows, key=order):
        label = r["precision"] + (" + XLA" if r["xla"] else "")
        copies = r["copies_text"]
        if r.get("images_per_s") is None:
            lines.append(f"| {label} | {r['batch']} | {copies} | - | - | - | - | {r['notes']} |")
            continue
        frac = r.get("fraction_of_peak")
        frac_text = f"{frac:.1%}" if frac is not None else "n/a"
        lines.append(
            f"| {label} | {r['batch']} | {copies} | {r['images_per_s']:.1f} "
            f"| {r['min']:.1f}-{r['max']:.1f} | {r['tflops']:.1f} | {frac_text} | {r['notes']} |"
        )
    return "\n".join(lines)


def summary_ratio(rows: list[dict]):
    """(best row, baseline row) among the measured rows, or (None, None). The baseline is the
    job's defaults (float32, no XLA, batch 16, 1 copy) if measured, else float32 without XLA and
    one copy at the smallest batch measured, else the best row itself."""
    measured = [r for r in rows if r.get("images_per_s")]
    if not measured:
        return None, None
    best = max(measured, key=lambda r: r["images_per_s"])
    plain = [
        r for r in measured if r["precision"] == "float32" and not r["xla"] and r["copies"] == 1
    ]
    default = [r for r in plain if r["batch"] == JOB_DEFAULT["batch"]]
    baseline = (default or sorted(plain, key=lambda r: r["batch"]) or [best])[0]
    return best, baseline


class Report:
    """Rows, skips and the header; prints the final table once (main thread, watchdog or
    SIGTERM, whichever comes first) and keeps the JSON file current."""

    def __init__(self, json_path, header: dict):
        self.json_path = json_path
        self.header = header
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.lock = threading.RLock()
        self.done = False
        self.stopped = None

    def add(self, row: dict):
        with self.lock:
            self.rows.append(row)
            print("GPU_RESULT " + json.dumps(row, sort_keys=True), flush=True)
            self.write_json(complete=False)

    def skip(self, config: Config, reason: str, estimate_s=None, left_s=None):
        with self.lock:
            self.skipped.append(
                dict(config.as_dict(), reason=reason, estimate_s=estimate_s, left_s=left_s)
            )
            print(f"  skipped {config.name}: {reason}", flush=True)

    def write_json(self, complete: bool):
        if not self.json_path:
            return
        data = dict(
            self.header,
            results=self.rows,
            skipped=self.skipped,
            elapsed_s=round(elapsed(), 1),
            complete=complete,
            stopped=self.stopped,
        )
        os.makedirs(os.path.dirname(os.path.abspath(self.json_path)), exist_ok=True)
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.json_path)

    def final(self, stopped: str | None = None) -> bool:
        """Print the table and the RESULT line, write the JSON; False if already done."""
        with self.lock:
            if self.done:
                return False
            self.done, self.stopped = True, stopped
            h = self.header
            print(f"\n{h['title']}", flush=True)
            if stopped:
                print(f"STOPPED EARLY: {stopped}", flush=True)
            print(format_table(self.rows), flush=True)
            if self.skipped:
                names = ", ".join(s["name"] for s in self.skipped)
                print(
                    f"\nnot measured ({len(self.skipped)}; budget or errors, see above): {names}",
                    flush=True,
                )
            best, baseline = summary_ratio(self.rows)
            if best is not None:
                result_line(
                    "gpu",
                    best["images_per_s"] / baseline["images_per_s"],
                    1.0,
                    best=best["name"],
                    best_images_per_s=f"{best['images_per_s']:.1f}",
                    baseline=baseline["name"],
                    baseline_images_per_s=f"{baseline['images_per_s']:.1f}",
                    device=h["machine"]["device"],
                    measured=len([r for r in self.rows if r.get("images_per_s")]),
                    skipped=len(self.skipped),
                )
            self.write_json(complete=stopped is None)
            sys.stdout.flush()
            return True


# ---- main --------------------------------------------------------------------------------------


def blocked_by(config: Config, failed) -> Config | None:
    """The failed configuration that makes `config` pointless (same precision and XLA mode, at
    most its batch size and copies: it would fail too, e.g. out of memory or an unsupported
    dtype), or None."""
    for f in failed:
        if (
            (f.precision, f.xla) == (config.precision, config.xla)
            and config.batch >= f.batch
            and config.copies >= f.copies
        ):
            return f
    return None


def _row(config: Config, load_s, warm_s, started: float, **fields) -> dict:
    """One report row: the configuration, its load and warm-up seconds, `fields`, total time."""
    return dict(
        config.as_dict(),
        copies_text=config.copies_text,
        load_s=[round(s, 2) for s in load_s],
        warmup_s=[round(s, 2) for s in warm_s],
        total_s=round(time.perf_counter() - started, 2),
        **fields,
    )


class Bench:
    """Runs the configurations in order of importance inside the budget (module docstring)."""

    def __init__(self, args, report: Report, device: str, tf32: bool, gmacs: float):
        self.args, self.report = args, report
        self.device, self.tf32, self.gmacs = device, tf32, gmacs
        self.estimator = Estimator(args.seconds, args.rounds)
        self.loaded: OrderedDict = OrderedDict()  # (precision, xla, i) -> model, LRU first
        self.warmed: set = set()  # ((precision, xla, i), batch)
        self.rates: dict = {}  # Config -> median images/s, None if it failed
        self.failed: list[Config] = []

    def run(self, paths: dict):
        args = self.args
        gigabytes = sum(os.path.getsize(p) for p in paths.values()) / 1e9
        self.estimator.load_prior_s = LOAD_S_PER_GB * gigabytes
        self.estimator.warmup_prior_s = WARMUP_PRIOR_S
        pending = matrix(
            args.precisions,
            args.xla_modes,
            args.batch_sizes,
            args.model_copies,
            args.shared_model_threads,
        )
        while pending:
            pending.sort(key=lambda c: importance(c, args.ref_batch, self.rates, args.xla_modes))
            config = pending.pop(0)
            failed = blocked_by(config, self.failed)
            if failed is not None:
                self.report.skip(config, f"{failed.name} failed")
                continue
            estimate = self.estimator.estimate(config, self.loaded, self.warmed)
            left = args.budget_s - elapsed() if args.budget_s else math.inf
            if estimate > left:
                self.report.skip(
                    config,
                    f"needs ~{estimate:.0f} s, {max(left, 0):.0f} s left",
                    round(estimate, 1),
                    round(left, 1),
                )
                continue
            print(f"{config.name} (estimate {estimate:.0f} s) ...", flush=True)
            self.run_one(config, paths, estimate)

    def _model(self, key, config: Config, paths: dict, load_s: list):
        from model.bit import TagAndEmbedModel

        if key in self.loaded:
            self.loaded.move_to_end(key)
        else:
            while len(self.loaded) >= max(1, self.args.max_loaded_models):
                self._forget(next(iter(self.loaded)))
            t0 = time.perf_counter()
            self.loaded[key] = TagAndEmbedModel.load(
                paths["tags"],
                paths["embed"],
                **job_load_kwargs(config.precision, config.xla, config.batch),
            )
            load_s.append(time.perf_counter() - t0)
        model = self.loaded[key]
        model.batch_size = config.batch  # its chunk size: as if loaded with this batch size
        return model

    def _forget(self, key):
        self.loaded.pop(key, None)
        self.warmed.difference_update({w for w in self.warmed if w[0] == key})
        gc.collect()

    def run_one(self, config: Config, paths: dict, estimate: float):
        import numpy as np

        args, started = self.args, time.perf_counter()
        load_s, warm_s, notes = [], [], []
        keys = config.model_keys()
        try:
            models = [self._model(key, config, paths, load_s) for key in keys]
            images = [
                np.random.default_rng(i).integers(
                    0, 256, (config.batch, args.image_size, args.image_size, 3), np.uint8
                )
                for i in range(config.copies)
            ]
            for key, model, batch in zip(keys, models, images):
                if (key, config.batch) in self.warmed:
                    continue
                t0 = time.perf_counter()
                for _ in range(3):  # trace, compile (XLA), autotune
                    out = model(batch)
                warm_s.append(time.perf_counter() - t0)
                self.warmed.add((key, config.batch))
                note = check_outputs(out, config.batch)
                if note and note not in notes:
                    notes.append(note)
            callers = [
                (lambda m=models[0 if config.shared else i], x=images[i]: m(x))
                for i in range(config.copies)
            ]
            t0 = time.perf_counter()
            rounds = [timed_round(callers, args.seconds, config.batch) for _ in range(args.rounds)]
            measure_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - report the configuration, go on
            message = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            print(f"  {config.name}: {message}", flush=True)
            self.estimator.record(load_s, warm_s, config.xla)
            self.rates[config] = None
            self.failed.append(config)
            for key in keys:  # a model that failed is not reused
                self._forget(key)
            self.report.add(_row(config, load_s, warm_s, started, images_per_s=None, notes=message))
            return
        rate = statistics.median(rounds)
        self.rates[config] = rate
        self.estimator.record(load_s, warm_s, config.xla, rate, config.copies)
        tflops = rate * self.gmacs * 2 / 1e3
        peak, what = peak_tflops(self.device, config.precision, self.tf32, args.peak_tflops)
        notes.append(f"peak {peak:g} ({what})" if peak else what)
        if load_s:
            notes.append("load " + "+".join(f"{s:.1f}" for s in load_s) + " s")
        if warm_s:
            notes.append("warm-up " + "+".join(f"{s:.1f}" for s in warm_s) + " s")
        total = time.perf_counter() - started
        self.report.add(
            _row(
                config,
                load_s,
                warm_s,
                started,
                images_per_s=rate,
                rounds=rounds,
                min=min(rounds),
                max=max(rounds),
                tflops=tflops,
                peak_tflops=peak,
                fraction_of_peak=tflops / peak if peak else None,
                notes="; ".join(notes),
                measure_s=round(measure_s, 2),
                estimate_s=round(estimate, 1),
                at_s=round(elapsed(), 1),
            )
        )
        print(
            f"  {config.name}: {rate:.1f} images/s ({tflops:.2f} TFLOPS; took {total:.1f} s, "
            f"estimated {estimate:.0f} s; {elapsed():.0f} s so far)",
            flush=True,
        )


def on_sigterm(callback):
    """Call `callback` from a helper thread as soon as SIGTERM arrives, even while the main thread
    is inside a long TensorFlow call (XLA compilation), where a Python signal handler would wait:
    the interpreter's C handler writes the signal number to the wakeup fd at once."""
    import socket

    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.signal(signal.SIGTERM, lambda *_: callback())
    signal.set_wakeup_fd(writer.fileno())

    def watch():
        while True:
            data = reader.recv(1)
            if not data:
                return
            if data[0] == signal.SIGTERM:
                callback()

    threading.Thread(target=watch, daemon=True).start()
    return reader, writer  # keep the sockets alive


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--batch_sizes",
        default="16,32,64,128",
        help="comma list of batch sizes (images per model call)",
    )
    ap.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="one batch size (same as --batch_sizes N; overrides it)",
    )
    ap.add_argument(
        "--ref_batch",
        type=int,
        default=64,
        help="the batch size measured first (the nearest listed one if not listed)",
    )
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--precisions", default="float32,bfloat16,float16")
    ap.add_argument("--xla", default="off,on", help="'off', 'on' or 'off,on'")
    ap.add_argument(
        "--model_copies",
        default="1,2",
        help="comma list: N independently loaded models called from N threads at once",
    )
    ap.add_argument(
        "--shared_model_threads",
        default="2",
        help="comma list: N threads calling one loaded model (the job's --model_copies N today); "
        "'' or 0: none",
    )
    ap.add_argument("--seconds", type=float, default=3.0, help="per round and configuration")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--budget_s",
        type=float,
        default=0.0,
        help="wall-clock budget in seconds from the script's start (0: none); configurations "
        "that would not fit are skipped",
    )
    ap.add_argument("--json", default=None, help="write the results here (JSON)")
    ap.add_argument(
        "--max_loaded_models",
        type=int,
        default=6,
        help="models kept loaded for reuse across batch sizes (least recently used dropped)",
    )
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
        "--small_models",
        action="store_true",
        help="smoke runs: two one-unit-per-block nets with 21k heads instead of R50x1 + R101x3",
    )
    ap.add_argument(
        "--checkpoint_dir",
        default=None,
        help="reuse/write the random checkpoints here instead of a temp dir",
    )
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args.batch_sizes = (
            [args.batch_size] if args.batch_size else parse_ints(args.batch_sizes, "--batch_sizes")
        )
        args.precisions = parse_precisions(args.precisions)
        args.xla_modes = parse_xla(args.xla)
        args.model_copies = parse_ints(args.model_copies, "--model_copies")
        args.shared_model_threads = [
            n for n in parse_ints(args.shared_model_threads, "--shared_model_threads") if n > 1
        ]
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    if not args.batch_sizes or not args.precisions or not args.xla_modes:
        ap.error("--batch_sizes, --precisions and --xla need at least one value each")
    if not args.model_copies and not args.shared_model_threads:
        ap.error("--model_copies and --shared_model_threads are both empty")
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds must be >= 1 and --seconds > 0")
    args.ref_batch = pick_ref_batch(args.batch_sizes, args.ref_batch)
    return args


def write_checkpoints(directory: str, small: bool) -> dict:
    """{'tags': path, 'embed': path} of random checkpoints in `directory`, written if missing
    (atomically: a killed run leaves no half file)."""
    layouts = (
        (("tags", "small-tags", SMALL_TAGS, 0), ("embed", "small-embed", SMALL_EMBED, 1))
        if small
        else (("tags", "r50x1", R50X1, 0), ("embed", "r101x3", R101X3, 1))
    )
    paths = {}
    for role, name, arch, seed in layouts:
        path = os.path.join(directory, f"{name}.npz")
        if not os.path.exists(path):
            start = time.perf_counter()
            print(f"writing random {name} checkpoint to {path} ...", flush=True)
            tmp = path + f".{os.getpid()}.partial"
            write_checkpoint(tmp, seed=seed, **arch)
            os.replace(tmp, path)
            print(f"  {time.perf_counter() - start:.1f} s", flush=True)
        paths[role] = path
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)

    import tensorflow as tf

    on_cpu = not tf.config.list_physical_devices("GPU")
    if on_cpu and not args.allow_cpu:
        print(
            "bench/gpu.py: no GPU visible to TensorFlow (tf.config.list_physical_devices('GPU') "
            "is empty); run it on a machine with an NVIDIA GPU, its driver and a CUDA-enabled "
            "TensorFlow with CUDA 12 + cuDNN 9 libraries (pip install 'tensorflow[and-cuda]'). "
            "Nothing measured.",
            file=sys.stderr,
        )
        return 2

    name = "CPU (smoke run, --allow_cpu)" if on_cpu else gpu_name(tf)
    tf32 = (
        tf.config.experimental.tensor_float_32_execution_enabled()
        and os.environ.get("NVIDIA_TF32_OVERRIDE") != "0"
    )
    build = tf.sysconfig.get_build_info()
    layouts = (SMALL_TAGS, SMALL_EMBED) if args.small_models else (R50X1, R101X3)
    macs = [resnet_macs(image_size=args.image_size, **arch) for arch in layouts]
    gmacs = sum(macs) / 1e9
    models_text = (
        "two one-unit-per-block ResNetV2 stand-ins (--small_models)"
        if args.small_models
        else "BiT R50x1 tags + R101x3 embeddings"
    )
    budget_text = f"budget {args.budget_s:g} s" if args.budget_s else "no budget"
    header = dict(
        bench="gpu",
        title=(
            f"{name}, TF {tf.__version__} (CUDA {build.get('cuda_version', '-')}, cuDNN "
            f"{build.get('cudnn_version', '-')}), {models_text} (random weights, 21k heads; "
            f"loaded as the job: top_k={JOB_TOP_K}, keep_scores=False), "
            f"{args.image_size}x{args.image_size} uint8 from host, {gmacs:.2f} GMACs/image; "
            f"medians of {args.rounds} rounds of ~{args.seconds:g} s; TF32 "
            f"{'on' if tf32 else 'off'}; {budget_text}"
        ),
        machine=dict(
            device=name,
            tensorflow=tf.__version__,
            cuda=build.get("cuda_version"),
            cudnn=build.get("cudnn_version"),
            tf32=bool(tf32),
            cpus=os.cpu_count(),
        ),
        settings=dict(
            precisions=args.precisions,
            xla=args.xla_modes,
            batch_sizes=args.batch_sizes,
            ref_batch=args.ref_batch,
            model_copies=args.model_copies,
            shared_model_threads=args.shared_model_threads,
            image_size=args.image_size,
            seconds=args.seconds,
            rounds=args.rounds,
            budget_s=args.budget_s,
            small_models=args.small_models,
            top_k=JOB_TOP_K,
            keep_scores=False,
        ),
        gmacs_per_image=dict(tags=macs[0] / 1e9, embed=macs[1] / 1e9),
    )
    report = Report(args.json, header)
    bench = Bench(args, report, name, tf32, gmacs)
    grace = max(10.0, 0.05 * args.budget_s)

    def stop(reason: str, status: int):
        if report.final(reason):
            os._exit(status)

    sigterm_fds = on_sigterm(lambda: stop("SIGTERM", 143))  # noqa: F841 - kept open
    watchdog = None
    if args.budget_s:
        watchdog = threading.Timer(
            max(0.0, args.budget_s + grace - elapsed()),
            stop,
            (f"budget {args.budget_s:g} s overrun by more than {grace:g} s", 3),
        )
        watchdog.daemon = True
        watchdog.start()
    tmp = args.checkpoint_dir or tempfile.mkdtemp(
        prefix="bench-gpu-", dir=os.environ.get("BENCH_TMP")
    )
    try:
        os.makedirs(tmp, exist_ok=True)
        paths = write_checkpoints(tmp, args.small_models)
        print(f"ready after {elapsed():.1f} s (TensorFlow import, checkpoints)", flush=True)
        bench.run(paths)
    except BaseException as exc:
        report.final(f"{type(exc).__name__}: {exc}")
        raise
    else:
        report.final()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        bench.loaded.clear()
        gc.collect()
        if not args.checkpoint_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
