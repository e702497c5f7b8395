"""The approximate part of search: a FAISS IVF index over PCA-reduced vectors, and exact re-ranking.

The rows (key, tags, the full vectors) live in the LanceDB table `images.lance`; each has an
integer `id`. The vector index is one FAISS file beside it, `vectors.faiss`, whose entries are
those ids. One place for the settings, so that `./run.sh index`, `./run.sh search` and
`bench/search_recall.py` (which measured them) use the same ones:

- below `ANN_MIN_ROWS` rows there is no vector index: LanceDB scans every vector (exact, and fast
  enough at that size);
- above it, vectors are L2-normalised (cosine = L2 on unit vectors) and, when wider than
  `ANN_DIMS`, projected on their first `ANN_DIMS` principal components (a randomised PCA of a
  `PCA_SAMPLE_ROWS` sample: a few float32 GEMMs); an IVF index with `num_partitions` ~ sqrt(rows)
  (k-means on `TRAIN_SAMPLE_RATE` sample vectors per partition, BLAS-backed in FAISS) holds each
  projected vector as 8-bit scalar-quantised codes (`ANN_DIMS` bytes);
- a query probes `nprobes` partitions for `refine_factor` x k candidates, then `exact_rerank`
  recomputes the cosine of each candidate from its full vector (float64), so the scores returned
  are exact (an indexed image queried with its own embedding scores 1.0);
- new rows are added to the trained index (time proportional to their number) until the table has
  grown to `RETRAIN_GROWTH` times the rows it was trained on; then it is trained again on all rows.

Why not LanceDB's own IVF-PQ index (what this module built before): its k-means and PQ training run
at a few GFLOP/s, 17 ms an image at 50,000 x 6144-d; the work here is the same kind (k-means, code
assignment) on 24x narrower vectors, in GEMMs. The PCA costs candidate quality, which the exact
re-rank of `refine_factor` x k candidates recovers (bench/search_recall.py measures both).
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from search import SearchError

ANN_MIN_ROWS = 1_000
DEFAULT_NPROBES = 32
DEFAULT_REFINE_FACTOR = 10
MIN_ROWS_PER_PARTITION = 256
# The space the index works in: the first 256 principal components (of 6144-d BiT embeddings;
# narrower vectors, e.g. a PCA-reduced `embedding_reduced` column, are indexed as they are).
ANN_DIMS = 256
PCA_SAMPLE_ROWS = 8_192
PCA_POWER_ITERATIONS = 2
# k-means: 64 sample vectors per partition (FAISS advises >= 39) and 20 iterations.
TRAIN_SAMPLE_RATE = 64
KMEANS_ITERATIONS = 20
RETRAIN_GROWTH = 2
SEED = 0
TAKE_ROWS = 4_096  # rows read per LanceDB call while sampling and adding
VECTOR_COLUMN = "vector"
ID_COLUMN = "id"
INDEX_FILE = "vectors.faiss"
INDEX_TYPE = "faiss_ivf_sq8"


def _faiss():
    """FAISS, imported on first use. Its OpenMP threads sleep when idle (PASSIVE) instead of
    spinning: on a machine shared with other processes, spinning threads made its k-means 5x
    slower."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # not "Successfully loaded faiss."
    import faiss

    return faiss


def num_partitions(rows: int) -> int:
    """IVF partitions for `rows` vectors: ~sqrt(rows), with >= 256 rows in each."""
    return max(1, min(round(math.sqrt(rows)), rows // MIN_ROWS_PER_PARTITION))


def retrain_due(rows: int, vector_index: dict | None, min_rows: int = ANN_MIN_ROWS) -> bool:
    """Whether a table of `rows` needs its vector index (re)trained: it is big enough for one,
    and has none of this kind yet or has grown `RETRAIN_GROWTH` times since it was trained."""
    if rows < max(min_rows, MIN_ROWS_PER_PARTITION):
        return False
    if not vector_index or vector_index.get("type") != INDEX_TYPE:
        return True
    return rows >= RETRAIN_GROWTH * vector_index["trained_rows"]


def normalise(vectors) -> np.ndarray:
    """float32 rows scaled to unit length (zero rows stay zero)."""
    v = np.asarray(vectors, np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", v, v))
    return v * (1.0 / np.where(norms > 0, norms, 1.0)).astype(np.float32)[:, None]


# ------------------------------------------------------------------------------------ PCA


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.linalg.eigh` of a small symmetric matrix on one BLAS thread. LAPACK's eigensolver makes
    hundreds of small BLAS calls; on a machine busy with other processes, OpenBLAS's threads
    spin-wait through each: 0.3-0.9 s for a 272 x 272 matrix on 2 threads, 20 ms on one."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return np.linalg.eigh(matrix)


def _orthonormal(y: np.ndarray, passes: int = 2) -> np.ndarray:
    """An orthonormal basis of the columns of `y` [n, l], by the eigendecomposition of the small
    Gram matrix (twice, for accuracy): GEMMs and a small `_eigh`, no QR of the tall matrix."""
    q = y.astype(np.float64)
    for _ in range(passes):
        w, v = _eigh(q.T @ q)
        keep = w > w[-1] * 1e-12
        q = q @ (v[:, keep] / np.sqrt(w[keep]))
    return q


def fit_pca(
    sample: np.ndarray, dims: int, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean [D], components [d, D], explained share of the variance) of the first `d` <= `dims`
    principal components of `sample` [n, D], by a randomised range finder with power iterations
    (Halko, Martinsson & Tropp 2011): 2 + 2 x `PCA_POWER_ITERATIONS` GEMMs of the sample with a
    [D, dims + 16] matrix, instead of the eigendecomposition of a D x D covariance."""
    x = np.asarray(sample, np.float32)
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    a = x - mean
    width = min(dims + 16, *a.shape)
    rng = np.random.default_rng(seed)
    y = a @ rng.standard_normal((a.shape[1], width), dtype=np.float32)
    for _ in range(PCA_POWER_ITERATIONS):
        y = a @ (a.T @ _orthonormal(y, passes=1).astype(np.float32))
    q = _orthonormal(y).astype(np.float32)
    b = (q.T @ a).astype(np.float64)  # [l, D]: a ~ q b
    w, u = _eigh(b @ b.T)
    order = np.argsort(w)[::-1][:dims]
    order = order[w[order] > max(w[order[0]], 0.0) * 1e-10]
    s = np.sqrt(w[order])
    components = ((u[:, order].T @ b) / s[:, None]).astype(np.float32)
    total = float(np.einsum("ij,ij->", a, a, dtype=np.float64))
    return mean, components, float((s**2).sum() / total) if total > 0 else 1.0


# --------------------------------------------------------------------------- vector index


class VectorIndex:
    """A trained FAISS index (PCA projection, when the vectors are wider than `ANN_DIMS`, then IVF
    with 8-bit scalar-quantised codes, L2 on unit vectors) whose entries are `id`s of the table.
    `settings` is what `index.json` keeps about it."""

    def __init__(self, index, settings: dict):
        self.index, self.settings = index, settings
        self._next_id: int | None = None

    @property
    def ivf(self):
        return _faiss().extract_index_ivf(self.index)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            ids = np.asarray(ids, np.int64)
            self.index.add_with_ids(normalise(vectors), ids)
            self._next_id = max(self.next_id(), int(ids.max()) + 1)

    def next_id(self) -> int:
        """1 + the largest id in the index (0 when empty): rows with ids from there on are not
        in it yet. Read from the index itself once (not from index.json, which a build killed
        at the wrong time leaves behind)."""
        if self._next_id is None:
            faiss, invlists = _faiss(), self.ivf.invlists
            top = -1
            for lst in range(invlists.nlist):
                size = invlists.list_size(lst)
                if size:
                    ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size)
                    top = max(top, int(ids.max()))
            self._next_id = top + 1
        return self._next_id

    def search(
        self, vector: np.ndarray, k: int, nprobes: int, allowed: np.ndarray | None = None
    ) -> np.ndarray:
        """ids of the (approximately) `k` nearest entries to `vector`, best first; only among
        `allowed` ids when given."""
        faiss = _faiss()
        selector = None if allowed is None else faiss.IDSelectorBatch(np.asarray(allowed, np.int64))
        params = faiss.SearchParametersIVF(nprobe=max(1, int(nprobes)))
        if selector is not None:
            params.sel = selector
        if isinstance(self.index, faiss.IndexPreTransform):
            params = faiss.SearchParametersPreTransform(index_params=params)
        query = normalise(np.asarray(vector, np.float32).reshape(1, -1))
        # One query gains nothing from threads, and waking them on a busy machine cost 5-15 ms.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            _, ids = self.index.search(query, int(k), params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        ids = ids[0]
        return ids[ids >= 0]

    def ids(self) -> np.ndarray:
        """Every id in the index (its inverted lists' ids, unordered)."""
        faiss, invlists = _faiss(), self.ivf.invlists
        parts = [
            faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst)).copy()
            for lst in range(invlists.nlist)
            if invlists.list_size(lst)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def remove(self, ids: np.ndarray) -> int:
        """Take `ids` out of the index; how many were in it."""
        if not len(ids):
            return 0
        return int(self.index.remove_ids(_faiss().IDSelectorBatch(np.asarray(ids, np.int64))))

    def to_bytes(self) -> bytes:
        return _faiss().serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, settings: dict, where: str) -> VectorIndex:
        """The index serialised in `data` (read from `where`, named in errors)."""
        try:
            index = _faiss().deserialize_index(np.frombuffer(data, np.uint8))
        except RuntimeError as e:
            raise DamagedIndexError(where, _reason(e)) from None
        return cls._checked(index, settings, where)

    @classmethod
    def load(cls, path: str, settings: dict, writable: bool = False) -> VectorIndex:
        """The index in the local file `path`, memory-mapped read-only (a query reads only the
        lists it probes), or read whole when `writable`, to add to it."""
        faiss = _faiss()
        flags = 0 if writable else faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        try:
            index = faiss.read_index(path, flags)
        except (RuntimeError, OSError) as e:
            raise DamagedIndexError(path, _reason(e)) from None
        return cls._checked(index, settings, path)

    @classmethod
    def _checked(cls, index, settings: dict, where: str) -> VectorIndex:
        if index.d != settings.get("dim", index.d):
            raise DamagedIndexError(where, f"{index.d}-d, index.json says {settings['dim']}-d")
        return cls(index, settings)


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class DamagedIndexError(SearchError):
    """`vectors.faiss` is missing or cannot be read; `./run.sh index` trains it again."""

    def __init__(self, path: str, reason: str):
        super().__init__(
            f"the vector index {path} is missing or damaged ({reason}): run ./run.sh index again "
            "with one of the index's outputs and --index_dir, which rebuilds it from the table"
        )


# ----------------------------------------------------------------------- from the table


def _take(table, offsets: np.ndarray) -> np.ndarray:
    """The vectors at row `offsets` of the table, float32 [n, D] (in any order: for a sample)."""
    parts = []
    for start in range(0, len(offsets), TAKE_ROWS):
        got = table.take_offsets(offsets[start : start + TAKE_ROWS].tolist())
        parts.append(_column_vectors(got.select([VECTOR_COLUMN]).to_arrow()))
    return np.concatenate(parts)


def _column_vectors(rows, dtype=np.float32) -> np.ndarray:
    column = rows.column(VECTOR_COLUMN)
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(dtype, copy=False).reshape(len(rows), -1)


def scan(table, where: str | None = None):
    """(ids, float32 vectors) of the rows (matching `where`), `TAKE_ROWS` at a time."""
    query = table.search().select([ID_COLUMN, VECTOR_COLUMN]).limit(None)
    if where:
        query = query.where(where)
    for batch in query.to_batches(TAKE_ROWS):
        if batch.num_rows:
            ids = batch.column(ID_COLUMN).to_numpy(zero_copy_only=False).astype(np.int64)
            yield ids, _column_vectors(batch)


def train(table, dim: int, log=None) -> VectorIndex:
    """Train a vector index on a uniform sample of the table's rows, then add every row to it.

    The sample is `max(PCA_SAMPLE_ROWS, TRAIN_SAMPLE_RATE x partitions)` rows (64,000 at 1M rows),
    read at random offsets and kept projected (1 KB each); the PCA sees the first
    `PCA_SAMPLE_ROWS` of them at full width (200 MB at 6144-d). Then one scan of the table adds
    every row, `TAKE_ROWS` at a time: memory does not grow with the table."""
    faiss = _faiss()
    started = time.monotonic()
    rows = table.count_rows()
    partitions = num_partitions(rows)
    rng = np.random.default_rng(SEED)
    sample_rows = min(rows, max(PCA_SAMPLE_ROWS, TRAIN_SAMPLE_RATE * partitions))
    offsets = rng.choice(rows, sample_rows, replace=False)
    head = normalise(_take(table, np.sort(offsets[:PCA_SAMPLE_ROWS])))
    transform, ann_dim, explained = None, dim, 1.0
    if dim > ANN_DIMS:
        mean, components, explained = fit_pca(head, ANN_DIMS)
        ann_dim = len(components)
        transform = faiss.LinearTransform(dim, ann_dim, True)
        faiss.copy_array_to_vector(components.ravel(), transform.A)
        faiss.copy_array_to_vector(-(components @ mean), transform.b)
        transform.is_trained = True

    def project(vectors: np.ndarray) -> np.ndarray:
        return vectors if transform is None else transform.apply(vectors)

    sample = [project(head)]
    del head
    rest = np.sort(offsets[PCA_SAMPLE_ROWS:])
    for start in range(0, len(rest), TAKE_ROWS):
        sample.append(project(normalise(_take(table, rest[start : start + TAKE_ROWS]))))
    sample = np.concatenate(sample)
    ivf = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatL2(ann_dim), ann_dim, partitions, faiss.ScalarQuantizer.QT_8bit
    )
    ivf.cp.niter = KMEANS_ITERATIONS
    ivf.cp.seed = SEED
    ivf.cp.max_points_per_centroid = TRAIN_SAMPLE_RATE
    ivf.train(sample)
    trained_s = time.monotonic() - started
    index = faiss.IndexPreTransform(transform, ivf) if transform is not None else ivf
    vectors = VectorIndex(index, {})
    for ids, batch in scan(table):
        vectors.add(ids, batch)
    vectors.settings = {
        "type": INDEX_TYPE,
        "file": INDEX_FILE,
        "distance": "cosine",
        "num_partitions": partitions,
        "dim": dim,
        "ann_dim": ann_dim,
        "pca_explained_variance": round(explained, 4),
        "train_sample": int(sample_rows),
        "trained_rows": rows,
        "train_seconds": round(trained_s, 2),
        "seconds": round(time.monotonic() - started, 2),
    }
    if log:
        log(
            "vector index: %d rows, %d partitions, %d-d (PCA of %d-d: %.0f%% of the variance), "
            "trained in %.1f s, built in %.1f s",
            rows,
            partitions,
            ann_dim,
            dim,
            100 * explained,
            trained_s,
            vectors.settings["seconds"],
        )
    return vectors


def catch_up(vectors: VectorIndex, table) -> tuple[int, int]:
    """Make `vectors` hold exactly the table's rows: add those not in it yet (ids from
    `next_id()` on: time proportional to their number), and, when it then holds more entries than
    the table has rows (rows were deleted, e.g. a replaced run's), remove the ids no longer in the
    table (one read of the `id` column). Returns (added, removed)."""
    added = 0
    for ids, batch in scan(table, f"{ID_COLUMN} >= {vectors.next_id()}"):
        vectors.add(ids, batch)
        added += len(ids)
    removed = 0
    if vectors.ntotal > table.count_rows():
        rows = table.search().select([ID_COLUMN]).limit(None).to_arrow().column(ID_COLUMN)
        gone = np.setdiff1d(vectors.ids(), rows.to_numpy().astype(np.int64))
        removed = vectors.remove(gone)
    return added, removed


# ---------------------------------------------------------------------------------- query


def nearest(
    table,
    vector: np.ndarray,
    limit: int,
    columns: list[str],
    where: str | None = None,
    nprobes: int = DEFAULT_NPROBES,
    refine_factor: int = DEFAULT_REFINE_FACTOR,
    vectors: VectorIndex | None = None,
):
    """Candidates for the `limit` rows nearest to `vector` (cosine), as a pyarrow Table with
    `columns` and the vector; `where` (SQL) filters before the search. With `vectors`, the
    `limit` x `refine_factor` best of the vector index, plus any rows not in it yet; without
    (below `ANN_MIN_ROWS`, or an index built before `vectors.faiss` existed), LanceDB's own search
    (exact scan, or its IVF-PQ index with its refine). Not exactly scored yet: `exact_rerank`."""
    vector = np.asarray(vector, np.float32)
    wanted = list(dict.fromkeys([*columns, VECTOR_COLUMN]))
    if vectors is None:
        query = (
            table.search(vector, vector_column_name=VECTOR_COLUMN)
            .distance_type("cosine")
            .nprobes(nprobes)
            .refine_factor(refine_factor)
        )
        if where:
            query = query.where(where, prefilter=True)
        return query.select(wanted).limit(limit).to_arrow()
    candidates = min(limit * max(1, int(refine_factor)), max(1, vectors.ntotal))
    allowed = None
    if where:
        found = table.search().where(where).select([ID_COLUMN]).limit(None).to_arrow()
        allowed = found.column(ID_COLUMN).to_numpy().astype(np.int64)
    if allowed is not None and len(allowed) <= candidates:
        ids = allowed  # few enough to score them all exactly
    else:
        ids = vectors.search(vector, candidates, nprobes, allowed)
    fetch = f"{ID_COLUMN} >= {vectors.next_id()}"  # rows an interrupted build left out
    if where:
        fetch = f"({fetch}) AND ({where})"
    if len(ids):
        fetch = f"{ID_COLUMN} IN ({','.join(map(str, ids.tolist()))}) OR ({fetch})"
    return table.search().where(fetch).select(wanted).limit(None).to_arrow()


def cosine(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Exact cosine similarity (float64) of `query` [D] with each row of `vectors` [N, D].
    einsum, not BLAS: for a few hundred rows, waking BLAS threads on a busy machine took 20 ms,
    the products themselves 0.3 ms."""
    q = np.asarray(query, np.float64)
    v = np.asarray(vectors, np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", v, v) * np.dot(q, q))
    with np.errstate(invalid="ignore", divide="ignore"):
        sims = np.einsum("ij,j->i", v, q) / norms
    return np.where(norms > 0, sims, 0.0)


def exact_rerank(query: np.ndarray, candidates, k: int):
    """(rows sorted best first, their exact cosines), at most `k`, from a `nearest` result."""
    if candidates.num_rows == 0:
        return candidates, np.zeros(0)
    sims = cosine(query, _column_vectors(candidates, np.float64))
    order = np.argsort(-sims, kind="stable")[:k]
    return candidates.take(order), sims[order]
