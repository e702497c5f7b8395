"""The recipes of docs/engines.md for the engines that install from PyPI: DuckDB,
LanceDB and embedding-reader (autofaiss's reader) read a real job output, bit-exactly.

One job run (tiny random models, generated images, a PCA basis) feeds every test here."""

import os

import duckdb
import embedding_reader
import lancedb
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from model.pca import fit_basis, load_basis, save_basis
from pipeline.main import run
from tests import corpus
from tests.jobs import PCA_RESULT_COLUMNS, job_args

NUM_IMAGES = 9
DIMS = 4
ENTITY = "n00001740"


@pytest.fixture(scope="module")
def job(models, tmp_path_factory):
    """(output directory, results table, basis) of one run with categories and a PCA basis."""
    root = tmp_path_factory.mktemp("engines")
    (root / "in").mkdir()
    for name, (ext, data) in corpus.photo_set(NUM_IMAGES).items():
        (root / "in" / f"{name}.{ext}").write_bytes(data)
    # Any 2048-d basis serves (the tiny embedder's width): fit on random vectors.
    vectors = np.random.default_rng(0).standard_normal((64, 2048))
    basis = save_basis(fit_basis([vectors], dims=DIMS), str(root / "basis.npz"))
    out = root / "out"
    args = job_args(
        root / "in" / "*", out, models, "--num_shards", "2", "--pca_basis", basis.source
    )
    run(args, save_main_session=False)
    files = sorted(str(p) for p in out.glob("results-*.parquet"))
    return out, pq.ParquetDataset(files).read(), basis


def matrix(table, column):
    values = table.column(column).combine_chunks()
    return values.flatten().to_numpy().reshape(len(values), -1)


def test_reduced_embeddings_follow_the_basis(job):
    out, table, basis = job
    assert table.num_rows == NUM_IMAGES
    assert table.schema.names == list(PCA_RESULT_COLUMNS)
    assert table.schema.field("embedding_reduced").type.list_size == DIMS
    np.testing.assert_allclose(
        matrix(table, "embedding_reduced"), basis.project(matrix(table, "embedding")), atol=1e-6
    )
    footer = pq.read_metadata(next(out.glob("results-*.parquet"))).metadata
    assert footer[b"pca_basis_sha256"].decode() == load_basis(basis.source).sha256
    assert (footer[b"pca_dims"], footer[b"pca_input_dim"]) == (b"4", b"2048")
    assert footer[b"pca_basis"].decode() == basis.source


def test_duckdb_reads_tags_categories_and_vectors(job):
    out, table, _ = job
    con = duckdb.connect()
    glob = f"{out}/results-*.parquet"
    # Keyword search on categories: every image rolls up to entity, once.
    (hits,) = con.execute(f"""SELECT count(DISTINCT key) FROM read_parquet('{glob}'),
                          UNNEST(categories) AS u(c) WHERE c.wnid = '{ENTITY}'""").fetchone()
    assert hits == NUM_IMAGES
    # Vectors: FLOAT[] comes back; cast to FLOAT[N] for the array distance functions.
    rows = con.execute(f"""SELECT key, embedding, embedding_reduced,
                              array_cosine_similarity(embedding_reduced::FLOAT[{DIMS}],
                                                      embedding_reduced::FLOAT[{DIMS}]) AS self
                       FROM read_parquet('{glob}') ORDER BY key""").fetchall()
    expected = dict(zip(table.column("key").to_pylist(), matrix(table, "embedding")))
    for key, embedding, reduced, self_similarity in rows:
        np.testing.assert_array_equal(np.asarray(embedding, np.float32), expected[key])
        assert self_similarity == pytest.approx(1.0, abs=1e-5) and len(reduced) == DIMS


def test_lancedb_takes_the_results_as_they_are(job, tmp_path):
    out, table, _ = job
    files = sorted(str(p) for p in out.glob("results-*.parquet"))  # not failures-*
    db = lancedb.connect(str(tmp_path / "lance"))
    tbl = db.create_table("images", ds.dataset(files))
    assert tbl.count_rows() == NUM_IMAGES
    assert tbl.schema.field("embedding").type == table.schema.field("embedding").type
    stored = tbl.to_arrow().sort_by("key")
    np.testing.assert_array_equal(
        matrix(stored, "embedding"), matrix(table.sort_by("key"), "embedding")
    )
    query = matrix(table, "embedding_reduced")[3]
    hits = (
        tbl.search(query, vector_column_name="embedding_reduced")
        .distance_type("cosine")
        .limit(3)
        .to_arrow()
    )
    assert hits.column("key")[0].as_py() == table.column("key")[3].as_py()
    assert hits.column("_distance")[0].as_py() == pytest.approx(0.0, abs=1e-5)


def test_embedding_reader_reads_bit_exactly(job, tmp_path):
    out, table, _ = job
    # It reads every *.parquet under a folder: give it the results files only.
    folder = tmp_path / "results"
    folder.mkdir()
    for path in out.glob("results-*.parquet"):
        os.symlink(path, folder / path.name)
    reader = embedding_reader.EmbeddingReader(
        str(folder), file_format="parquet", embedding_column="embedding", meta_columns=["key"]
    )
    assert reader.count == NUM_IMAGES and reader.dimension == 2048
    got = {}
    for embeddings, meta in reader(batch_size=4, start=0, end=reader.count):
        got.update(zip(meta["key"], embeddings))
    expected = dict(zip(table.column("key").to_pylist(), matrix(table, "embedding")))
    assert got.keys() == expected.keys()
    for key, vector in got.items():
        assert vector.dtype == np.float32
        np.testing.assert_array_equal(vector, expected[key])


def test_duckdb_exports_vertex_ai_json(job, tmp_path):
    """Vertex AI Vector Search ingests JSON records (id, embedding, restricts), not Parquet."""
    import json

    out, table, _ = job
    target = tmp_path / "vertex.json"
    duckdb.connect().execute(f"""
        COPY (SELECT key AS id, embedding_reduced AS embedding,
                     [{{'namespace': 'category',
                        'allow': list_transform(categories, lambda c: c.wnid)}}] AS restricts
              FROM read_parquet('{out}/results-*.parquet'))
        TO '{target}' (FORMAT json)""")
    records = [json.loads(line) for line in target.read_text().splitlines()]
    expected = dict(zip(table.column("key").to_pylist(), matrix(table, "embedding_reduced")))
    categories = dict(zip(table.column("key").to_pylist(), table.column("categories").to_pylist()))
    assert len(records) == NUM_IMAGES
    for record in records:
        np.testing.assert_array_equal(np.float32(record["embedding"]), expected[record["id"]])
        assert record["restricts"] == [
            {"namespace": "category", "allow": [c["wnid"] for c in categories[record["id"]]]}
        ]


def test_search_finds_wordnet_categories_and_reduced_vectors(job, tmp_path, capsys):
    """`./run.sh index` + `search` on a default run: WordNet hypernyms match, vectors reduced."""
    import json

    from search.cli import main as search_main

    out, table, _ = job
    index_dir = str(tmp_path / "ix")
    assert search_main(["index", str(out), "--index_dir", index_dir]) == 0
    capsys.readouterr()
    # `entity` is above every class: every image is in it, with its top score.
    assert search_main(["search", index_dir, "--tag", "entity", "--k", "50", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert sorted(h["key"] for h in hits) == sorted(table.column("key").to_pylist())
    top = {r["key"]: r["tags"][0]["score"] for r in table.select(["key", "tags"]).to_pylist()}
    assert all(h["score"] == pytest.approx(top[h["key"]]) for h in hits)
    # The index holds embedding_reduced; an image's own row is its nearest neighbour.
    key = table.column("key")[0].as_py()
    assert search_main(["search", index_dir, "--key", key, "--k", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
