"""Benchmark: the job's Parquet write path vs a bare `pyarrow.parquet.write_table`.

10,000 rows with 6144-d float32 embeddings and 10 tags each (~24 KB/row, ~250 MB in memory).

- "job path": `results_batch` for every inference batch (64 rows) from NumPy arrays, the
  `RebatchTables` DoFn's buffering into ~64 MiB tables, and the exact sink Beam runs in each worker
  (`WriteParquet(...).sink()`: `open` / `write_record` / `close`, i.e.
  `pq.ParquetWriter` with the job's codec and list layout, one `write_table` per row group). This
  runs outside a Beam pipeline on purpose: a pipeline adds runner start-up and element pickling
  that do not depend on the writer and would drown it on this 2-core machine. `--beam` adds one
  informative round through the DirectRunner (`beam.Create` + `WriteParquet`, num_shards=1); it
  is slow and memory-hungry (Create pickles all batches into the graph): use it with --rows 2000.
- "bare pyarrow": `pq.write_table` of the same rows, prebuilt as one table, with the same writer
  settings (`ParquetSink.writer_options`: codec, list layout, dictionary columns), so the two
  files are encoded alike and the ratio is the cost of the job's path alone.
Rounds alternate between the two; medians of wall time and of process CPU time are reported (on a
shared, loaded machine wall time mostly measures the neighbours; CPU time is the steadier measure
of the work done). Target: ratio >= 0.9.

    .venv/bin/python -m bench.parquet_write [--rows 10000] [--rounds 5] [--beam]
"""

import argparse
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.write import (
    CODEC,
    RebatchTables,
    WriteParquet,
    results_batch,
    results_schema,
    top_k,
)

NUM_CLASSES = 21843
DIM = 6144
TOP_K = 10
BATCH = 64


def make_inputs(rows: int, seed: int = 0):
    """Per-batch inputs as inference produces them (top-k precomputed: not part of writing)."""
    rng = np.random.default_rng(seed)
    labels = SimpleNamespace(  # versioned like the job's label set: Arrow arrays built once
        wnids=np.array([f"n{i:08d}" for i in range(NUM_CLASSES)]),
        labels=np.array([f"label number {i}" for i in range(NUM_CLASSES)]),
        version="bench-parquet-write",
    )
    batches = []
    for start in range(0, rows, BATCH):
        n = min(BATCH, rows - start)
        scores = rng.random((n, NUM_CLASSES), dtype=np.float32)
        idx, top = top_k(scores, TOP_K)
        emb = rng.gamma(0.6, 0.8, size=(n, DIM)).astype(np.float32)  # ReLU'd, pooled: >= 0
        keys = [f"gs://bucket/images/{i:09d}.jpg" for i in range(start, start + n)]
        batches.append((keys, keys, np.full(n, 640), np.full(n, 480), idx, top, emb))
    return labels, batches


def job_path(path, labels, inputs, schema):
    """results_batch -> RebatchTables -> the Beam Parquet sink, as in a worker."""
    sink = WriteParquet(os.path.dirname(path), "results", schema).sink()
    rebatch = RebatchTables(schema)
    writer = sink.open(path)
    rebatch.start_bundle()
    for keys, sources, w, h, idx, top, emb in inputs:
        batch = results_batch(keys, sources, w, h, idx, top, labels, emb, schema)
        for table in rebatch.process(batch):
            sink.write_record(writer, table)
    for wv in rebatch.finish_bundle():
        sink.write_record(writer, wv.value)
    sink.close(writer)


def bare_path(path, table):
    """One `pq.write_table` with the job's file settings (codec, list layout, dictionaries)."""
    sink = WriteParquet(os.path.dirname(path), "results", table.schema).sink()
    pq.write_table(table, path, **sink.writer_options())


def beam_round(out_dir, labels, inputs, schema):
    import apache_beam as beam

    batches = [results_batch(*i[:6], labels, i[6], schema) for i in inputs]
    t0 = time.perf_counter()
    with beam.Pipeline() as p:
        _ = p | beam.Create(batches) | WriteParquet(out_dir, "results", schema, num_shards=1)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--beam", action="store_true", help="one extra DirectRunner round")
    args = ap.parse_args(argv)

    load0 = f"{os.getloadavg()[0]:.2f}"
    schema = results_schema(DIM, metadata={"bench": "parquet_write"})
    labels, inputs = make_inputs(args.rows)
    table = pa.Table.from_batches(
        [results_batch(*i[:6], labels, i[6], schema) for i in inputs]
    ).combine_chunks()
    times = {"job path": [], "bare pyarrow": []}
    cpu = {"job path": [], "bare pyarrow": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        paths = {
            "job path": os.path.join(tmp, "job.parquet"),
            "bare pyarrow": os.path.join(tmp, "bare.parquet"),
        }
        for r in range(args.rounds + 1):  # round 0 warms up caches, not counted
            order = ["job path", "bare pyarrow"] if r % 2 else ["bare pyarrow", "job path"]
            for name in order:
                if os.path.exists(paths[name]):
                    os.remove(paths[name])
                c0, t0 = time.process_time(), time.perf_counter()
                if name == "job path":
                    job_path(paths[name], labels, inputs, schema)
                else:
                    bare_path(paths[name], table)
                if r:
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        # Same content either way.
        assert pq.read_table(paths["job path"]).equals(pq.read_table(paths["bare pyarrow"]))
        info = {n: pq.read_metadata(p) for n, p in paths.items()}
        sizes = {n: os.path.getsize(p) for n, p in paths.items()}
        beam_s = (
            beam_round(os.path.join(tmp, "beam"), labels, inputs, schema) if args.beam else None
        )

    raw_mb = table.nbytes / 1e6
    print(
        f"{args.rows} rows, {DIM}-d float32 embeddings, {TOP_K} tags/row, {raw_mb:.0f} MB in "
        f"memory, codec={CODEC}, {args.rounds} alternating rounds, medians"
    )
    print(
        "| path | wall s | rows/s (wall) | ratio (wall) | CPU s | rows/s (CPU) | ratio (CPU) "
        "| row groups | file MB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = statistics.median(times["bare pyarrow"])
    base_cpu = statistics.median(cpu["bare pyarrow"])
    for name in ("job path", "bare pyarrow"):
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        print(
            f"| {name} | {med:.3f} | {args.rows / med:,.0f} | {base / med:.2f} | {med_cpu:.3f} "
            f"| {args.rows / med_cpu:,.0f} | {base_cpu / med_cpu:.2f} "
            f"| {info[name].num_row_groups} | {sizes[name] / 1e6:.0f} |"
        )
    if beam_s is not None:
        print(
            f"| DirectRunner pipeline (1 round, incl. start-up) | {beam_s:.3f} | "
            f"{args.rows / beam_s:,.0f} | {base / beam_s:.2f} | | | | | |"
        )
    job_ratio, job_cpu_ratio = (
        base / statistics.median(times["job path"]),
        base_cpu / statistics.median(cpu["job path"]),
    )
    print(
        f"RESULT name=parquet_write ratio={job_ratio:.3f} target=>=0.9 "
        f"pass={'yes' if job_ratio >= 0.9 else 'no'} cpu_ratio={job_cpu_ratio:.3f}"
    )
    print(
        "ratio = bare pyarrow median / this path's median (target >= 0.9 for the job path); "
        f"load average before/after: {load0} / {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
