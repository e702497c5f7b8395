"""recall@10, latency, build time and size of the search index (`search/ann.py`) vs exact search.

    python bench/search_recall.py                      # 50,000 x 6144-d, the default settings
    python bench/search_recall.py --rows 20000 --nprobes 8,16,32 --refine_factors 1,10

The vectors have structure, like embeddings of related photos: points on a 64-dimensional
manifold (1,000 Gaussian clusters in 64-d, mapped into 6144-d by one random linear map, then
rectified like BiT's ReLU pre-logits) plus a little full-dimensional noise. (Uniformly random
high-dimensional vectors have no real neighbours: every approximate index looks bad on them.)
Queries are fresh draws from the same distribution, not rows of the table. The truth is exact
cosine top-10 in NumPy; the index is LanceDB IVF-PQ built and queried by the same functions
`./run.sh index` and `./run.sh search` use (probe, LanceDB's refine, exact float64 re-rank).

Prints one row per (nprobes, refine_factor): recall@10, p50/p95 latency of one query (ms, one
query at a time, warm cache), plus build time and bytes per image; ends with a RESULT line for
the default settings (target recall@10 >= 0.95 at p50 <= 50 ms).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import pyarrow as pa

from search import ann

INTRINSIC_DIM = 64
CLUSTERS = 1000


def make_vectors(rows: int, dim: int, seed: int = 0, basis_seed: int = 1) -> np.ndarray:
    """`rows` clustered vectors [rows, dim] float32 (see the module docstring)."""
    basis = np.random.default_rng(basis_seed).normal(size=(INTRINSIC_DIM, dim)).astype(np.float32)
    centres = np.random.default_rng(basis_seed + 1).normal(size=(CLUSTERS, INTRINSIC_DIM))
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 4096):
        n = min(4096, rows - start)
        z = centres[rng.integers(0, CLUSTERS, n)] + 0.5 * rng.normal(size=(n, INTRINSIC_DIM))
        x = z.astype(np.float32) @ basis / np.sqrt(INTRINSIC_DIM)
        x += 0.3 * rng.normal(size=x.shape).astype(np.float32)
        out[start : start + n] = np.maximum(x, 0.0)
    return out


def exact_top_k(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact cosine top-k of each query [Q, k]."""
    norms = np.linalg.norm(db, axis=1)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = np.empty((len(queries), len(db)), np.float32)
    for start in range(0, len(db), 8192):
        block = db[start : start + 8192]
        sims[:, start : start + len(block)] = (q @ block.T) / norms[start : start + len(block)]
    return np.argsort(-sims, axis=1)[:, :k]


def table_batches(vectors: np.ndarray, batch: int = 4096):
    for start in range(0, len(vectors), batch):
        chunk = vectors[start : start + batch]
        yield pa.record_batch(
            {
                "row": pa.array(np.arange(start, start + len(chunk), dtype=np.int64)),
                ann.VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(
                    pa.array(chunk.ravel()), vectors.shape[1]
                ),
            }
        )


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def measure(table, queries, truth, k, nprobes, refine):
    latencies, hits = [], 0
    for q, expected in zip(queries, truth):
        t0 = time.perf_counter()
        rows, _ = ann.exact_rerank(
            q, ann.nearest(table, q, k, ["row"], nprobes=nprobes, refine_factor=refine), k
        )
        latencies.append(time.perf_counter() - t0)
        hits += len(set(rows.column("row").to_pylist()) & set(expected.tolist()))
    lat = np.array(latencies) * 1000
    return hits / (len(queries) * k), np.percentile(lat, 50), np.percentile(lat, 95)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=6144)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--nprobes", default=f"8,16,{ann.DEFAULT_NPROBES},64")
    ap.add_argument("--refine_factors", default=f"1,{ann.DEFAULT_REFINE_FACTOR},30")
    ap.add_argument("--sub_vectors", type=int, default=None, help="default dim / 16")
    ap.add_argument(
        "--flat_queries",
        type=int,
        default=20,
        help="also time this many queries without the vector index (exact scan)",
    )
    ap.add_argument("--dir", default=None, help="where to build the table (default a temp dir)")
    args = ap.parse_args(argv)
    import lancedb

    k = 10
    print(f"# {common.load_note()}; {args.rows} x {args.dim}-d float32, {args.queries} queries")
    t0 = time.perf_counter()
    vectors = make_vectors(args.rows, args.dim)
    queries = make_vectors(args.queries, args.dim, seed=99)
    truth = exact_top_k(vectors, queries, k)
    print(f"# data + exact truth: {time.perf_counter() - t0:.1f} s")

    root = args.dir or tempfile.mkdtemp(prefix="search_recall-")
    if args.dir:
        shutil.rmtree(root, ignore_errors=True)  # a scratch dir: older versions would count
    try:
        db = lancedb.connect(root)
        schema = next(table_batches(vectors[:1])).schema
        t0 = time.perf_counter()
        table = db.create_table(
            "images",
            pa.RecordBatchReader.from_batches(schema, table_batches(vectors)),
            mode="overwrite",
        )
        write_s = time.perf_counter() - t0
        data_bytes = dir_bytes(root)
        if args.flat_queries:
            flat = measure(table, queries[: args.flat_queries], truth, k, 1, 1)
            print(
                f"# no vector index (exact scan): recall@10 {flat[0]:.3f}, "
                f"p50 {flat[1]:.0f} ms, p95 {flat[2]:.0f} ms"
            )
        t0 = time.perf_counter()
        settings = ann.create_vector_index(table, args.rows, args.dim, sub_vectors=args.sub_vectors)
        index_s = time.perf_counter() - t0
        total = dir_bytes(root)
        print(
            f"# write {write_s:.1f} s, IVF-PQ build {index_s:.1f} s "
            f"(partitions {settings['num_partitions']}, sub-vectors "
            f"{settings['num_sub_vectors']}); {total / args.rows:,.0f} bytes/image "
            f"({data_bytes / args.rows:,.0f} vectors + {(total - data_bytes) / args.rows:,.0f} "
            f"index)"
        )
        print("| nprobes | refine_factor | recall@10 | p50 ms | p95 ms |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        default = None
        for nprobes in [int(x) for x in args.nprobes.split(",")]:
            for refine in [int(x) for x in args.refine_factors.split(",")]:
                measure(table, queries[:5], truth, k, nprobes, refine)  # warm up
                recall, p50, p95 = measure(table, queries, truth, k, nprobes, refine)
                print(
                    f"| {nprobes} | {refine} | {recall:.3f} | {p50:.1f} | {p95:.1f} |", flush=True
                )
                if (nprobes, refine) == (ann.DEFAULT_NPROBES, ann.DEFAULT_REFINE_FACTOR):
                    default = (recall, p50, p95)
        if default:
            common.result_line(
                "search_recall",
                default[0],
                0.95,
                p50_ms=f"{default[1]:.1f}",
                p95_ms=f"{default[2]:.1f}",
                build_s=f"{write_s + index_s:.1f}",
                bytes_per_image=f"{total / args.rows:.0f}",
                latency_pass="yes" if default[1] <= 50 else "no",
            )
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
