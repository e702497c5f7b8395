"""The job's model on a GPU without TensorFlow there: its own graph, exported as XLA programs.

    python bench/gpu_xla.py export --out DIR [--small_models] [--batch_sizes 16,64,128,256]
                                   [--precisions float32,tf32,bfloat16] [--image_size 224]
    python bench/gpu_xla.py run DIR [--json FILE] [--budget_s S] [--seconds 1] [--rounds 5]
                                    [--programs bfloat16-b64,...]
    python bench/gpu_xla.py peer [--small_models] [--batch_sizes 64,128,256] [--image_size 224]
                                 [--json FILE] [--budget_s S]
    python bench/gpu_xla.py table RUN.json [PEER.json]
    bash bench/gpu_session.sh          # all of it, as the one command of a GPU session

`export` (TensorFlow: the project's venv) loads the model exactly as the job does
(`transforms.infer.load_model`: tags + embed, the 10 best tags chosen in the graph, full scores
dropped, `--xla`, the job's precision handling) from random checkpoints in the official layout,
and writes for each precision and batch size the HLO module TensorFlow's XLA bridge compiles
(`<precision>-b<batch>.hlo.pb.gz`), a `manifest.json` (parameter order, names, shapes, dtypes and
how each derives from a BiT `.npz`; output names; the generator of the weights) and
`reference.npz` (a few images and TensorFlow's CPU outputs for them, without XLA). The files carry
no weights: they are regenerated from a seed (`checkpoint_arrays`). `tf32` is the float32 model
traced with TensorFlow's default TF32 permission (what the job's float32 runs on a GPU);
`float32` is traced with it off, so convolutions and matrix products ask for the highest
precision. The embed model is exported without its classification head, which the job loads but
never uses (XLA would drop its work but keep its 537 MB kernel as a parameter).

`run` imports no TensorFlow (it needs numpy, ml-dtypes and jax; of the project only the TF-free
`model.checkpoint`, `model.flops` and `bench.common`): it compiles each program on jax's default
backend, feeds the export's weights, checks its outputs on the reference images (zero-padded to
the batch, as the job pads) and times it: images/s is the median of rounds of calls that each
copy a uint8 batch to the device and the outputs back. TFLOP/s = images/s x 2 x `model.flops` MACs.

`peer` times timm's `resnetv2_50x1_bit` (21,843-class head, sigmoid, top-10) +
`resnetv2_101x3_bit` (pre-logits) in PyTorch, random init, bf16 autocast, channels_last, eager
and `torch.compile`, on the same uint8 batches. `table` prints both side by side. What the
figures mean, and the targets: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

START = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import load_note, result_line  # noqa: E402
from model.checkpoint import HEAD_KERNEL, WS_EPS, Architecture, parameter_value  # noqa: E402
from model.flops import macs_per_image  # noqa: E402

MODELS = {  # role -> (architecture, seed); the embed model without its unused head
    "tags": (Architecture((3, 4, 6, 3), 1, 21843), 0),
    "embed": (Architecture((3, 4, 23, 3), 3, None), 1),
}
SMALL_MODELS = {  # --small_models: one unit per block, the real 21k head; seconds in CI
    "tags": (Architecture((1, 1, 1, 1), 1, 21843), 0),
    "embed": (Architecture((1, 1, 1, 1), 1, None), 1),
}
PRECISIONS = ("bfloat16", "float32", "tf32")  # also the order of importance at a batch size
MODEL_PRECISION = {"float32": "float32", "tf32": "float32", "bfloat16": "bfloat16"}
PEER_MODELS = {"tags": "resnetv2_50x1_bit", "embed": "resnetv2_101x3_bit"}  # timm's names
REF_IMAGES = 4
FIRST_BATCH = 64  # measured first, in every precision; then the larger ones, then the smaller
# Dense TFLOP/s from NVIDIA's datasheets (SXM unless named; float32 on CUDA cores, TF32 and bf16
# on tensor cores without sparsity). First match of the device name wins.
PEAKS = [
    ("H100 PCIE", {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0}),
    ("H100 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.0}),
    ("H200 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.0}),
    ("H100", {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4}),
    ("H200", {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4}),
    ("A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0}),
    ("L40S", {"float32": 91.6, "tf32": 183.0, "bfloat16": 362.0}),
    ("L4", {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0}),
]
# Targets (docs/gpu.md): bf16 at >= 50% of what large bf16 matrix products reach on an H200
# (~790 TFLOP/s measured, 989 on the datasheet): 0.4 of the datasheet peak; >= 1x timm compiled.
BF16_TARGET, TIMM_TARGET = 0.4, 1.0
DERIVE = {
    "standardize": f"weight standardization per output channel: (w - mean) / sqrt(var + "
    f"{WS_EPS:g}), population mean/var over H, W, I in float64, then float32",
    "reshape_head": "[1, 1, C, K] -> [C, K]",
    "none": "as stored",
}


def peak_tflops(device: str, precision: str):
    upper = device.upper()
    for needle, table in PEAKS:
        if needle in upper:
            return table[precision]
    return None


# ---- weights: the same on every machine, from a seed ---------------------------------------


def checkpoint_arrays(architecture: Architecture, seed: int) -> dict:
    """A random checkpoint in the official `.npz` layout (key -> float32 array), the same bits on
    any machine: uniform floats from PCG64 streams `[seed, index]` and float32 arithmetic only.
    GroupNorm gamma 1 +- 0.2, beta and bias +- 0.1, kernels He-uniform (convolutions plus a
    per-output-channel offset for the standardization to remove; the head without, so that its
    logits stay in the sigmoid's slope and the top-k scores do not tie)."""
    shapes = list(architecture.expected_shapes().items())

    def one(index):
        key, shape = shapes[index]
        rng = np.random.default_rng([seed, index])
        u = rng.random(shape, dtype=np.float32) * np.float32(2) - np.float32(1)
        if key.endswith("/gamma"):
            return key, np.float32(1) + np.float32(0.2) * u
        if key.endswith(("/beta", "/bias")):
            return key, np.float32(0.1) * u
        value = u * np.float32(np.sqrt(6.0 / np.prod(shape[:-1])))
        if key != HEAD_KERNEL:
            value += np.float32(0.01) * rng.random(shape[-1], dtype=np.float32)
        return key, value

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(pool.map(one, range(len(shapes))))


def fingerprint(arrays: dict) -> str:
    digest = hashlib.sha256()
    for key, value in arrays.items():
        digest.update(key.encode() + np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def derive(key: str) -> str:
    if key == HEAD_KERNEL:
        return "reshape_head"
    return "standardize" if key.endswith("standardized_conv2d/kernel") else "none"


def reference_images(count: int, size: int) -> np.ndarray:
    return np.random.default_rng([7, size]).integers(0, 256, (count, size, size, 3), np.uint8)


def model_code_sha256() -> str:
    """Of the sources that make the exported graph: `run` warns when they changed since."""
    digest = hashlib.sha256()
    for name in ("model/resnet.py", "model/bit.py", "model/group_norm.py", "model/checkpoint.py"):
        with open(os.path.join(REPO, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


# ---- export (TensorFlow) ---------------------------------------------------------------------


def export(args) -> int:
    """Writes the programs, manifest.json and reference.npz to args.out (module docstring)."""
    import tempfile

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from transforms.infer import InferenceConfig, load_model

    models = SMALL_MODELS if args.small_models else MODELS
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):  # replaces an earlier export there
        if name.endswith(".hlo.pb.gz") or name in ("manifest.json", "reference.npz"):
            os.remove(os.path.join(args.out, name))
    images = reference_images(REF_IMAGES, args.image_size)
    manifest = {
        "format": "bit-tagger gpu_xla export 1",
        "tensorflow": tf.__version__,
        "image_size": args.image_size,
        "model_code_sha256": model_code_sha256(),
        "models": {},
        "weights": "bench/gpu_xla.py checkpoint_arrays(architecture, seed), then "
        "model.checkpoint.parameter_value(key, array), cast to the parameter's dtype",
        "derive": DERIVE,
        "inputs": "parameter 0: uint8 RGB images [batch, size, size, 3]; then the program's "
        "parameter set, in order",
        "parameter_sets": {},
        "programs": [],
        "reference": {
            "file": "reference.npz",
            "images": REF_IMAGES,
            "computed_by": "TensorFlow on the CPU: the same loaded model, without XLA",
        },
    }
    reference = {"images": images}
    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    tmp = tempfile.mkdtemp(prefix="gpu-xla-export-")
    try:
        paths = {}
        for role, (arch, seed) in models.items():
            arrays = checkpoint_arrays(arch, seed)
            paths[role] = os.path.join(tmp, f"{role}.npz")
            with open(paths[role], "wb") as f:
                np.savez(f, **arrays)
            manifest["models"][role] = dict(arch._asdict(), seed=seed, sha256=fingerprint(arrays))
            del arrays
        for model_precision in dict.fromkeys(MODEL_PRECISION[p] for p in args.precisions):
            config = InferenceConfig(
                tags_model=paths["tags"],
                embed_model=paths["embed"],
                schema=None,
                batch_size=args.batch_sizes[0],
                precision=model_precision,
                jit_compile=True,
            )
            model = load_model(config, cached=False)
            variables = {
                id(v.handle): (role, v.name.rsplit(":", 1)[0], v)
                for role, module in zip(("tags", "embed"), model._modules)
                for v in module.variables
            }
            run_reference(tf, model, images, model_precision, reference)
            manifest["top_k"] = model.top_k
            for precision in [p for p in args.precisions if MODEL_PRECISION[p] == model_precision]:
                tf.config.experimental.enable_tensor_float_32_execution(precision != "float32")
                operand_precision = None  # read off the first batch size's HLO text
                for batch in args.batch_sizes:
                    program = export_program(
                        tf, model, variables, (precision, batch, operand_precision), args, manifest
                    )
                    operand_precision = program["operand_precision"]
                    manifest["programs"].append(program)
                    print(f"  {program['file']}: {program['bytes'] / 1e6:.2f} MB", flush=True)
            check_parameters(manifest["parameter_sets"][model_precision], variables, models)
            del model, variables
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(tf32)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    f32, bf16 = reference.get("float32/embeddings"), reference.get("bfloat16/embeddings")
    if f32 is not None and bf16 is not None:  # TensorFlow's own bfloat16 error, for scale
        manifest["reference"]["tensorflow_bfloat16_max_rel_err"] = max_rel_err(bf16, f32)
    with open(os.path.join(args.out, "reference.npz"), "wb") as f:
        np.savez_compressed(f, **reference)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"exported {len(manifest['programs'])} programs to {args.out} in {elapsed():.0f} s")
    return 0


def run_reference(tf, model, images, model_precision, reference):
    """TensorFlow's CPU outputs for `images`: the job's forward pass, traced anew without XLA."""
    forward = tf.function(model._forward.python_function, autograph=False)
    out = forward(tf.constant(images))
    for name, value in out.items():
        reference[f"{model_precision}/{name}"] = value.numpy()
    scores = out["top_scores"].numpy()
    if model_precision == "float32" and not (np.diff(scores, axis=1) < 0).all():
        raise SystemExit("export: reference top-k scores tie; the top-k check would mean nothing")


def export_program(tf, model, variables, config, args, manifest) -> dict:
    """One program: the job's `tf.function` lowered to HLO for a uint8 batch; `config`:
    (precision, batch size, operand precision or None to read it off the HLO text)."""
    precision, batch, operand_precision = config
    x = tf.zeros([batch, args.image_size, args.image_size, 3], tf.uint8)
    concrete = model._forward.get_concrete_function(x)
    params = []
    for handle in concrete.captured_inputs:
        role, key, variable = variables[id(handle)]
        params.append(
            dict(
                role=role,
                key=key,
                shape=list(variable.shape),
                dtype=variable.dtype.name,
                derive=derive(key),
            )
        )
    sets = manifest["parameter_sets"]
    model_precision = MODEL_PRECISION[precision]
    if sets.setdefault(model_precision, params) != params:
        raise SystemExit(f"export: {precision} b{batch} captures its parameters in another order")
    lower = model._forward.experimental_get_compiler_ir(x)
    hlo = lower(stage="hlo_serialized", platform_name="CPU")
    if operand_precision is None:
        text = lower(stage="hlo", platform_name="CPU")
        highest = "operand_precision={highest,highest}" in text
        operand_precision = "highest" if highest else "default"
    name = f"{precision}-b{batch}"
    data = gzip.compress(without_source_paths(hlo), mtime=0)
    with open(os.path.join(args.out, name + ".hlo.pb.gz"), "wb") as f:
        f.write(data)
    outputs = concrete.structured_outputs  # a dict: the module returns it flattened by key
    manifest["outputs"] = [
        dict(name=k, dtype=outputs[k].dtype.name, shape=["batch", *outputs[k].shape[1:]])
        for k in sorted(outputs)
    ]
    return dict(
        name=name,
        precision=precision,
        batch_size=batch,
        file=name + ".hlo.pb.gz",
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        parameter_set=model_precision,
        operand_precision=operand_precision,
        reference=model_precision,
    )


def without_source_paths(hlo: bytes) -> bytes:
    """The HLO module less its instructions' Python source files and lines (paths of this
    machine, e.g. inside the venv); op types and names stay."""
    from tensorflow.compiler.xla.service import hlo_pb2  # TensorFlow's copy of XLA's protos

    module = hlo_pb2.HloModuleProto.FromString(hlo)
    for computation in module.computations:
        for instruction in computation.instructions:
            instruction.metadata.ClearField("source_file")
            instruction.metadata.ClearField("source_line")
    return module.SerializeToString(deterministic=True)


def check_parameters(params, variables, models):
    """The manifest's derivation of the regenerated checkpoint arrays reproduces every loaded
    variable bit for bit (one model's arrays in memory at a time)."""
    by_key = {(role, key): v for role, key, v in variables.values()}
    for role, (arch, seed) in models.items():
        raw = checkpoint_arrays(arch, seed)
        for p in (p for p in params if p["role"] == role):
            want = parameter_value(p["key"], raw[p["key"]]).astype(np_dtype(p["dtype"]))
            if not np.array_equal(by_key[(role, p["key"])].numpy(), want):
                raise SystemExit(f"export: {role} {p['key']} does not follow its derivation")
        del raw


def np_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


# ---- run (jax; no TensorFlow) ----------------------------------------------------------------


class Budget:
    """Seconds left of `--budget_s` (from the start of the process); past it plus a grace of
    max(10 s, 5%), a watchdog thread ends the process with status 3 (results already written)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        if seconds:
            grace = max(10.0, 0.05 * seconds)
            timer = threading.Timer(max(0.0, seconds + grace - elapsed()), self._overrun)
            timer.daemon = True
            timer.start()

    def left(self) -> float:
        return self.seconds - elapsed() if self.seconds else float("inf")

    def _overrun(self):
        print(f"STOPPED: budget {self.seconds:g} s overrun; results so far are written", flush=True)
        os._exit(3)


def elapsed() -> float:
    return time.perf_counter() - START


def order(programs: list[dict]) -> list[dict]:
    """bf16, float32, tf32 at batch 64; then bf16, tf32, float32 at larger, then smaller sizes."""

    def key(p):
        b, rank = p["batch_size"], PRECISIONS.index(p["precision"])
        if b == FIRST_BATCH:
            return (0, rank, 0)
        rank = ("bfloat16", "tf32", "float32").index(p["precision"])
        return (1, rank, b) if b > FIRST_BATCH else (2, rank, -b)

    return sorted(programs, key=key)


def timed_rounds(call, batch: int, seconds: float, rounds: int) -> list[float]:
    """Images/s of each round: `call()` repeated for at least `seconds` (it waits for its
    outputs on the host, so each call is complete)."""
    rates = []
    for _ in range(rounds):
        calls, t0 = 0, time.perf_counter()
        while not calls or time.perf_counter() - t0 < seconds:
            call()
            calls += 1
        rates.append(calls * batch / (time.perf_counter() - t0))
    return rates


def compare(outputs: dict, reference: dict, prefix: str, k: int) -> dict:
    """embedding_max_rel_err (max |a - b| / max |b| over the reference rows) and top-k agreement
    (the mean share of each row's top-k classes found in the reference's; top_k_exact: the share
    of rows whose ranked top-k lists are identical) against TensorFlow."""
    want = reference[f"{prefix}/embeddings"]
    rows = min(len(want), len(outputs["embeddings"]))
    got, want = outputs["embeddings"][:rows], want[:rows]
    ours, theirs = outputs["top_indices"][:rows], reference[f"{prefix}/top_indices"][:rows]
    return dict(
        embedding_max_rel_err=max_rel_err(got, want),
        top_k_agreement=float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)])),
        top_k_exact=float(np.mean([np.array_equal(a, b) for a, b in zip(ours, theirs)])),
    )


def max_rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


class Weights:
    """The export's weights on the device for the parameter sets `names`: each model's arrays
    regenerated (and checked against the export's sha256), derived and copied for every set, one
    model's raw arrays in host memory at a time."""

    def __init__(self, manifest, device, names):
        import jax

        sets = {name: manifest["parameter_sets"][name] for name in names}
        self.arrays = {name: [None] * len(params) for name, params in sets.items()}
        self.matches = True
        for role, m in manifest["models"].items():
            raw = checkpoint_arrays(
                Architecture(tuple(m["units"]), m["width"], m["num_classes"]), m["seed"]
            )
            self.matches &= fingerprint(raw) == m["sha256"]

            def put(job, raw=raw):
                name, i, p = job
                value = parameter_value(p["key"], raw[p["key"]]).astype(np_dtype(p["dtype"]))
                self.arrays[name][i] = jax.device_put(value, device)

            jobs = [
                (n, i, p) for n, ps in sets.items() for i, p in enumerate(ps) if p["role"] == role
            ]
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(put, jobs))
            del raw


def run(args) -> int:
    """Compile, check and time every program of args.dir on jax's default backend."""
    try:
        with open(os.path.join(args.dir, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"gpu_xla.py run: {args.dir} is not an export ({exc})", file=sys.stderr)
        return 2
    import jax
    from jax._src.lib import xla_client  # DeviceList: the one internal name on this path
    from jax.extend import backend as xla_backend
    from jax.extend.mlir import hlo_to_stablehlo

    client = xla_backend.get_backend()
    device = client.local_devices()[0]
    reference = dict(np.load(os.path.join(args.dir, "reference.npz")))
    size, k = manifest["image_size"], manifest["top_k"]
    macs = sum(
        macs_per_image(Architecture(tuple(m["units"]), m["width"], m["num_classes"]), size)
        for m in manifest["models"].values()
    )
    report = dict(
        backend=device.platform,
        device=device.device_kind,
        jax=jax.__version__,
        export=dict(
            dir=os.path.basename(os.path.abspath(args.dir)),
            tensorflow=manifest["tensorflow"],
            image_size=size,
            models={r: m["units"] + [m["width"]] for r, m in manifest["models"].items()},
            model_code_current=manifest["model_code_sha256"] == model_code_sha256(),
        ),
        gmacs_per_image=macs / 1e9,
        results=[],
    )
    if not report["export"]["model_code_current"]:
        print("note: model/ changed since this export; re-export to measure the current graph")
    print(f"{device.platform}: {device.device_kind}, jax {jax.__version__}", flush=True)
    budget = Budget(args.budget_s)
    options = xla_backend.get_compile_options(1, 1)
    rng = np.random.default_rng(0)
    compile_s = []
    wanted = set(args.programs or [p["name"] for p in manifest["programs"]])
    programs = order([p for p in manifest["programs"] if p["name"] in wanted])
    t0 = time.perf_counter()
    weights = Weights(manifest, device, dict.fromkeys(p["parameter_set"] for p in programs))
    print(f"weights ready in {time.perf_counter() - t0:.1f} s", flush=True)
    for program in programs:
        name, batch = program["name"], program["batch_size"]
        row = dict(name=name, precision=program["precision"], batch_size=batch)
        prior = (1.5 * max(compile_s)) if compile_s else (60.0 if device.platform == "gpu" else 10)
        need = prior + args.rounds * args.seconds + 5
        if need > budget.left():
            row["status"] = f"skipped: needs ~{need:.0f} s, {max(budget.left(), 0):.0f} s left"
            print(f"{name}: {row['status']}", flush=True)
            report["results"].append(row)
            continue
        print(f"{name}: compiling ...", flush=True)
        try:
            with open(os.path.join(args.dir, program["file"]), "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != program["sha256"]:
                raise ValueError(f"{program['file']} is not the file the manifest lists")
            module = hlo_to_stablehlo(gzip.decompress(data))
            t0 = time.perf_counter()
            exe = client.compile_and_load(module, xla_client.DeviceList((device,)), options)
            compile_s.append(time.perf_counter() - t0)
            params = weights.arrays[program["parameter_set"]]
            names = [o["name"] for o in manifest["outputs"]]

            def call(host, exe=exe, params=params, names=names):
                x = jax.device_put(host, device)
                outs = exe.execute_sharded([x, *params]).disassemble_into_single_device_arrays()
                return {n: np.asarray(o[0]) for n, o in zip(names, outs)}

            images = reference["images"][:batch]
            padded = np.zeros((batch,) + images.shape[1:], np.uint8)
            padded[: len(images)] = images
            outputs = call(padded)
            row.update(compare(outputs, reference, program["reference"], k))
            if program["reference"] != "float32" and "float32/embeddings" in reference:
                vs_float32 = compare(outputs, reference, "float32", k)  # bf16's own error
                row["float32_max_rel_err"] = vs_float32["embedding_max_rel_err"]
            host = rng.integers(0, 256, padded.shape, np.uint8)
            call(host)
            rates = timed_rounds(lambda h=host: call(h), batch, args.seconds, args.rounds)
        except Exception as exc:  # noqa: BLE001 - report the program, go on with the next
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            print(f"{name}: {row['status']}", flush=True)
            report["results"].append(row)
            write_json(args.json, report)
            continue
        rate = statistics.median(rates)
        tflops = rate * 2 * macs / 1e12
        peak = peak_tflops(device.device_kind, program["precision"])
        row.update(
            status="ok",
            compile_s=round(compile_s[-1], 2),
            images_per_s=rate,
            rounds=[round(r, 2) for r in rates],
            tflops=tflops,
            peak_tflops=peak,
            fraction_of_peak=tflops / peak if peak else None,
            operand_precision=program["operand_precision"],
            weights_match_export=weights.matches,
        )
        report["results"].append(row)
        write_json(args.json, report)
        print(
            f"{name}: {rate:.1f} images/s, {tflops:.2f} TFLOP/s, compile {compile_s[-1]:.1f} s, "
            f"max rel err {row['embedding_max_rel_err']:.2e}, "
            f"top-k {row['top_k_agreement']:.2f} ({elapsed():.0f} s so far)",
            flush=True,
        )
    report["load_average"] = load_note()
    write_json(args.json, report)
    print_table(report)
    return 0 if any(r.get("status") == "ok" for r in report["results"]) else 1


def write_json(path, data):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


# ---- the peer: timm in PyTorch -------------------------------------------------------------


def peer(args) -> int:
    """timm's BiT R50x1 + R101x3 (random init), bf16 autocast, channels_last, eager and
    torch.compile, on uint8 batches from the host with the outputs copied back."""
    import timm
    import torch

    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    torch.backends.cudnn.benchmark = True
    models = SMALL_MODELS if args.small_models else MODELS
    k = 10

    def build(role):
        arch = models[role][0]
        classes = arch.num_classes or 0  # 0: pre-logits, as the job's embeddings
        if not args.small_models:
            net = timm.create_model(PEER_MODELS[role], num_classes=classes)
        else:  # timm's BiT settings (those of its resnetv2_*_bit models), one unit per block
            from functools import partial

            from timm.layers import StdConv2d
            from timm.models.resnetv2 import ResNetV2

            conv = partial(StdConv2d, eps=1e-8)
            net = ResNetV2(list(arch.units), num_classes=classes, width_factor=arch.width,
                           stem_type="fixed", conv_layer=conv)  # fmt: skip
        return net.eval().to(dev, memory_format=torch.channels_last)

    tags, embed = build("tags"), build("embed")

    def forward(x):  # uint8 NHWC on the device, as ours; [-1, 1] as BiT's .npz models take
        x = x.permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev, dtype=torch.bfloat16):
            logits, features = tags(x), embed(x)
        top = torch.topk(torch.sigmoid(logits.float()), k)
        return features.float(), top.indices, top.values

    size = args.image_size
    macs = sum(macs_per_image(arch, size) for arch, _ in models.values())
    report = dict(
        backend=dev,
        device=torch.cuda.get_device_name(0) if on_gpu else "cpu",
        torch=torch.__version__,
        timm=timm.__version__,
        gmacs_per_image=macs / 1e9,
        results=[],
    )
    print(f"timm peer on {report['device']}, torch {torch.__version__}", flush=True)
    budget, rng = Budget(args.budget_s), np.random.default_rng(0)
    compiled = torch.compile(forward, dynamic=False)
    setup_s = {}
    for batch in args.batch_sizes:
        for mode, fn in (("eager", forward), ("compiled", compiled)):
            name = f"timm-{mode}-b{batch}"
            need = 1.5 * setup_s.get(mode, 60.0 if mode == "compiled" else 10.0)
            need += args.rounds * args.seconds
            if need > budget.left():
                report["results"].append(dict(name=name, status=f"skipped: needs ~{need:.0f} s"))
                continue
            host = rng.integers(0, 256, (batch, size, size, 3), np.uint8)

            def call(fn=fn, host=host):
                outs = fn(torch.from_numpy(host).to(dev))
                return [o.cpu().numpy() for o in outs]

            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    call()
                    call()
                    setup_s[mode] = max(setup_s.get(mode, 0.0), time.perf_counter() - t0)
                    rates = timed_rounds(call, batch, args.seconds, args.rounds)
            except Exception as exc:  # noqa: BLE001 - report it, go on
                status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                report["results"].append(dict(name=name, status=status))
                print(f"{name}: {status}", flush=True)
                continue
            rate = statistics.median(rates)
            report["results"].append(
                dict(
                    name=name,
                    mode=mode,
                    batch_size=batch,
                    status="ok",
                    warmup_s=round(setup_s[mode], 2),
                    images_per_s=rate,
                    rounds=[round(r, 2) for r in rates],
                    tflops=rate * 2 * macs / 1e12,
                )
            )
            write_json(args.json, report)
            print(f"{name}: {rate:.1f} images/s (warm-up {setup_s[mode]:.1f} s)", flush=True)
    report["load_average"] = load_note()
    write_json(args.json, report)
    return 0


# ---- table -----------------------------------------------------------------------------------


def print_table(ours: dict, timm_report: dict | None = None):
    """Markdown table of a run (and the peer's bf16 figures at the same batch sizes), then the
    RESULT lines of the two targets (bench/common.py): the best bf16 row's fraction of the dense
    peak (BF16_TARGET), and bf16 at batch 64 against timm + torch.compile (TIMM_TARGET)."""
    peer_rows = {
        (r["mode"], r["batch_size"]): r["images_per_s"]
        for r in (timm_report or {}).get("results", [])
        if r.get("status") == "ok"
    }
    e = ours["export"]
    print(
        f"\n{ours['device']} ({ours['backend']}), jax {ours['jax']}; export {e['dir']} (TensorFlow "
        f"{e['tensorflow']}, {e['image_size']} px, {ours['gmacs_per_image']:.2f} GMACs an image"
        + ("" if e["model_code_current"] else "; model/ changed since")
        + f"); {ours.get('load_average', '')}"
    )
    if timm_report:
        print(f"timm on {timm_report['device']}: {timm_report.get('load_average', '')}")
    print(
        "\n| precision | batch | compile s | images/s | TFLOP/s | of dense peak | max rel err "
        "| top-k agreement | timm eager | timm compiled | ours / timm compiled |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in ours["results"]:
        if r.get("status") != "ok":
            print(f"| {r['precision']} | {r['batch_size']} | {r['status']} |" + " |" * 8)
            continue
        frac = r["fraction_of_peak"]
        eager, comp = (peer_rows.get((m, r["batch_size"])) for m in ("eager", "compiled"))
        bf16 = r["precision"] == "bfloat16"
        print(
            f"| {r['precision']} | {r['batch_size']} | {r['compile_s']:.1f} "
            f"| {r['images_per_s']:.1f} | {r['tflops']:.2f} | "
            + (f"{frac:.1%}" if frac is not None else "n/a")
            + f" | {r['embedding_max_rel_err']:.1e} | {r['top_k_agreement']:.3f} | "
            + (f"{eager:.1f}" if eager and bf16 else "")
            + " | "
            + (f"{comp:.1f}" if comp and bf16 else "")
            + " | "
            + (f"{r['images_per_s'] / comp:.2f}" if comp and bf16 else "")
            + " |"
        )
    best = [r for r in ours["results"] if r.get("status") == "ok" and r["precision"] == "bfloat16"]
    if best and best[0]["fraction_of_peak"] is not None:
        top = max(best, key=lambda r: r["images_per_s"])
        result_line(
            "gpu_xla_bf16_peak", top["fraction_of_peak"], BF16_TARGET, batch=top["batch_size"]
        )
    at64 = [r for r in best if r["batch_size"] == FIRST_BATCH]
    if at64 and peer_rows.get(("compiled", FIRST_BATCH)):
        ratio = at64[0]["images_per_s"] / peer_rows[("compiled", FIRST_BATCH)]
        result_line("gpu_xla_vs_timm_compiled", ratio, TIMM_TARGET, batch=FIRST_BATCH)


def table(args) -> int:
    reports = []
    for path in args.files:
        with open(path) as f:
            reports.append(json.load(f))
    print_table(reports[0], reports[1] if len(reports) > 1 else None)
    return 0


# ---- command line ----------------------------------------------------------------------------


def csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 16,64") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 16,64")
    return list(dict.fromkeys(values))


def csv_precisions(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    wrong = [v for v in values if v not in PRECISIONS]
    if wrong or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected some of {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="export the job's graph (needs TensorFlow)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--small_models", action="store_true")
    ex.add_argument("--batch_sizes", type=csv_ints, default=[16, 64, 128, 256])
    ex.add_argument("--precisions", type=csv_precisions, default=["float32", "tf32", "bfloat16"])
    ex.add_argument("--image_size", type=int, default=224)
    ru = sub.add_parser("run", help="compile, check and time an export with jax (no TensorFlow)")
    ru.add_argument("dir")
    ru.add_argument("--programs", type=lambda t: t.split(","), help="only these, e.g. tf32-b64")
    pe = sub.add_parser("peer", help="timm's BiT models in PyTorch, bf16, eager and compiled")
    pe.add_argument("--small_models", action="store_true")
    pe.add_argument("--batch_sizes", type=csv_ints, default=[64, 128, 256])
    pe.add_argument("--image_size", type=int, default=224)
    for p in (ru, pe):
        p.add_argument("--json", default=None, help="write the results here, after each one")
        p.add_argument("--budget_s", type=float, default=0.0, help="0: none")
        p.add_argument("--seconds", type=float, default=1.0, help="per round")
        p.add_argument("--rounds", type=int, default=5)
    ta = sub.add_parser("table", help="print a run's table, with the peer's figures beside it")
    ta.add_argument("files", nargs="+", metavar="RUN.json [PEER.json]")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"export": export, "run": run, "peer": peer, "table": table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
