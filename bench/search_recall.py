"""Build time, recall@10, latency, size and append cost of the search index vs a k-means reference.

    python bench/search_recall.py                        # 20,000 and 50,000 x 6144-d float32
    python bench/search_recall.py --rows 200000 --dtype float16 --queries 100
    python bench/search_recall.py --rows 1000000 --column embedding_reduced --dim 256
    python bench/search_recall.py --rows 20000 --nprobes 8,16,32 --refine_factors 1,10 --old_lance

For each size it writes a job output (one results Parquet file: keys, tags, categories, embeddings;
not timed), then times `search.index.build_index` on it, the whole of `./run.sh index`: reading the
results, writing the LanceDB table and its scalar indexes, training the vector index and adding
every row. The reference, measured in the same run on the same vectors: one GEMM-bound k-means of
25 passes assigning the vectors to 256 centroids (NumPy float32, 4,096 rows per GEMM). The ratio
build / reference is what to compare across machines and loads (target <= 3, aim 2); the
reference runs just before and just after the build, and their mean is used.

The vectors have structure, like embeddings of related photos: points on a 64-dimensional
manifold (1,000 Gaussian clusters in 64-d, mapped into D-d by one random linear map, then
rectified like BiT's ReLU pre-logits) plus a little full-dimensional noise (`--intrinsic_dim`
raises the manifold's dimension, for data PCA compresses less well). Uniformly random
high-dimensional vectors have no real neighbours: every approximate index looks bad on them.
Queries are fresh draws from the same distribution, not rows of the index, run one at a time
through `search.query.by_vector` (what `./run.sh search --image` runs after embedding the image);
the truth is the exact cosine top-10 in NumPy.

Then it appends more outputs of `--append` rows (1,000 then 5,000: fresh vectors) and times them:
below the retrain threshold an append costs time proportional to its rows, not to the index's size
(compare across sizes). The
"retrain s" column is what training the vector index again (due when the index has doubled)
costs at that size: the vector-index part of the build.

Prints the load average, one row per size, the recall/latency grid per size, and a RESULT line:
ratio = the largest build / reference ratio (target <= 3), with recall@10 (>= 0.95) and p50
(<= 30 ms) of the default search settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid

import common
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from search import ann, query
from search.index import build_index, open_index
from tests.search_outputs import CATEGORY_TYPE, _list, results_schema, tag_type
from transforms.write import CODEC, ROW_GROUP_BYTES, dictionary_columns

CLUSTERS = 1000
TAGS_PER_ROW = 10
VOCABULARY = 2000  # distinct synthetic tag wnids
REFERENCE_PASSES = 25
REFERENCE_CENTROIDS = 256
CHUNK = 4096


def make_vectors(
    rows: int,
    dim: int,
    seed: int = 0,
    basis_seed: int = 1,
    intrinsic_dim: int = 64,
    dtype=np.float32,
    clusters_out: np.ndarray | None = None,
) -> np.ndarray:
    """`rows` clustered vectors [rows, dim] (see the module docstring); each row's cluster into
    `clusters_out` when given."""
    basis = np.random.default_rng(basis_seed).normal(size=(intrinsic_dim, dim)).astype(np.float32)
    centres = np.random.default_rng(basis_seed + 1).normal(size=(CLUSTERS, intrinsic_dim))
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), dtype)
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        cluster = rng.integers(0, CLUSTERS, n)
        if clusters_out is not None:
            clusters_out[start : start + n] = cluster
        z = centres[cluster] + 0.5 * rng.normal(size=(n, intrinsic_dim))
        x = z.astype(np.float32) @ basis / np.sqrt(intrinsic_dim)
        x += 0.3 * rng.normal(size=x.shape).astype(np.float32)
        out[start : start + n] = np.maximum(x, 0.0)
    return out


def exact_top_k(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact cosine top-k of each query [Q, k]."""
    q = queries.astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = np.empty((len(queries), len(db)), np.float32)
    for start in range(0, len(db), CHUNK):
        block = db[start : start + CHUNK].astype(np.float32)
        norms = np.linalg.norm(block, axis=1)
        sims[:, start : start + len(block)] = (q @ block.T) / np.where(norms > 0, norms, 1.0)
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def kmeans_reference(vectors: np.ndarray) -> float:
    """Seconds of 25 passes assigning every vector (float32) to the nearest of 256 centroids
    (GEMM and argmin, 4,096 rows at a time): the GEMM-bound part of a k-means over them."""
    rng = np.random.default_rng(0)
    centroids = vectors[rng.choice(len(vectors), REFERENCE_CENTROIDS, replace=False)].astype(
        np.float32
    )
    half_norms = 0.5 * (centroids * centroids).sum(axis=1)
    start = time.perf_counter()
    for _ in range(REFERENCE_PASSES):
        for lo in range(0, len(vectors), CHUNK):
            np.argmin(half_norms - vectors[lo : lo + CHUNK] @ centroids.T, axis=1)
    return time.perf_counter() - start


def write_output(
    directory: str,
    vectors: np.ndarray,
    clusters: np.ndarray,
    prefix: str,
    column: str,
    rng_seed: int,
) -> str:
    """A job output: one results file, written as the job writes them, with keys `{prefix}{i}`, 10
    tags and their categories per row (drawn per cluster, so tag filters select related images),
    `vectors` in `column`."""
    os.makedirs(directory, exist_ok=True)
    rows, dim = vectors.shape
    dtype = "float16" if vectors.dtype == np.float16 else "float32"
    metadata = {
        "embed_model": "synthetic",
        "embed_model_sha256": "0" * 64,
        "tags_model": "synthetic",
        "precision": "float32",
        "image_size": "224",
        "resize": "squash",
        "embedding_dtype": dtype,
    }
    reduced = column == "embedding_reduced"
    schema = results_schema(
        dim if not reduced else 1,
        embedding_dtype=dtype if not reduced else "float32",
        metadata=metadata,
        categories=True,
        reduced_dim=dim if reduced else None,
    )
    rng = np.random.default_rng(rng_seed)
    path = os.path.join(directory, "results-00000-of-00001.parquet")
    # The job's writer settings (codec, dictionaries only for strings, ~64 MB row groups).
    options = dict(
        compression=CODEC, use_compliant_nested_type=True, use_dictionary=dictionary_columns(schema)
    )
    group = max(1, ROW_GROUP_BYTES // (vectors.itemsize * dim + 1000))
    with pq.ParquetWriter(path, schema, **options) as w:
        for lo in range(0, rows, group):
            n = min(group, rows - lo)
            keys = pa.array([f"{prefix}{i}" for i in range(lo, lo + n)])
            tags = _tags(clusters[lo : lo + n], rng)
            columns = {
                "key": keys,
                "source": keys,
                "source_offset": pa.nulls(n, pa.int64()),
                "source_length": pa.nulls(n, pa.int64()),
                "width": pa.array(np.full(n, 640, np.int32)),
                "height": pa.array(np.full(n, 480, np.int32)),
                "tags": tags,
                "categories": _categories(tags),
            }
            block = vectors[lo : lo + n]
            if reduced:  # the index reads only embedding_reduced: a 1-d placeholder saves disk
                columns["embedding"] = _fixed(np.zeros((n, 1), np.float32), schema, "embedding")
                columns["embedding_reduced"] = _fixed(block, schema, "embedding_reduced")
            else:
                columns["embedding"] = _fixed(block, schema, "embedding")
            w.write_table(pa.table([columns[f.name] for f in schema], schema=schema))
    with open(os.path.join(directory, "summary.json"), "w") as f:  # the run's commit marker
        json.dump({"run_id": uuid.uuid4().hex, "results": rows}, f)
    return directory


def _fixed(values: np.ndarray, schema: pa.Schema, name: str) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), type=schema.field(name).type)


def _tags(clusters: np.ndarray, rng) -> pa.Array:
    """10 tags per row: 6 of its cluster's own 10 wnids, 4 from the whole vocabulary."""
    own = (clusters[:, None] * 10 + rng.integers(0, 10, (len(clusters), 6))) % VOCABULARY
    other = rng.integers(0, VOCABULARY, (len(clusters), TAGS_PER_ROW - 6))
    ids = np.concatenate([own, other], axis=1)
    scores = np.sort(rng.random(ids.shape).astype(np.float32), axis=1)[:, ::-1]
    rows = [
        [
            {"index": int(t), "wnid": f"n{t:08d}", "label": f"tag_{t}", "score": float(s)}
            for t, s in zip(row_ids, row_scores)
        ]
        for row_ids, row_scores in zip(ids, scores)
    ]
    return pa.array(rows, _list(tag_type()))


def _categories(tags: pa.Array) -> pa.Array:
    """Each row's tags plus two hypernyms (n9xxxxxxx), as the WordNet roll-up adds them."""
    rows = []
    for row in tags.to_pylist():
        cats = [{"wnid": t["wnid"], "label": t["label"], "score": t["score"]} for t in row]
        top = row[0]
        for level in (1, 2):
            parent = int(top["wnid"][1:]) // (10 * level)
            cats.append(
                {
                    "wnid": f"n9{parent:07d}",
                    "label": f"group_{level}_{parent}",
                    "score": top["score"],
                }
            )
        rows.append(cats)
    return pa.array(rows, _list(CATEGORY_TYPE))


def measure(index, queries, truth, k, nprobes, refine):
    latencies, hits = [], 0
    for q, expected in zip(queries, truth):
        t0 = time.perf_counter()
        found = query.by_vector(index, q, k, nprobes=nprobes, refine_factor=refine)
        latencies.append(time.perf_counter() - t0)
        rows = {int(h.key[1:]) for h in found}
        hits += len(rows & set(expected.tolist()))
    lat = np.array(latencies) * 1000
    return hits / (len(queries) * k), np.percentile(lat, 50), np.percentile(lat, 95)


def old_lance_build(index_dir: str, rows: int, dim: int) -> float:
    """Seconds LanceDB's own IVF-PQ index took over the same table (what `./run.sh index` built
    before: sample rate 64, 25 iterations, dim / 16 sub-vectors)."""
    import lancedb
    import lancedb.index

    table = lancedb.connect(index_dir).open_table("images")
    start = time.perf_counter()
    table.create_index(
        ann.VECTOR_COLUMN,
        replace=True,
        config=lancedb.index.IvfPq(
            distance_type="cosine",
            num_partitions=ann.num_partitions(rows),
            num_sub_vectors=max(1, dim // 16),
            sample_rate=64,
            max_iterations=25,
        ),
    )
    return time.perf_counter() - start


def bench_size(args, rows: int, root: str) -> dict:
    k = 10
    dtype = np.float16 if args.dtype == "float16" else np.float32
    clusters = np.empty(rows, np.int64)
    t0 = time.perf_counter()
    vectors = make_vectors(
        rows, args.dim, intrinsic_dim=args.intrinsic_dim, dtype=dtype, clusters_out=clusters
    )
    output = write_output(os.path.join(root, "out"), vectors, clusters, "s", args.column, 1)
    queries = make_vectors(args.queries, args.dim, seed=99, intrinsic_dim=args.intrinsic_dim)
    queries = queries.astype(dtype).astype(np.float32)  # as the job would round them
    truth = exact_top_k(vectors, queries, k)
    print(f"# {rows:,} rows: data, results file and exact truth {time.perf_counter() - t0:.0f} s")

    # The reference runs just before and just after the build; their mean is the yardstick, so
    # a load that changes during the run weighs on both sides alike.
    if vectors.dtype != np.float32:  # the reference is float32 GEMM: convert once, not per pass
        vectors = np.concatenate(
            [vectors[i : i + CHUNK].astype(np.float32) for i in range(0, rows, CHUNK)]
        )
    load_before = os.getloadavg()[0]
    before_s = kmeans_reference(vectors)
    index_dir = os.path.join(root, "index")
    report = build_index(output, index_dir, log_every_secs=0)
    after_s = kmeans_reference(vectors)
    reference_s = (before_s + after_s) / 2
    load_after = os.getloadavg()[0]
    del vectors
    index = open_index(index_dir)
    vi = index.meta["vector_index"]
    result = {
        "rows": rows,
        "build_s": report["seconds"],
        "write_s": report["write_seconds"],
        "ann_s": vi["seconds"],
        "reference_s": reference_s,
        "ratio": report["seconds"] / reference_s,
        "bytes_per_image": report["bytes_per_image"],
        "load": f"{load_before:.1f}-{load_after:.1f}",
        "grid": [],
    }
    print(
        f"# built in {report['seconds']:.1f} s (rows: read and written "
        f"{report['write_seconds']:.1f} s, vector index {vi['seconds']:.1f} s, scalar indexes and "
        f"the rest {report['seconds'] - report['write_seconds'] - vi['seconds']:.1f} s: "
        f"{vi['num_partitions']} partitions, "
        f"{vi['ann_dim']}-d, PCA keeps {100 * vi['pca_explained_variance']:.0f}% of the "
        f"variance); reference {before_s:.1f} s before, {after_s:.1f} s after; "
        f"load {result['load']}",
        flush=True,
    )
    for nprobes in [int(x) for x in args.nprobes.split(",")]:
        for refine in [int(x) for x in args.refine_factors.split(",")]:
            measure(index, queries[:5], truth[:5], k, nprobes, refine)  # warm up
            recall, p50, p95 = measure(index, queries, truth, k, nprobes, refine)
            result["grid"].append((nprobes, refine, recall, p50, p95))
            if (nprobes, refine) == (ann.DEFAULT_NPROBES, ann.DEFAULT_REFINE_FACTOR):
                result.update(recall=recall, p50=p50, p95=p95)

    appends = []
    for i, n in enumerate(int(x) for x in args.append.split(",")):
        more_clusters = np.empty(n, np.int64)
        more = make_vectors(
            n,
            args.dim,
            seed=1000 + i,
            intrinsic_dim=args.intrinsic_dim,
            dtype=dtype,
            clusters_out=more_clusters,
        )
        extra = os.path.join(root, f"append{i}")
        write_output(extra, more, more_clusters, f"a{i}_", args.column, 2 + i)
        appended = build_index(extra, index_dir, log_every_secs=0)
        assert appended["rows_added"] == n and not appended["vector_index_trained"]
        appends.append(appended["seconds"])
        shutil.rmtree(extra)
    result["append_s"] = appends
    if args.old_lance:
        result["old_lance_s"] = old_lance_build(
            index_dir, rows + sum(map(int, args.append.split(","))), args.dim
        )
        print(f"# LanceDB's own IVF-PQ on the same table: {result['old_lance_s']:.1f} s")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="20000,50000", help="index sizes, comma-separated")
    ap.add_argument("--dim", type=int, default=6144)
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument(
        "--column",
        choices=("embedding", "embedding_reduced"),
        default="embedding",
        help="results column the vectors are in (embedding_reduced: a PCA-reduced run)",
    )
    ap.add_argument("--intrinsic_dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--nprobes", default=f"16,{ann.DEFAULT_NPROBES}")
    ap.add_argument("--refine_factors", default=f"1,{ann.DEFAULT_REFINE_FACTOR}")
    ap.add_argument(
        "--append", default="1000,5000", help="rows of each append after the build (comma list)"
    )
    ap.add_argument(
        "--old_lance",
        action="store_true",
        help="also time LanceDB's own IVF-PQ index over the same table (minutes)",
    )
    ap.add_argument("--dir", default=None, help="scratch directory (default a temp dir)")
    args = ap.parse_args(argv)
    import faiss  # noqa: F401  (imported once here: their import, seconds, is not the build's)
    import lancedb  # noqa: F401

    print(
        f"# {common.load_note()}; {args.dim}-d {args.dtype} in {args.column}, "
        f"{args.queries} queries, search defaults nprobes {ann.DEFAULT_NPROBES}, "
        f"refine_factor {ann.DEFAULT_REFINE_FACTOR}",
        flush=True,
    )
    results = []
    for rows in [int(x) for x in args.rows.split(",")]:
        root = args.dir or tempfile.mkdtemp(prefix="search_recall-")
        shutil.rmtree(root, ignore_errors=True)
        try:
            results.append(bench_size(args, rows, root))
        finally:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"\n| rows | build s | rows read + written s | vector index (= retrain) s | "
        f"k-means reference s | build / reference | recall@10 | p50 ms | p95 ms | bytes/image | "
        f"append {args.append.replace(',', ' / ')} rows s | load |"
    )
    print("| ---: " * 11 + "| --- |")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['build_s']:.1f} | {r['write_s']:.1f} | {r['ann_s']:.1f} | "
            f"{r['reference_s']:.1f} | {r['ratio']:.2f} | {r.get('recall', float('nan')):.3f} | "
            f"{r.get('p50', float('nan')):.1f} | {r.get('p95', float('nan')):.1f} | "
            f"{r['bytes_per_image']:,} | {' / '.join(f'{s:.1f}' for s in r['append_s'])} | "
            f"{r['load']} |"
        )
    for r in results:
        if "old_lance_s" in r:
            print(
                f"LanceDB's own IVF-PQ (the previous build) on the same {r['rows']:,}-row table: "
                f"{r['old_lance_s']:.1f} s, {r['old_lance_s'] / r['reference_s']:.2f} x the "
                "reference (index only: without reading the results and writing the table)"
            )
    for r in results:
        print(f"\n{r['rows']:,} rows:\n| nprobes | refine_factor | recall@10 | p50 ms | p95 ms |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for nprobes, refine, recall, p50, p95 in r["grid"]:
            print(f"| {nprobes} | {refine} | {recall:.3f} | {p50:.1f} | {p95:.1f} |")
    print(f"# {common.load_note()}")
    worst = max(results, key=lambda r: r["ratio"])
    recall = min(r.get("recall", 0.0) for r in results)
    p50 = max(r.get("p50", float("inf")) for r in results)
    common.result_line(
        "search_recall",
        worst["ratio"],
        3.0,
        higher_is_better=False,
        rows=",".join(str(r["rows"]) for r in results),
        build_s=",".join(f"{r['build_s']:.1f}" for r in results),
        reference_s=",".join(f"{r['reference_s']:.1f}" for r in results),
        recall=f"{recall:.3f}",
        recall_pass="yes" if recall >= 0.95 else "no",
        p50_ms=f"{p50:.1f}",
        latency_pass="yes" if p50 <= 30 else "no",
        bytes_per_image=",".join(str(r["bytes_per_image"]) for r in results),
    )


if __name__ == "__main__":
    main()
