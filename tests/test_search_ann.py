"""`search.ann`: vector-index settings and the exact re-rank (the IVF-PQ path itself is exercised
through `build_index` in tests/test_search_index.py)."""

import numpy as np
import pyarrow as pa
import pytest

from search import ann


@pytest.mark.parametrize(
    "rows, partitions", [(300, 1), (2_000, 7), (50_000, 195), (1_000_000, 1000)]
)
def test_partitions_follow_sqrt_rows_with_at_least_256_rows_each(rows, partitions):
    assert ann.num_partitions(rows) == partitions
    assert rows // ann.num_partitions(rows) >= ann.MIN_ROWS_PER_PARTITION


def test_sub_vectors_are_16_dims_each_and_divide_the_dimension():
    assert ann.num_sub_vectors(6144) == 384
    assert ann.num_sub_vectors(2048) == 128
    assert ann.num_sub_vectors(100) == 5  # 100 / 16 = 6.25: the largest divisor below, 5
    assert ann.num_sub_vectors(8) == 1


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
