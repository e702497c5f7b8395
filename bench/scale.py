"""The whole job past toy sizes, as a GPU worker sees it: the model costs almost nothing, so what is
measured is reading, the duplicate-key pass, skipping, decoding, batching, writing.

    .venv/bin/python bench/scale.py [--images 100000 --small 25000 --shard_size 1000
                                     --known 1000000 --real 6000 --real_small 250 --gcs_images 5000
                                     --rounds 5 --parts tiny,gcs,real]

1. Tiny model at 32x32 (random BiT units (1,1,1,1), width 1, 21k head, batch 64): `--images`
   generated 64x64 JPEGs (256 distinct ones re-used under distinct keys) in TFRecord shards of
   `--shard_size`, with a `--known`-key skip list (every 10th input plus old keys, 10 Parquet
   files). The job runs in a fresh child process on the first `--small` images and on all; printed:
   marginal images/s and CPU ms an image, (N2 - N1) / (t2 - t1), so start-up cancels; the CPU of
   the job's own model calls (timed inside the job, around `TagAndEmbedModel.__call__`) and the
   rest, "outside the model" (the bare model in its own child is printed for reference: a
   separately timed model varies by more than the rest costs); peak RSS at both sizes (flat
   within 10%); what V vCPUs could feed a GPU.
2. The duplicate-key pass: the job's own key sub-graph (transforms/read.py: key pass without
   image bytes -> GroupByKey -> losers) over the same shards, alone on the same runner in a child
   process (imports done before the clock starts), as a share of the whole job's wall time; the
   same on the GCS emulator (tests/gcs_emulator.py) for `--gcs_images` images read from gs://.
3. Realistic inputs: `--real` 640x480 photo JPEGs at 224x224, marginal between `--real_small`
   and `--real` images, against Pillow's draft decode + bilinear resize alone
   (bench/decode_throughput.py `baseline`) on the same JPEGs. `--rounds` rounds of (Pillow, small
   job, big job, Pillow), each in a fresh child; the ratio of a round is its marginal job CPU over
   the mean of its two Pillow timings; the median ratio is reported. Target: <= 1.3. The model is
   a stand-in that returns outputs of the real model's shapes (k tags, embeddings; all scores only
   when the job writes them) at no cost, so the job's CPU is its CPU outside the model, as on a
   GPU worker, not a difference of two large, noisy numbers (the tiny random model costs ~85 CPU ms
   an image at 224 px, and the noise of subtracting its calls is larger than Pillow's decode).

Generated inputs are cached under bench/out/scale/ (ignored by git). CPU time is the child's user
+ system time (all its threads). The machine is shared: the load average is printed with each
number; compare ratios from one run, not absolute rates across runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common

OUT = os.path.join(common.REPO, "bench", "out", "scale")
TARGET = 1.3  # CPU outside the model / Pillow draft decode + resize, at 224 px
DISTINCT = 256
BATCH = 64


def input_key(i: int) -> str:
    return f"gs://photos/2024/06/01/img-{i:08d}.jpg"


# ------------------------------------------------------------------------------------- children


def child_job(spec: dict) -> dict:
    """The whole job on the in-process runner; wall, CPU and peak RSS of this process."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    from transforms.gcs import configure_beam_gcs

    configure_beam_gcs()
    from pipeline.main import run

    if spec.get("stub_model"):
        _stub_model_calls()
    model_calls = _time_model_calls()
    start, cpu = time.perf_counter(), common.cpu_seconds()
    summary = run(spec["argv"], save_main_session=False)
    wall, cpu = time.perf_counter() - start, common.cpu_seconds() - cpu
    report = dict(
        wall=wall, cpu=cpu, maxrss_mib=common.peak_rss_mib(), model_cpu=model_calls["cpu"]
    )
    return {**report, **{k: summary[k] for k in ("inputs", "results", "failures", "skipped")}}


def _stub_model_calls() -> None:
    """Replace the model's forward pass by a stand-in that costs ~nothing: outputs of the shapes the
    loaded model returns (its k best tags, embeddings, all scores only if it keeps them), from
    random values made once per batch size. Everything around the model call stays the job's."""
    import numpy as np

    from model.bit import Outputs, TagAndEmbedModel

    made = {}

    def stub_call(self, images):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images, got {images.dtype} {images.shape}")
        n, k = len(images), getattr(self, "top_k", 0)
        if n not in made:
            rng = np.random.default_rng(n)
            scores = rng.random((n, self.num_classes), dtype=np.float32)
            indices = np.argsort(-scores, axis=1)[:, :k].astype(np.int32)
            made[n] = Outputs(
                scores if getattr(self, "keep_scores", True) else None,
                rng.gamma(0.6, 0.8, (n, self.embedding_dim)).astype(np.float32),
                *((indices, np.take_along_axis(scores, indices, axis=1)) if k else ()),
            )
        return made[n]

    TagAndEmbedModel.__call__ = stub_call


def _time_model_calls() -> dict:
    """Counts this process's CPU time inside `TagAndEmbedModel.__call__` (the job's model calls,
    padding of a short last batch and the first call's tracing included) into the returned dict.

    The job runs its fused stage on one thread (in-process runner), so nothing else of the job runs
    during a call: "job CPU - this" is the CPU outside the model, measured on the same model runs
    as the job's, not on a separately timed bare model whose CPU varies by several % from run to
    run (~5 ms an image at 224 px, more than Pillow's whole decode)."""
    from model.bit import TagAndEmbedModel

    totals = {"cpu": 0.0, "images": 0}
    call = TagAndEmbedModel.__call__

    def timed_call(self, images):
        start = common.cpu_seconds()
        try:
            return call(self, images)
        finally:
            totals["cpu"] += common.cpu_seconds() - start
            totals["images"] += len(images)

    TagAndEmbedModel.__call__ = timed_call
    return totals


def child_key_pass(spec: dict) -> dict:
    """The job's duplicate-key sub-graph alone (`transforms.read`: key pass over every shard,
    no image bytes -> GroupByKey -> losers) on the job's in-process runner, imports done first."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from tensorflow.core.example import example_pb2  # noqa: F401 - imported before timing

    from transforms.gcs import configure_beam_gcs
    from transforms.read import _ExtractKeys, _losers, match_files

    configure_beam_gcs()
    uris = match_files(spec["pattern"])
    start, cpu = time.perf_counter(), common.cpu_seconds()
    p = beam.Pipeline(runner=FnApiRunner())
    keys = (
        p | beam.Create(uris) | beam.Reshuffle() | beam.ParDo(_ExtractKeys("auto", "image/encoded"))
    )
    _ = keys | beam.GroupByKey() | beam.FlatMap(_losers)
    _ = keys | "Count" >> beam.combiners.Count.Globally()
    result = p.run()
    result.wait_until_finish()
    return {
        "wall": time.perf_counter() - start,
        "cpu": common.cpu_seconds() - cpu,
        "shards": len(uris),
    }


def child_model(spec: dict) -> dict:
    """CPU an image of the bare model (the job's own loader) on decoded images, after warm-up."""
    import numpy as np

    from core.decode import decode_image
    from transforms.read import iter_entries

    images = [e.data for e in iter_entries(spec["shard"], "tfrecord")][: spec["count"]]
    pixels = np.stack([decode_image(d, spec["size"])[0] for d in images])
    model = common.job_model(spec["checkpoint"], BATCH)
    model(pixels[:BATCH])  # trace
    start, cpu = time.perf_counter(), common.cpu_seconds()
    for _ in range(spec["repeat"]):
        common.run_batches(model, pixels, BATCH)
    n = spec["repeat"] * len(pixels)
    return {
        "cpu_ms": (common.cpu_seconds() - cpu) * 1e3 / n,
        "wall_ms": (time.perf_counter() - start) * 1e3 / n,
    }


def child_pillow(spec: dict) -> dict:
    """CPU an image of plain Pillow draft + bilinear resize on the same JPEGs as the big job's,
    each decoded once (a few JPEGs decoded over and over would sit in the CPU's caches)."""
    from bench.decode_throughput import baseline
    from transforms.read import iter_entries

    images = [e.data for shard in spec["shards"] for e in iter_entries(shard, "tfrecord")]
    for data in images[:20]:
        baseline(data, spec["size"])
    start = common.cpu_seconds()
    for data in images:
        baseline(data, spec["size"])
    return {"cpu_ms": (common.cpu_seconds() - start) * 1e3 / len(images)}


CHILDREN = dict(job=child_job, key_pass=child_key_pass, model=child_model, pillow=child_pillow)


# ----------------------------------------------------------------------------------------- inputs


def write_shards(directory: str, images: list, count: int, shard_size: int) -> list:
    """`count` records keyed input_key(i), image images[i % len(images)], in TFRecord shards."""
    from tests.corpus import make_example, tfrecord_frame

    if os.path.isdir(directory):
        return sorted(os.path.join(directory, f) for f in os.listdir(directory))
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = -(-count // shard_size)
    for s in range(shards):
        path = os.path.join(tmp, f"img-{s:05d}-of-{shards:05d}.tfrecord")
        with open(path, "wb") as f:
            for i in range(s * shard_size, min(count, (s + 1) * shard_size)):
                f.write(tfrecord_frame(make_example(images[i % len(images)], key=input_key(i))))
    os.rename(tmp, directory)
    return sorted(os.path.join(directory, f) for f in os.listdir(directory))


def write_skip_list(directory: str, known: int, inputs: int, files: int = 10) -> str:
    """`known` keys: every 10th input key, then old keys, in `files` results files (the job's
    results schema and footer: `--skip_keys_from` takes no other file)."""
    from tests.corpus import write_results_keys

    if not os.path.isdir(directory):
        tmp = directory + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        known_inputs = list(range(0, inputs, 10))
        old = known - len(known_inputs)
        per_file = -(-old // files)
        for f in range(files):
            keys = [
                f"gs://photos/archive/old-{i:09d}.jpg"
                for i in range(f * per_file, min(old, (f + 1) * per_file))
            ]
            keys += [input_key(i) for i in known_inputs[f::files]]
            write_results_keys(os.path.join(tmp, f"results-{f:05d}-of-{files:05d}.parquet"), keys)
        os.rename(tmp, directory)
    return os.path.join(directory, "results-*.parquet")


def prepare(args) -> dict:
    from tests.corpus import make_jpeg

    os.makedirs(OUT, exist_ok=True)
    checkpoint = os.path.join(OUT, "tiny.npz")
    if not os.path.exists(checkpoint):
        common.write_checkpoint(checkpoint, **common.TINY)
    prepared = {"checkpoint": checkpoint}
    parts = set(args.parts.split(","))
    if parts & {"tiny", "gcs"}:
        tiny = [make_jpeg(64, 64, seed=i) for i in range(DISTINCT)]
        prepared["shards"] = write_shards(
            os.path.join(OUT, f"tiny{args.images}_{args.shard_size}"),
            tiny,
            args.images,
            args.shard_size,
        )
        prepared["skip"] = write_skip_list(
            os.path.join(OUT, f"known-results{args.known}_{args.images}"), args.known, args.images
        )
    if args.real and "real" in parts:
        from bench.decode_throughput import make_images

        photos, real_dir = make_images(min(args.real, 128)), os.path.join(OUT, f"real{args.real}")
        prepared["real"] = write_shards(real_dir, photos, args.real, 250)
    return prepared


def run_job(
    inputs: str, prepared: dict, size: int, skip=None, env=None, stub_model=False, expect=None
):
    """The job in a fresh child; `expect` ({"results": n, ...}) must match its summary exactly."""
    output = os.path.join(OUT, "run-output")
    shutil.rmtree(output, ignore_errors=True)
    skip_flag = ("--skip_keys_from", skip) if skip else ()
    ckpt = prepared["checkpoint"]
    argv = common.job_argv(inputs, output, ckpt, *skip_flag, batch_size=BATCH, image_size=size)
    report = common.in_child(__file__, "job", {"argv": argv, "stub_model": stub_model}, env)
    shutil.rmtree(output, ignore_errors=True)
    if any(report[k] != v for k, v in (expect or {}).items()):
        raise RuntimeError(f"inexact run: expected {expect}, got {report}")
    report["load"] = common.load_note()
    return report


# ------------------------------------------------------------------------------------------- main


def measure_tiny(args, prepared: dict) -> dict:
    shards = prepared["shards"]
    small_shards = shards[: max(1, args.small // args.shard_size)]
    small_n = min(args.images, len(small_shards) * args.shard_size)
    runs = {}
    for n, inputs in (
        (small_n, ",".join(small_shards)),
        (args.images, os.path.join(os.path.dirname(shards[0]), "*.tfrecord")),
    ):
        skipped = -(-n // 10)  # every 10th input is known
        expect = {"skipped": skipped, "results": n - skipped}
        rep = runs[n] = run_job(inputs, prepared, 32, skip=prepared["skip"], expect=expect)
        print(
            f"  job, {n:>7,} images: {rep['wall']:7.1f} s wall, {rep['cpu']:7.1f} s CPU, peak "
            f"{rep['maxrss_mib']:6.0f} MiB, {rep['results']:,} results, {rep['skipped']:,} "
            f"skipped; {rep['load']}",
            flush=True,
        )
    key_pass = common.in_child(
        __file__, "key_pass", {"pattern": os.path.join(os.path.dirname(shards[0]), "*.tfrecord")}
    )
    print(
        f"  key pass alone over {key_pass['shards']:,} shards: {key_pass['wall']:.1f} s wall, "
        f"{key_pass['cpu']:.1f} s CPU; {common.load_note()}",
        flush=True,
    )
    spec = dict(shard=shards[0], count=512, size=32, repeat=4, checkpoint=prepared["checkpoint"])
    model = common.in_child(__file__, "model", spec)
    return {"runs": runs, "small": small_n, "key_pass": key_pass, "model": model}


def measure_gcs(args, prepared: dict) -> dict:
    from tests.gcs_emulator import start_emulator, stop_emulator

    shards = prepared["shards"][: max(1, args.gcs_images // args.shard_size)]
    emulator = start_emulator()
    try:
        bucket = emulator.new_bucket("scale")
        for path in shards:
            emulator.upload_file(f"gs://{bucket}/shards/{os.path.basename(path)}", path)
        env = dict(STORAGE_EMULATOR_HOST=emulator.endpoint, NO_GCE_CHECK="true")
        env.update(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
        pattern = f"gs://{bucket}/shards/*.tfrecord"
        job = run_job(pattern, prepared, 32, env=env)
        key_pass = common.in_child(__file__, "key_pass", {"pattern": pattern}, env)
    finally:
        stop_emulator(emulator)
    print(
        f"  GCS emulator, {job['results']:,} images: job {job['wall']:.1f} s wall, key pass "
        f"alone {key_pass['wall']:.1f} s wall; {common.load_note()}",
        flush=True,
    )
    return {"job": job, "key_pass": key_pass, "images": job["results"]}


def measure_real(args, prepared: dict) -> dict:
    shards = prepared["real"]
    small_shards = shards[: max(1, args.real_small // 250)]
    sizes = (
        (len(small_shards) * 250, ",".join(small_shards)),
        (args.real, os.path.join(os.path.dirname(shards[0]), "*.tfrecord")),
    )
    rounds = []
    pillow_spec = {"shards": shards[: -(-args.real // 250)], "size": 224}
    for r in range(args.rounds):
        runs = {}
        before = common.in_child(__file__, "pillow", pillow_spec)
        for n, inputs in sizes if r % 2 == 0 else sizes[::-1]:
            runs[n] = run_job(inputs, prepared, 224, stub_model=True, expect={"results": n})
        after = common.in_child(__file__, "pillow", pillow_spec)
        pillow = (before["cpu_ms"] + after["cpu_ms"]) / 2
        rounds.append({"runs": runs, "pillow_ms": pillow})
        _, cpu_ms = marginal(runs)
        cpus = " / ".join(f"{rep['cpu']:.2f}" for rep in runs.values())
        print(
            f"  round {r + 1}, 640x480 JPEGs at 224 px, stand-in model: job {cpus} s CPU for "
            f"{' / '.join(str(n) for n in runs)} images, marginal {cpu_ms:.2f} ms an image; "
            f"Pillow {before['cpu_ms']:.2f} before, {after['cpu_ms']:.2f} after; "
            f"ratio {cpu_ms / pillow:.2f}; {common.load_note()}",
            flush=True,
        )
    return {"rounds": rounds}


def marginal(runs: dict) -> tuple:
    (n1, r1), (n2, r2) = sorted(runs.items())
    return (n2 - n1) / (r2["wall"] - r1["wall"]), (r2["cpu"] - r1["cpu"]) * 1e3 / (n2 - n1)


def report(args, tiny: dict, gcs: dict, real: dict) -> None:
    print(f"\n## bench/scale.py ({common.load_note()} at the end)\n")
    extra = report_tiny(args, tiny, gcs) if tiny else {}
    if real:
        report_real(real, extra)


def report_tiny(args, tiny: dict, gcs: dict) -> dict:
    rate, cpu_ms = marginal(tiny["runs"])
    big, small = tiny["runs"][args.images], tiny["runs"][tiny["small"]]
    in_job_ms = (big["model_cpu"] - small["model_cpu"]) * 1e3 / (args.images - tiny["small"])
    outside = cpu_ms - in_job_ms
    share = tiny["key_pass"]["wall"] / big["wall"]
    print(
        f"Tiny model at 32x32, TFRecord shards of {args.shard_size}, "
        f"{args.known:,}-key skip list (every 10th input known):"
    )
    rows = [
        (
            f"marginal images/s ({tiny['small']:,} -> {args.images:,} images, whole job)",
            f"{rate:.0f}",
        ),
        ("CPU ms an image, whole job (marginal)", f"{cpu_ms:.2f}"),
        ("CPU ms an image, the job's own model calls (timed inside the job)", f"{in_job_ms:.2f}"),
        ("CPU ms an image outside the model = whole job - its model calls", f"{outside:.2f}"),
        (
            "(reference) CPU ms an image, bare model in its own process",
            f"{tiny['model']['cpu_ms']:.2f}",
        ),
        (
            f"peak RSS at {tiny['small']:,} / {args.images:,} images (MiB)",
            f"{small['maxrss_mib']:.0f} / {big['maxrss_mib']:.0f} "
            f"(x{big['maxrss_mib'] / small['maxrss_mib']:.3f})",
        ),
        (
            "duplicate-key pass alone, local disk: wall / job wall",
            f"{tiny['key_pass']['wall']:.1f} / {big['wall']:.1f} s = {share:.1%}",
        ),
    ]
    if gcs:
        rows.append(
            (
                f"same on the GCS emulator, {gcs['images']:,} images (no skip list)",
                f"{gcs['key_pass']['wall']:.1f} / {gcs['job']['wall']:.1f} s = "
                f"{gcs['key_pass']['wall'] / gcs['job']['wall']:.1%}",
            )
        )
    common.table(["measure", "value"], rows)
    print(
        "\nWhat one worker could feed a GPU (images/s, one SDK process a vCPU, CPU outside "
        "the model):"
    )
    common.table(
        ["vCPUs", "images/s"], [(v, f"{v * 1e3 / outside:,.0f}") for v in (4, 8, 16, 32)], ()
    )
    return {
        "outside_ms_32px": round(outside, 3),
        "images_per_s_32px": round(rate),
        "key_pass_share": round(share, 3),
    }


def report_real(real: dict, extra: dict) -> None:
    rounds = real["rounds"]
    sizes = sorted(rounds[0]["runs"])
    outside = [marginal(r["runs"])[1] for r in rounds]
    pillow = [r["pillow_ms"] for r in rounds]
    ratios = [o / p for o, p in zip(outside, pillow)]
    ratio = common.median(ratios)
    print(
        f"\n640x480 JPEGs at 224x224, stand-in model (costs ~0), marginal over "
        f"{' -> '.join(str(n) for n in sizes)} images, median of {len(rounds)} rounds:"
    )
    rows = [
        ("the job outside the model", f"{common.median(outside):.2f}"),
        ("Pillow draft decode + bilinear resize alone", f"{common.median(pillow):.2f}"),
        (
            "outside the model / Pillow, median of the rounds",
            f"{ratio:.2f} (target <= {TARGET})",
        ),
        ("per round: outside / Pillow", ", ".join(f"{r:.2f}" for r in ratios)),
    ]
    common.table(["measure", "CPU ms an image"], rows)
    outside_ms = round(common.median(outside), 3)
    common.result_line("scale", ratio, TARGET, False, outside_ms_224px=outside_ms, **extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=25_000)
    ap.add_argument("--shard_size", type=int, default=1000)
    ap.add_argument("--known", type=int, default=1_000_000)
    ap.add_argument("--gcs_images", type=int, default=5_000, help="0: no GCS emulator run")
    ap.add_argument("--real", type=int, default=6000, help="0: no 640x480 run")
    ap.add_argument("--real_small", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the 640x480 measurement")
    ap.add_argument("--parts", default="tiny,gcs,real", help="comma-separated: tiny, gcs, real")
    if common.serve_child(CHILDREN, argv):
        return None
    args = ap.parse_args(argv)
    started = time.perf_counter()
    prepared = prepare(args)
    print(f"inputs ready in {time.perf_counter() - started:.0f} s; {common.load_note()}")
    parts = set(args.parts.split(","))
    tiny = measure_tiny(args, prepared) if "tiny" in parts else None
    gcs = measure_gcs(args, prepared) if args.gcs_images and "gcs" in parts else None
    real = measure_real(args, prepared) if args.real and "real" in parts else None
    report(args, tiny, gcs, real)
    print(f"total {time.perf_counter() - started:.0f} s")
    return None


if __name__ == "__main__":
    main()
