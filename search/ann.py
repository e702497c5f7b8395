"""The approximate part of search: the IVF-PQ vector index of a LanceDB table, and exact re-ranking.

One place for the settings, so that `./run.sh index`, `./run.sh search` and
`bench/search_recall.py` (which measured them) use the same ones:

- below `ANN_MIN_ROWS` rows there is no vector index: LanceDB scans every vector (exact, and fast
  enough at that size);
- above it, IVF-PQ with cosine distance, `num_partitions` ~ sqrt(rows) (at least 256 rows per
  partition, so no cluster is empty) and `num_sub_vectors` = dim / 16 (16 dimensions per 1-byte PQ
  code: 384 bytes per 6144-d vector);
- a query probes `DEFAULT_NPROBES` partitions, LanceDB re-ranks `refine_factor` x k PQ candidates
  with the full vectors, and `exact_rerank` recomputes the cosine of the survivors in float64, so
  the scores returned are exact (an indexed image queried with its own embedding scores 1.0).
"""

from __future__ import annotations

import math

import numpy as np

ANN_MIN_ROWS = 1_000
DEFAULT_NPROBES = 32
DEFAULT_REFINE_FACTOR = 10
MIN_ROWS_PER_PARTITION = 256
DIMS_PER_SUB_VECTOR = 16
# k-means training: 64 sample vectors per partition (FAISS advises >= 39) and 25 iterations,
# a quarter and half of LanceDB's defaults: the build is several times faster on 6144-d vectors,
# and the recall lost is recovered by re-ranking (bench/search_recall.py).
TRAIN_SAMPLE_RATE = 64
TRAIN_MAX_ITERATIONS = 25
VECTOR_COLUMN = "vector"


def num_partitions(rows: int) -> int:
    """IVF partitions for `rows` vectors: ~sqrt(rows), with >= 256 rows in each."""
    return max(1, min(round(math.sqrt(rows)), rows // MIN_ROWS_PER_PARTITION))


def num_sub_vectors(dim: int) -> int:
    """PQ sub-vectors for `dim`: dim / 16 (the largest divisor of dim up to that when 16 does not
    divide it, as PQ needs equal slices)."""
    target = max(1, dim // DIMS_PER_SUB_VECTOR)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def create_vector_index(
    table, rows: int, dim: int, partitions: int | None = None, sub_vectors: int | None = None
) -> dict:
    """(Re)build the IVF-PQ cosine index over `VECTOR_COLUMN`; returns the settings used."""
    import lancedb.index

    settings = {
        "type": "ivf_pq",
        "distance": "cosine",
        "num_partitions": partitions or num_partitions(rows),
        "num_sub_vectors": sub_vectors or num_sub_vectors(dim),
        "trained_rows": rows,
    }
    table.create_index(
        VECTOR_COLUMN,
        replace=True,
        config=lancedb.index.IvfPq(
            distance_type="cosine",
            num_partitions=settings["num_partitions"],
            num_sub_vectors=settings["num_sub_vectors"],
            sample_rate=TRAIN_SAMPLE_RATE,
            max_iterations=TRAIN_MAX_ITERATIONS,
        ),
    )
    return settings


def nearest(
    table,
    vector: np.ndarray,
    limit: int,
    columns: list[str],
    where: str | None = None,
    nprobes: int = DEFAULT_NPROBES,
    refine_factor: int = DEFAULT_REFINE_FACTOR,
):
    """The `limit` rows nearest to `vector` (cosine), as a pyarrow Table with `columns` and the
    vector; `where` (SQL) filters before the search. Not yet exactly scored: see `exact_rerank`."""
    query = (
        table.search(np.asarray(vector, np.float32), vector_column_name=VECTOR_COLUMN)
        .distance_type("cosine")
        .nprobes(nprobes)
        .refine_factor(refine_factor)
    )
    if where:
        query = query.where(where, prefilter=True)
    wanted = list(dict.fromkeys([*columns, VECTOR_COLUMN, "_distance"]))
    return query.select(wanted).limit(limit).to_arrow()


def cosine(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Exact cosine similarity (float64) of `query` [D] with each row of `vectors` [N, D]."""
    q = np.asarray(query, np.float64)
    v = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(v, axis=1) * np.linalg.norm(q)
    with np.errstate(invalid="ignore", divide="ignore"):
        sims = (v @ q) / norms
    return np.where(norms > 0, sims, 0.0)


def exact_rerank(query: np.ndarray, candidates, k: int):
    """(rows sorted best first, their exact cosines), at most `k`, from a `nearest` result."""
    if candidates.num_rows == 0:
        return candidates, np.zeros(0)
    column = candidates.column(VECTOR_COLUMN).combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(candidates.num_rows, -1)
    sims = cosine(query, vectors)
    order = np.argsort(-sims, kind="stable")[:k]
    return candidates.take(order), sims[order]
