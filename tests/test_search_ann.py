"""`search.ann`: vector-index settings, the PCA, the FAISS index trained from a LanceDB table, the
candidates of a query (with filters, and rows not in the index yet), and the exact re-rank. The
whole path through `build_index` is in tests/test_search_index.py."""

import os

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from core.atomic import atomic_write
from search import ann


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 20, rank: int = 12) -> np.ndarray:
    """`n` vectors around `clusters` centres on a `rank`-dimensional subspace, plus a little
    full-dimensional noise: neighbours are meaningful, and a PCA has something to find."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(rank, dim))
    centres = np.random.default_rng(98).normal(size=(clusters, rank)) * 3
    z = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, rank))
    return (z @ basis + 0.1 * rng.normal(size=(n, dim))).astype(np.float32)


def table_of(tmp_path, vectors: np.ndarray, first_id: int = 0, name: str = "images"):
    """A LanceDB table with `id`, `key` and `vector`, as `images.lance` has them."""
    n, dim = vectors.shape
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    data = pa.table(
        {
            ann.ID_COLUMN: ids,
            "key": [f"k{i}" for i in ids],
            ann.VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        }
    )
    return lancedb.connect(str(tmp_path / "db")).create_table(name, data, mode="overwrite")


def exact_top(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return list(np.argsort(-ann.cosine(query, vectors), kind="stable")[:k])


@pytest.fixture
def small_ann(monkeypatch):
    """The PCA path at test size: vectors wider than 16 dimensions are projected to 16."""
    monkeypatch.setattr(ann, "ANN_DIMS", 16)
    monkeypatch.setattr(ann, "PCA_SAMPLE_ROWS", 512)


@pytest.mark.parametrize(
    "rows, partitions", [(300, 1), (2_000, 7), (50_000, 195), (1_000_000, 1000)]
)
def test_partitions_follow_sqrt_rows_with_at_least_256_rows_each(rows, partitions):
    assert ann.num_partitions(rows) == partitions
    assert rows // ann.num_partitions(rows) >= ann.MIN_ROWS_PER_PARTITION


def test_retrain_is_due_past_the_minimum_and_when_the_table_has_doubled():
    trained = {"type": ann.INDEX_TYPE, "trained_rows": 5_000}
    assert not ann.retrain_due(999, None, min_rows=1_000)
    assert ann.retrain_due(1_000, None, min_rows=1_000)
    assert not ann.retrain_due(9_999, trained, min_rows=1_000)
    assert ann.retrain_due(10_000, trained, min_rows=1_000)
    # An index of LanceDB's own IVF-PQ (an older build) is replaced by one of this kind.
    assert ann.retrain_due(1_000, {"type": "ivf_pq", "trained_rows": 1_000}, min_rows=1_000)


def test_normalise_scales_rows_to_unit_length_and_keeps_zero_rows():
    v = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(ann.normalise(v), [[0.6, 0.8], [0.0, 0.0]])


def test_pca_finds_the_principal_subspace_like_an_exact_svd():
    x = clustered(2_000, 200, rank=12)
    mean, components, explained = ann.fit_pca(x, 12)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(components @ components.T, np.eye(12), atol=1e-4)
    # Same subspace (the projectors agree), and the same share of the variance.
    np.testing.assert_allclose(components.T @ components, vt[:12].T @ vt[:12], atol=1e-3)
    assert explained == pytest.approx((s[:12] ** 2).sum() / (s**2).sum(), rel=1e-4)
    assert explained > 0.95


def test_pca_keeps_only_the_components_the_sample_has():
    x = clustered(40, 64)  # 40 rows: at most 39 components after centring
    _, components, explained = ann.fit_pca(x, 64)
    assert len(components) <= 39
    assert explained == pytest.approx(1.0, abs=1e-4)


def test_trained_index_finds_the_exact_neighbours(tmp_path, small_ann):
    vectors = clustered(3_000, 64)
    table = table_of(tmp_path, vectors)
    index = ann.train(table, 64)
    s = index.settings
    assert s["type"] == ann.INDEX_TYPE and s["trained_rows"] == 3_000
    assert s["num_partitions"] == ann.num_partitions(3_000) == 11
    assert s["ann_dim"] == 16 and s["dim"] == 64 and s["pca_explained_variance"] > 0.9
    assert index.ntotal == 3_000 and index.next_id() == 3_000
    queries = clustered(20, 64, seed=7)
    recall = []
    for q in queries:
        candidates = ann.nearest(table, q, 10, ["key"], vectors=index)
        rows, sims = ann.exact_rerank(q, candidates, 10)
        expected = exact_top(vectors, q, 10)
        recall.append(len({int(k[1:]) for k in rows.column("key").to_pylist()} & set(expected)))
        assert sims[0] == pytest.approx(ann.cosine(q, vectors[expected[:1]])[0], abs=1e-12)
    assert np.mean(recall) / 10 >= 0.95
    # Every partition probed and every row a candidate: the exact answer.
    q = queries[0]
    everything = ann.nearest(table, q, 10, ["key"], nprobes=11, refine_factor=300, vectors=index)
    rows, _ = ann.exact_rerank(q, everything, 10)
    assert [int(k[1:]) for k in rows.column("key").to_pylist()] == exact_top(vectors, q, 10)


def test_vectors_no_wider_than_ann_dims_are_indexed_as_they_are(tmp_path, small_ann):
    vectors = clustered(600, 16)
    index = ann.train(table_of(tmp_path, vectors), 16)
    assert index.settings["ann_dim"] == 16 and index.settings["pca_explained_variance"] == 1.0
    assert not isinstance(index.index, ann._faiss().IndexPreTransform)


def test_a_filter_limits_the_candidates_and_few_matches_are_all_scored(tmp_path, small_ann):
    vectors = clustered(3_000, 64)
    table = table_of(tmp_path, vectors)
    index = ann.train(table, 64)
    q = vectors[5]
    # Many matches: the vector index searches among them only.
    found = ann.nearest(table, q, 10, ["key", "id"], where="id % 2 = 1", vectors=index)
    assert found.num_rows and all(i % 2 == 1 for i in found.column(ann.ID_COLUMN).to_pylist())
    # Few matches (fewer than k x refine_factor): every one of them is a candidate.
    few = ann.nearest(table, q, 10, ["key", "id"], where="id < 30", vectors=index)
    assert sorted(few.column(ann.ID_COLUMN).to_pylist()) == list(range(30))
    none = ann.nearest(table, q, 10, ["key"], where="id < 0", vectors=index)
    assert none.num_rows == 0 and ann.exact_rerank(q, none, 10)[0].num_rows == 0


def test_rows_not_in_the_index_yet_are_candidates_and_catch_up_adds_them(tmp_path, small_ann):
    vectors = clustered(1_000, 64)
    table = table_of(tmp_path, vectors)
    index = ann.train(table, 64)
    # An interrupted build: rows written to the table, not yet to the vector index.
    late = clustered(50, 64, seed=3)
    table.add(table_of(tmp_path, late, first_id=1_000, name="late").to_arrow())
    found = ann.nearest(table, late[7], 10, ["key"], vectors=index)
    rows, sims = ann.exact_rerank(late[7], found, 1)
    assert rows.column("key").to_pylist() == ["k1007"] and sims[0] == pytest.approx(1.0)
    assert ann.catch_up(index, table) == (50, 0)
    assert index.ntotal == 1_050 and index.next_id() == 1_050
    assert ann.catch_up(index, table) == (0, 0)  # nothing left: reads only ids >= next_id


def test_catch_up_removes_the_rows_deleted_from_the_table(tmp_path, small_ann):
    vectors = clustered(1_000, 64)
    table = table_of(tmp_path, vectors)
    index = ann.train(table, 64)
    table.delete("id >= 100 AND id < 300")  # e.g. the rows of a run that was replaced
    assert ann.catch_up(index, table) == (0, 200)
    assert index.ntotal == 800 and sorted(index.ids()) == [*range(100), *range(300, 1_000)]
    assert not set(index.search(vectors[150], 50, nprobes=11)) & set(range(100, 300))


def test_saved_index_reopens_mapped_for_queries_and_whole_for_appends(tmp_path, small_ann):
    vectors = clustered(1_000, 64)
    table = table_of(tmp_path, vectors)
    index = ann.train(table, 64)
    directory = tmp_path / "ix"
    directory.mkdir()
    path = str(directory / ann.INDEX_FILE)
    atomic_write(path, index.to_bytes())  # as search.index saves it
    assert os.listdir(directory) == [ann.INDEX_FILE]  # no temporary file left behind
    mapped = ann.VectorIndex.load(path, index.settings)
    q = vectors[3]
    assert list(mapped.search(q, 10, 4)) == list(index.search(q, 10, 4))
    writable = ann.VectorIndex.load(path, index.settings, writable=True)
    writable.add(np.array([5_000]), q[None])
    assert writable.ntotal == 1_001 and writable.next_id() == 5_001
    copy = ann.VectorIndex.from_bytes(writable.to_bytes(), index.settings, "copy")
    assert copy.ntotal == 1_001
    with pytest.raises(ann.DamagedIndexError, match="copy is missing or damaged"):
        ann.VectorIndex.from_bytes(writable.to_bytes()[:500], index.settings, "copy")
    with pytest.raises(ann.DamagedIndexError, match="32-d, index.json says 64-d"):
        ann.VectorIndex.from_bytes(
            ann.train(table_of(tmp_path, clustered(600, 32)), 32).to_bytes(),
            index.settings,
            "other",
        )


def test_exact_rerank_orders_by_true_cosine():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 8)).astype(np.float32)
    query = vectors[3] * 2.5  # scale does not change cosine
    candidates = pa.table(
        {
            "key": [f"k{i}" for i in range(20)],
            ann.VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8),
        }
    )
    rows, sims = ann.exact_rerank(query, candidates, 5)
    expected = np.argsort(
        -(vectors @ query) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query)
    )[:5]
    assert rows.column("key").to_pylist() == [f"k{i}" for i in expected]
    assert sims[0] == pytest.approx(1.0, abs=1e-12)
    assert list(sims) == sorted(sims, reverse=True)
    assert ann.cosine(query, np.zeros((1, 8)))[0] == 0.0  # a zero vector scores 0, not NaN
