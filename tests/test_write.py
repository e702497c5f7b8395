"""Tests of transforms/write.py: record batches, top-k, Beam writers (the schemas themselves:
tests/test_schema.py)."""

import glob
import os
from types import SimpleNamespace

import apache_beam as beam
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline

from core.schema import failures_schema, results_schema
from tests.jobs import PCA_RESULT_COLUMNS
from transforms.records import STAGE_DECODE, STAGE_READ, Failure
from transforms.write import BatchFailures, WriteParquet, failures_batch, results_batch, top_k

K = 50  # classes of the toy label set
D = 16  # embedding size
META = {
    "tags_model": "gs://bit_models/BiT-M-R50x1.npz",
    "tags_model_sha256": "ab" * 32,
    "image_size": "224",
    "preprocessing": "bilinear resize, uint8 -> [-1, 1]",
    "label_set": "imagenet21k-test-v1",
}


@pytest.fixture(scope="module")
def labels():
    return SimpleNamespace(
        wnids=np.array([f"n{i:08d}" for i in range(K)]),
        labels=np.array([f"label {i}" for i in range(K)]),
    )


def make_batch(labels, schema, n=4, k=5, seed=0, min_score=0.0, start=0, all_scores=False):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, K), dtype=np.float32)
    idx, top = top_k(scores, k)
    emb = rng.standard_normal((n, D)).astype(np.float32)
    batch = results_batch(
        [f"img-{start + i}" for i in range(n)],
        [f"file:///x/{start + i}.jpg" for i in range(n)],
        np.arange(n) + 100,
        np.arange(n) + 200,
        idx,
        top,
        labels,
        emb,
        schema,
        min_score=min_score,
        all_scores=scores if all_scores else None,
    )
    return batch, scores, emb


# ----------------------------------------------------------------------------------------- top-k


def naive_top_k(scores, k):
    out = []
    for row in scores:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        out.append(order)
    idx = np.array(out, dtype=np.int64).reshape(len(scores), -1)
    return idx, np.take_along_axis(scores, idx, axis=1)


@pytest.mark.parametrize("k", [1, 5, 10, K - 1, K, K + 3])
def test_top_k_matches_naive_sort(k):
    rng = np.random.default_rng(k)
    scores = rng.random((7, K), dtype=np.float32)
    # Heavy ties: few distinct values, so ties straddle the k-th place.
    scores[3:] = np.round(scores[3:] * 4) / 4
    scores[5] = 0.5
    idx, top = top_k(scores, k)
    ref_idx, ref_top = naive_top_k(scores, k)
    assert idx.dtype == np.int32 and top.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(top, ref_top)


def test_top_k_nan_and_edges():
    scores = np.array([[0.1, np.nan, 0.9, 0.5]], np.float32)
    idx, top = top_k(scores, 3)
    np.testing.assert_array_equal(idx, [[2, 3, 0]])
    assert top_k(scores, 0)[0].shape == (1, 0)
    assert top_k(np.zeros((0, 4), np.float32), 2)[0].shape == (0, 2)


# --------------------------------------------------------------------------------- record batches


def test_results_batch_content(labels):
    schema = results_schema(D, metadata=META)
    batch, scores, emb = make_batch(labels, schema, n=6, k=5)
    assert batch.schema.equals(schema, check_metadata=True)
    batch.validate(full=True)
    rows = batch.to_pylist()
    for i, row in enumerate(rows):
        assert row["key"] == f"img-{i}" and row["width"] == 100 + i and row["height"] == 200 + i
        ref_idx, _ = naive_top_k(scores[i : i + 1], 5)
        assert [t["index"] for t in row["tags"]] == ref_idx[0].tolist()
        got = [t["score"] for t in row["tags"]]
        assert got == sorted(got, reverse=True)
        for t in row["tags"]:
            assert t["wnid"] == labels.wnids[t["index"]] and t["label"] == labels.labels[t["index"]]
            assert t["score"] == scores[i, t["index"]]
    np.testing.assert_array_equal(batch.column("embedding").values.to_numpy().reshape(-1, D), emb)


def test_min_score_drops_tags(labels):
    schema = results_schema(D)
    idx = np.array([[3, 1, 2], [4, 5, 6], [7, 8, 9]])
    top = np.array([[0.9, 0.5, 0.1], [0.2, 0.1, 0.05], [0.8, 0.7, 0.6]], np.float32)
    emb = np.zeros((3, D), np.float32)
    batch = results_batch(
        ["a", "b", "c"], ["s"] * 3, [1] * 3, [1] * 3, idx, top, labels, emb, schema, min_score=0.5
    )
    tags = batch.column("tags").to_pylist()
    assert [[t["index"] for t in r] for r in tags] == [[3, 1], [], [7, 8, 9]]
    assert batch.column("tags").null_count == 0  # empty lists, not nulls


def test_unsorted_tags_are_sorted(labels):
    schema = results_schema(D)
    idx = np.array([[1, 9, 4, 2]])
    top = np.array([[0.1, 0.8, 0.8, 0.9]], np.float32)
    batch = results_batch(
        ["a"], ["s"], [1], [1], idx, top, labels, np.zeros((1, D), np.float32), schema
    )
    tags = batch.column("tags").to_pylist()[0]
    assert [t["index"] for t in tags] == [2, 4, 9, 1]
    assert [t["wnid"] for t in tags] == [labels.wnids[i] for i in (2, 4, 9, 1)]


def test_float16_embeddings_and_all_scores(labels):
    schema = results_schema(D, "float16", write_all_scores=True, num_classes=K)
    batch, scores, emb = make_batch(labels, schema, n=3, all_scores=True)
    assert batch.schema.equals(schema)
    np.testing.assert_array_equal(
        batch.column("embedding").values.to_numpy().reshape(-1, D), emb.astype(np.float16)
    )
    np.testing.assert_array_equal(
        batch.column("scores").values.to_numpy().reshape(-1, K), scores.astype(np.float16)
    )
    with pytest.raises(ValueError, match="all_scores"):
        make_batch(labels, schema, n=3, all_scores=False)


def test_results_batch_rejects_bad_shapes(labels):
    schema = results_schema(D)
    idx, top = top_k(np.random.default_rng(0).random((2, K), dtype=np.float32), 3)
    with pytest.raises(ValueError, match="embeddings"):
        results_batch(
            ["a", "b"],
            ["s", "s"],
            [1, 1],
            [1, 1],
            idx,
            top,
            labels,
            np.zeros((2, D + 1), np.float32),
            schema,
        )
    with pytest.raises(ValueError, match="range"):
        results_batch(
            ["a", "b"],
            ["s", "s"],
            [1, 1],
            [1, 1],
            idx + K,
            top,
            labels,
            np.zeros((2, D), np.float32),
            schema,
        )


def test_failures_batch():
    fs = [
        Failure("k1", "file:///a", STAGE_READ, "OSError: gone"),
        Failure("k2", "file:///b", STAGE_DECODE, "DecompressionBombError: too many pixels"),
    ]
    batch = failures_batch(fs)
    assert batch.schema.equals(failures_schema())
    assert batch.to_pylist()[1] == fs[1]._asdict()
    assert failures_batch([]).num_rows == 0


# ------------------------------------------------------------------------------------ Beam writers


def read_all(out, kind):
    files = sorted(glob.glob(os.path.join(out, f"{kind}-*.parquet")))
    return files, [pq.read_table(f) for f in files]


@pytest.mark.parametrize("num_shards", [0, 2])
def test_write_results_and_failures_pipeline(tmp_path, labels, num_shards):
    out = str(tmp_path)
    schema = results_schema(D, metadata=META)
    batches = [make_batch(labels, schema, n=5, seed=s, start=5 * s)[0] for s in range(4)]
    failures = [
        Failure(f"bad-{i}", f"file:///bad/{i}", STAGE_DECODE, "ValueError: x") for i in range(7)
    ]
    with test_pipeline.TestPipeline() as p:
        _ = (
            p
            | "Results" >> beam.Create(batches)
            | "WriteResults" >> WriteParquet(out, "results", schema, num_shards=num_shards)
        )
        _ = (
            p
            | "Failures" >> beam.Create(failures)
            | BatchFailures()
            | "WriteFailures"
            >> WriteParquet(out, "failures", failures_schema(), num_shards=num_shards)
        )

    files, tables = read_all(out, "results")
    if num_shards:
        assert [os.path.basename(f) for f in files] == [
            "results-00000-of-00002.parquet",
            "results-00001-of-00002.parquet",
        ]
    else:
        assert files and all(f.endswith(f"-of-{len(files):05d}.parquet") for f in files)
    # No temporary files or directories left behind.
    assert sorted(os.listdir(out)) == sorted(
        os.path.basename(f) for f in files + read_all(out, "failures")[0]
    )
    for f in files:
        assert pq.read_schema(f).equals(schema, check_metadata=True)
        footer = {k.decode(): v.decode() for k, v in pq.read_metadata(f).metadata.items()}
        assert {k: footer[k] for k in META} == META
        assert dictionary_encoded(f) in (
            {"source", "tags.list.element.wnid", "tags.list.element.label"},
            None,  # a file without rows
        )
    table = pa.concat_tables(tables).sort_by("key")
    expected = pa.Table.from_batches(batches).sort_by("key")
    assert table.equals(expected)

    ffiles, ftables = read_all(out, "failures")
    if num_shards:
        assert len(ffiles) == 2
    failed = pa.concat_tables(ftables)
    assert sorted(failed.column("key").to_pylist()) == sorted(f.key for f in failures)
    assert failed.schema.equals(failures_schema())
    assert {dictionary_encoded(f) for f in ffiles} - {None} == {
        frozenset({"source", "stage", "error"})
    }


def dictionary_encoded(path) -> set:
    """Parquet columns of the first row group with a dictionary page (None: no rows)."""
    metadata = pq.read_metadata(path)
    if not metadata.num_row_groups:
        return None
    group = metadata.row_group(0)
    return frozenset(
        group.column(i).path_in_schema
        for i in range(group.num_columns)
        if group.column(i).has_dictionary_page
    )


@pytest.mark.parametrize("num_shards", [0, 2])
def test_empty_input_writes_valid_files(tmp_path, num_shards):
    """No rows still gives max(1, num_shards) readable files with the schema and footer metadata."""
    out = str(tmp_path)
    schema = results_schema(D, metadata=META)
    with test_pipeline.TestPipeline() as p:
        _ = (
            p
            | "NoResults" >> beam.Create([]).with_output_types(pa.RecordBatch)
            | "WriteResults" >> WriteParquet(out, "results", schema, num_shards)
        )
        _ = (
            p
            | "NoFailures" >> beam.Create([]).with_output_types(Failure)
            | BatchFailures()
            | "WriteFailures" >> WriteParquet(out, "failures", failures_schema(), num_shards)
        )
    n = max(1, num_shards)
    assert sorted(os.listdir(out)) == sorted(
        f"{kind}-{i:05d}-of-{n:05d}.parquet" for kind in ("results", "failures") for i in range(n)
    )
    for path in glob.glob(os.path.join(out, "results-*")):
        assert pq.read_schema(path).equals(schema, check_metadata=True)
        assert pq.read_metadata(path).num_rows == 0
        assert pq.read_table(path).num_rows == 0
    for path in glob.glob(os.path.join(out, "failures-*")):
        assert pq.read_table(path).schema.equals(failures_schema())


def test_row_groups_are_merged(tmp_path, labels):
    """Many small inference batches become few row groups, bounded by row_group_bytes."""
    out = str(tmp_path)
    schema = results_schema(D)
    batches = [make_batch(labels, schema, n=4, seed=s, start=4 * s)[0] for s in range(50)]
    per_row = sum(b.nbytes for b in batches) / 200
    with test_pipeline.TestPipeline() as p:
        _ = (
            p
            | beam.Create(batches)
            | WriteParquet(out, "results", schema, num_shards=1, row_group_bytes=int(per_row * 64))
        )
    md = pq.read_metadata(os.path.join(out, "results-00000-of-00001.parquet"))
    assert md.num_rows == 200
    assert md.num_row_groups < 50 / 4


def test_readers_pyarrow_pandas_duckdb(tmp_path, labels):
    """The snippets docs/output-schema.md shows: pyarrow, pandas and DuckDB all read the output."""
    out = str(tmp_path)
    schema = results_schema(D, metadata=META)
    batches = [
        make_batch(labels, schema, n=5, seed=s, start=5 * s, min_score=0.5)[0] for s in range(2)
    ]
    with test_pipeline.TestPipeline() as p:
        _ = p | beam.Create(batches) | WriteParquet(out, "results", schema, num_shards=2)
    pattern = os.path.join(out, "results-*.parquet")

    # pyarrow
    import pyarrow.dataset as ds

    table = ds.dataset(pattern.rsplit("/", 1)[0], format="parquet").to_table()
    assert table.num_rows == 10

    # pandas
    import pandas as pd

    df = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(pattern))], ignore_index=True)
    assert len(df) == 10
    first = df.sort_values("key").iloc[0]
    assert first["embedding"].shape == (D,)
    assert all(t["score"] >= 0.5 for t in first["tags"])

    # DuckDB
    con = duckdb.connect()
    (n,) = con.execute(f"SELECT count(*) FROM read_parquet('{pattern}')").fetchone()
    assert n == 10
    rows = con.execute(
        f"SELECT key, t.wnid, t.label, t.score FROM read_parquet('{pattern}'), "
        f"UNNEST(tags) AS u(t) ORDER BY key, t.score DESC"
    ).fetchall()
    expected = [
        (r["key"], t["wnid"], t["label"], t["score"])
        for b in batches
        for r in b.to_pylist()
        for t in r["tags"]
    ]
    assert sorted(rows) == sorted(expected)
    (dim,) = con.execute(f"SELECT len(embedding) FROM read_parquet('{pattern}') LIMIT 1").fetchone()
    assert dim == D


# ------------------------------------------------------------------ categories, reduced embeddings


def toy_hierarchy(labels):
    """root <- even / odd <- class i (by parity); class 0 is also under "odd" (two parents)."""
    from model.wordnet import Hierarchy

    wnids = ["n99999990", "n99999991", "n99999992"] + list(labels.wnids)
    names = ["root", "even", "odd"] + list(labels.labels)
    parents = [[], [0], [0]] + [[1 + i % 2] + ([2] if i == 0 else []) for i in range(K)]
    depths = [0, 1, 1] + [2] * K
    return Hierarchy(wnids, names, depths, parents, list(labels.wnids))


def test_categories_and_reduced_columns(labels):
    schema = results_schema(D, categories=True, reduced_dim=3, write_all_scores=True, num_classes=K)
    assert schema.names == [*PCA_RESULT_COLUMNS, "scores"]
    assert schema.field("categories").type == pa.list_(
        pa.field(
            "element",
            pa.struct([("wnid", pa.string()), ("label", pa.string()), ("score", pa.float32())]),
        )
    )
    assert schema.field("embedding_reduced").type == pa.list_(pa.field("element", pa.float32()), 3)
    idx = np.array([[4, 0, 7], [3, 5, 9]])
    top = np.array([[0.9, 0.6, 0.1], [0.2, 0.1, 0.05]], np.float32)
    reduced = np.arange(6, dtype=np.float32).reshape(2, 3)
    batch = results_batch(
        ["a", "b"],
        ["s"] * 2,
        [1] * 2,
        [1] * 2,
        idx,
        top,
        labels,
        np.zeros((2, D), np.float32),
        schema,
        min_score=0.5,
        all_scores=np.zeros((2, K), np.float32),
        hierarchy=toy_hierarchy(labels),
        embeddings_reduced=reduced,
    )
    batch.validate(full=True)
    cats = [
        [(c["label"], c["score"]) for c in row] for row in batch.column("categories").to_pylist()
    ]
    # Row a keeps tags 4 (0.9) and 0 (0.6; under even and odd); tag 7 is below min_score.
    assert cats[0] == [
        ("label 4", pytest.approx(0.9)),
        ("even", pytest.approx(0.9)),
        ("root", pytest.approx(0.9)),
        ("label 0", pytest.approx(0.6)),
        ("odd", pytest.approx(0.6)),
    ]
    assert cats[1] == []  # no kept tag, no category
    np.testing.assert_array_equal(
        batch.column("embedding_reduced").values.to_numpy().reshape(2, 3), reduced
    )


def test_categories_min_depth_and_missing_inputs(labels):
    schema = results_schema(D, categories=True)
    args = (
        ["a"],
        ["s"],
        [1],
        [1],
        np.array([[1]]),
        np.array([[0.5]], np.float32),
        labels,
        np.zeros((1, D), np.float32),
        schema,
    )
    batch = results_batch(*args, hierarchy=toy_hierarchy(labels), categories_min_depth=1)
    assert [c["label"] for c in batch.column("categories")[0].as_py()] == ["label 1", "odd"]
    with pytest.raises(ValueError, match="hierarchy"):
        results_batch(*args)
    with pytest.raises(ValueError, match="embedding_reduced"):
        results_batch(
            *args, hierarchy=toy_hierarchy(labels), embeddings_reduced=np.zeros((1, 3), np.float32)
        )
    with pytest.raises(ValueError, match="reduced_dim"):
        results_schema(D, reduced_dim=0)


def test_results_batch_needs_no_pandas():
    """The runtime lock has no pandas (the test lock does): building rows must not import it."""
    import subprocess
    import sys

    code = """
import sys


class NoPandas:  # any `import pandas` fails, as in the runtime environment
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pandas":
            raise ModuleNotFoundError("No module named 'pandas'")


sys.meta_path.insert(0, NoPandas())
from types import SimpleNamespace
import numpy as np
from core.schema import results_schema
from transforms.write import results_batch
labels = SimpleNamespace(wnids=np.array(["n0", "n1"]), labels=np.array(["a", "b"]))
for dtype in ("float32", "float16"):
    batch = results_batch(["k"], ["s"], [1], [1], np.array([[1, 0]]),
                          np.array([[0.9, 0.1]], np.float32), labels, np.ones((1, 4), np.float32),
                          results_schema(4, embedding_dtype=dtype))
    assert batch.num_rows == 1
"""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
