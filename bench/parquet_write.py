"""Benchmark: the job's Parquet write path vs a bare `pyarrow.parquet.write_table`.

10,000 rows with 6144-d float32 embeddings and 10 tags each (~24 KB/row, ~250 MB in memory).

- "job path": `results_batch` for every inference batch (64 rows) from NumPy arrays, the
  `RebatchTables` DoFn's buffering into ~64 MiB tables, and the exact sink Beam runs in each worker
  (`WriteParquet(...).sink()`: `open` / `write_record` / `close`, i.e.
  `pq.ParquetWriter` with the job's codec and list layout, one `write_table` per row group). This
  runs outside a Beam pipeline on purpose: a pipeline adds runner start-up and element pickling
  that do not depend on the writer and would drown it on this 2-core machine.
- "bare pyarrow": `pq.write_table` of the same rows, prebuilt as one table, with the same writer
  settings (`ParquetSink.writer_options`: codec, list layout, dictionary columns), so the two
  files are encoded alike and the ratio is the cost of the job's path alone.
Rounds alternate between the two; medians of wall time and of process CPU time are reported (on a
shared, loaded machine wall time mostly measures the neighbours; CPU time is the steadier measure
of the work done). Target: ratio >= 0.9.

    .venv/bin/python -m bench.parquet_write [--rows 10000] [--rounds 5]
"""

import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import alternating, load_note, median, result_line, table
from core.schema import results_schema
from transforms.write import CODEC, RebatchTables, WriteParquet, results_batch, top_k

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
        for rows in rebatch.process(batch):
            sink.write_record(writer, rows)
    for wv in rebatch.finish_bundle():
        sink.write_record(writer, wv.value)
    sink.close(writer)


def bare_path(path, prebuilt):
    """One `pq.write_table` with the job's file settings (codec, list layout, dictionaries)."""
    sink = WriteParquet(os.path.dirname(path), "results", prebuilt.schema).sink()
    pq.write_table(prebuilt, path, **sink.writer_options())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)

    load0 = load_note()
    schema = results_schema(DIM, metadata={"bench": "parquet_write"})
    labels, inputs = make_inputs(args.rows)
    prebuilt = pa.Table.from_batches(
        [results_batch(*i[:6], labels, i[6], schema) for i in inputs]
    ).combine_chunks()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        paths = {name: os.path.join(tmp, f"{name}.parquet") for name in ("job path", "bare")}

        def timed(name):
            if os.path.exists(paths[name]):
                os.remove(paths[name])
            c0, t0 = time.process_time(), time.perf_counter()
            if name == "job path":
                job_path(paths[name], labels, inputs, schema)
            else:
                bare_path(paths[name], prebuilt)
            return time.perf_counter() - t0, time.process_time() - c0

        # Alternating rounds after one that warms up caches; (wall, CPU) seconds of each.
        runs = alternating({name: lambda n=name: timed(n) for name in paths}, args.rounds, 1)
        # Same content either way.
        assert pq.read_table(paths["job path"]).equals(pq.read_table(paths["bare"]))
        info = {n: pq.read_metadata(p) for n, p in paths.items()}
        sizes = {n: os.path.getsize(p) for n, p in paths.items()}

    print(
        f"{args.rows} rows, {DIM}-d float32 embeddings, {TOP_K} tags/row, "
        f"{prebuilt.nbytes / 1e6:.0f} MB in memory, codec={CODEC}, {args.rounds} alternating "
        "rounds, medians; bare = pq.write_table"
    )
    wall = {n: median(w for w, _ in v) for n, v in runs.items()}
    cpu = {n: median(c for _, c in v) for n, v in runs.items()}
    show = lambda n: (
        (n, f"{wall[n]:.3f}", f"{args.rows / wall[n]:,.0f}", f"{wall['bare'] / wall[n]:.2f}")
        + (f"{cpu[n]:.3f}", f"{args.rows / cpu[n]:,.0f}", f"{cpu['bare'] / cpu[n]:.2f}")
        + (info[n].num_row_groups, f"{sizes[n] / 1e6:.0f}")
    )
    table(
        ["path", "wall s", "rows/s (wall)", "ratio (wall)", "CPU s", "rows/s (CPU)"]
        + ["ratio (CPU)", "row groups", "file MB"],
        [show(n) for n in paths],
    )
    print(f"ratio = bare median / this path's median; {load0} before, {load_note()} after")
    cpu_ratio = f"{cpu['bare'] / cpu['job path']:.3f}"
    result_line("parquet_write", wall["bare"] / wall["job path"], 0.9, cpu_ratio=cpu_ratio)


if __name__ == "__main__":
    main()
