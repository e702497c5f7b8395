"""`search.index`: an index built from a real job output holds its rows as written; runs append;
runs with another model, basis or preprocessing are refused; gs:// outputs are read from the GCS
emulator into a local index; the vector index is trained and kept up to date on append; tag
filters use the label-list index and tag queries rank by the packed `category_keys`."""

import json
import logging
import os
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from core.claim import claim
from search import SearchError, ann, query
from search import index as search_index
from search.index import build_index, default_index_dir, open_index, read_meta
from tests import search_outputs as so
from tests.mounts import read_only


def test_index_holds_every_result_row_with_its_embedding(job_output, tmp_path, caplog):
    output, _ = job_output
    with caplog.at_level(logging.INFO, logger="search.index"):
        report = build_index(output, str(tmp_path / "ix"), log_every_secs=1e-9)
    assert any("indexing: 1/1 files, 8 images read" in r.getMessage() for r in caplog.records)
    written = so.results(output)
    index = open_index(str(tmp_path / "ix"))
    rows = index.images.to_arrow().sort_by("key")
    assert report["rows_added"] == report["rows"] == written.num_rows == rows.num_rows
    assert rows.column("key").to_pylist() == written.column("key").to_pylist()
    assert rows.column("source").to_pylist() == written.column("source").to_pylist()
    np.testing.assert_array_equal(
        np.stack(rows.column("vector").to_pylist()),
        np.stack(written.column("embedding").to_pylist()),
    )
    # Without a categories column, the tags are what a tag query matches.
    first = written.column("tags")[0].as_py()
    assert rows.column("wnids")[0].as_py() == [t["wnid"] for t in first]
    assert rows.column("tags")[0].as_py() == [t["label"].split(",")[0] for t in first[:3]]
    meta = read_meta(str(tmp_path / "ix"))
    footer = so.footer(output)
    assert meta["settings"]["embed_model_sha256"] == footer["embed_model_sha256"]
    assert meta["settings"]["resize"] == footer["resize"] == "squash"
    assert meta["settings"]["tag_column"] == "tags"
    assert meta["bytes_per_image"] == report["bytes_per_image"] > 0
    assert meta["runs"][0]["output"] == output and meta["runs"][0]["seconds"] > 0


def test_default_index_dir_is_next_to_a_local_output_and_local_for_gcs(tmp_path, monkeypatch):
    monkeypatch.setenv("BIT_CACHE_DIR", str(tmp_path))
    assert default_index_dir("/data/out/") == "/data/out/index"
    assert default_index_dir("gs://b/tags/2024") == str(
        tmp_path / "index" / "gs" / "b" / "tags" / "2024"
    )


def test_runs_append_and_reindexing_adds_nothing(job_output, tmp_path):
    output, _ = job_output
    second = so.retag(output, str(tmp_path / "second"), key_prefix="night2/")
    index_dir = str(tmp_path / "ix")
    build_index(output, index_dir)
    report = build_index(second, index_dir)
    assert report["rows_added"] == so.NUM_PHOTOS and report["rows"] == 2 * so.NUM_PHOTOS
    again = build_index(second, index_dir)
    assert again["rows_added"] == 0 and again["rows"] == 2 * so.NUM_PHOTOS
    meta = read_meta(index_dir)
    assert [r["output"] for r in meta["runs"]] == [output, second, second]
    assert [r["tag_column"] for r in meta["runs"]] == ["tags", "categories", "categories"]
    index = open_index(index_dir)
    assert index.images.count_rows("key LIKE 'night2/%'") == so.NUM_PHOTOS
    # The appended run's categories are searchable: its hypernyms joined the vocabulary.
    assert [w for w, _ in query.resolve_tag(index, "domestic cat")] == [so.CAT[0]]


@pytest.mark.parametrize(
    "key, value",
    [("embed_model_sha256", "f" * 64), ("pca_basis_sha256", "e" * 64), ("image_size", "224")],
)
def test_a_run_with_other_vectors_is_refused(job_output, tmp_path, key, value):
    output, _ = job_output
    index_dir = str(tmp_path / "ix")
    build_index(output, index_dir)
    other = so.retag(output, str(tmp_path / "other"), key_prefix="x/", metadata={key: value})
    with pytest.raises(SearchError, match=f"not comparable: {key} '{value}'"):
        build_index(other, index_dir)
    assert open_index(index_dir).images.count_rows() == so.NUM_PHOTOS


def test_missing_results_are_a_clear_error(tmp_path):
    with pytest.raises(SearchError, match="no results-\\*.parquet in"):
        build_index(str(tmp_path), str(tmp_path / "ix"))
    with pytest.raises(SearchError, match="no index at"):
        open_index(str(tmp_path))


def test_gcs_output_is_indexed_locally_and_searched(
    job_output, gcs_emulator, tmp_path, monkeypatch
):
    monkeypatch.setenv("BIT_CACHE_DIR", str(tmp_path / "cache"))
    output, _ = job_output
    local = pathlib.Path(so.retag(output, str(tmp_path / "tagged")))
    bucket = gcs_emulator.new_bucket()
    gcs_output = f"gs://{bucket}/tags/run1"
    for f in [*local.glob("results-*.parquet"), local / "summary.json"]:
        gcs_emulator.upload(f"{gcs_output}/{f.name}", f.read_bytes())
    report = build_index(gcs_output)
    expected_dir = tmp_path / "cache" / "index" / "gs" / bucket / "tags" / "run1"
    assert report["index_dir"] == str(expected_dir)
    assert report["rows"] == so.NUM_PHOTOS
    index = open_index(gcs_output)  # the OUTPUT finds its default index
    hits = query.by_tag(index, [so.DOG[0]], k=2)
    assert [h.wnid for h in hits] == [so.DOG[0]] * 2
    photo = (local / "results-00000-of-00001.parquet").read_bytes()[:100]
    gcs_emulator.upload(f"gs://{bucket}/query.bin", photo)
    assert query.read_image(f"gs://{bucket}/query.bin") == photo  # --image reads gs:// too
    with pytest.raises(SearchError, match="LanceDB cannot use the GCS emulator"):
        build_index(gcs_output, f"gs://{bucket}/index")


def test_vector_index_is_trained_then_appended_to_until_the_index_doubles(tmp_path, monkeypatch):
    monkeypatch.setattr(ann, "ANN_DIMS", 8)  # the PCA path, at test size: 32-d -> 8-d
    vectors = so.clustered(600, 32)
    index_dir = str(tmp_path / "ix")
    report = build_index(
        so.synthetic_output(str(tmp_path / "a"), vectors), index_dir, ann_min_rows=500
    )
    assert report["vector_index"] == ann.INDEX_TYPE and report["vector_index_trained"]
    meta = read_meta(index_dir)
    trained = meta["vector_index"]
    assert trained["num_partitions"] == ann.num_partitions(600) == 2
    assert trained["trained_rows"] == 600 and (trained["dim"], trained["ann_dim"]) == (32, 8)
    assert meta["next_id"] == 600 and meta["optimized_rows"] == 600
    index = open_index(index_dir)
    assert index.vectors.ntotal == 600
    # Exact re-ranking: each stored vector finds itself first with cosine 1, and the rest of the
    # top 10 is (nearly) the exact top 10.
    recall = []
    for i in range(0, 600, 60):
        hits = query.by_vector(index, vectors[i], k=10)
        assert hits[0].key == f"s{i}" and hits[0].score == pytest.approx(1.0, abs=1e-6)
        exact = np.argsort(-ann.cosine(vectors[i], vectors))[:10]
        recall.append(len({h.key for h in hits} & {f"s{j}" for j in exact}) / 10)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert np.mean(recall) >= 0.9
    # An append below twice the trained size goes into the existing vector index: no training,
    # no compaction of the table; the new rows get the next ids.
    more = so.clustered(100, 32, seed=5)
    report = build_index(
        so.synthetic_output(str(tmp_path / "b"), more, prefix="t"), index_dir, ann_min_rows=500
    )
    assert report["rows"] == 700 and not report["vector_index_trained"]
    meta = read_meta(index_dir)
    assert meta["vector_index"] == trained and meta["optimized_rows"] == 600
    assert meta["next_id"] == 700
    index = open_index(index_dir)
    assert index.vectors.ntotal == 700 and index.vectors.next_id() == 700
    ids = index.images.search().where("key = 't7'").select(["id"]).to_arrow()
    assert ids.column("id").to_pylist() == [607]
    assert query.by_vector(index, more[7], k=10)[0].key == "t7"
    # Past twice the trained size: trained again on all rows, and the table compacted.
    report = build_index(
        so.synthetic_output(str(tmp_path / "c"), so.clustered(500, 32, seed=6), prefix="u"),
        index_dir,
        ann_min_rows=500,
    )
    assert report["rows"] == 1_200 and report["vector_index_trained"]
    meta = read_meta(index_dir)
    assert meta["vector_index"]["trained_rows"] == 1_200 and meta["optimized_rows"] == 1_200
    assert open_index(index_dir).vectors.ntotal == 1_200
    assert query.by_key(open_index(index_dir), "t7", k=1)[0].score > 0.5


def test_an_interrupted_append_is_searched_and_the_next_build_catches_up(tmp_path, monkeypatch):
    index_dir = str(tmp_path / "ix")
    build_index(
        so.synthetic_output(str(tmp_path / "a"), so.clustered(600, 32)), index_dir, ann_min_rows=500
    )
    more = so.clustered(50, 32, seed=5)
    second = so.synthetic_output(str(tmp_path / "b"), more, prefix="t")

    def killed(vectors, index_dir):
        raise KeyboardInterrupt

    # Killed after the rows were written, before the vector index and index.json were.
    with monkeypatch.context() as m:
        m.setattr(search_index, "_save_vectors", killed)
        with pytest.raises(KeyboardInterrupt):
            build_index(second, index_dir, ann_min_rows=500)
    index = open_index(index_dir)
    assert index.images.count_rows() == 650 and index.vectors.ntotal == 600
    assert query.by_vector(index, more[3], k=5)[0].key == "t3"  # found all the same
    report = build_index(second, index_dir, ann_min_rows=500)  # the user runs it again
    assert report["rows_added"] == 0 and report["rows"] == 650
    index = open_index(index_dir)
    assert index.vectors.ntotal == 650
    ids = index.images.search().select(["id"]).limit(None).to_arrow().column("id").to_pylist()
    assert len(set(ids)) == 650  # no id given twice
    third = build_index(
        so.synthetic_output(str(tmp_path / "c"), so.clustered(10, 32, seed=6), prefix="u"),
        index_dir,
        ann_min_rows=500,
    )
    assert third["rows_added"] == 10
    ids = open_index(index_dir).images.search().select(["id"]).limit(None).to_arrow()
    assert len(set(ids.column("id").to_pylist())) == 660


def test_a_damaged_vector_index_is_a_clear_error_and_the_next_build_trains_it_again(tmp_path):
    vectors = so.clustered(600, 32)
    output = so.synthetic_output(str(tmp_path / "a"), vectors)
    index_dir = tmp_path / "ix"
    build_index(output, str(index_dir), ann_min_rows=500)
    path = index_dir / ann.INDEX_FILE
    for damage in (lambda: path.write_bytes(path.read_bytes()[:1000]), path.unlink):
        damage()
        with pytest.raises(SearchError, match="vectors.faiss is missing or damaged .*index again"):
            query.by_vector(open_index(str(index_dir)), vectors[0])
        report = build_index(output, str(index_dir), ann_min_rows=500)  # nothing new to add
        assert report["rows_added"] == 0 and report["vector_index_trained"]
        assert query.by_vector(open_index(str(index_dir)), vectors[9])[0].key == "s9"


def test_an_index_from_before_row_ids_is_searched_but_not_appended_to(tmp_path):
    """What `./run.sh index` wrote before `vectors.faiss`: no `id` column, LanceDB's IVF-PQ."""
    import lancedb
    import lancedb.index

    vectors = so.clustered(600, 32)
    output = so.synthetic_output(str(tmp_path / "a"), vectors)
    index_dir = tmp_path / "ix"
    build_index(output, str(index_dir), ann_min_rows=500)
    db = lancedb.connect(str(index_dir))
    new_answer = query.by_tag(open_index(str(index_dir)), [so.GOLDEN[0]], k=5)
    old = db.open_table("images").to_arrow()
    old = old.drop_columns(["id", "source_offset", "source_length", "category_keys"])
    element_list = pa.list_(pa.field("element", pa.string()))  # the wnids list as it was
    old = old.set_column(
        old.schema.get_field_index("wnids"), "wnids", old.column("wnids").cast(element_list)
    )
    table = db.create_table("images", old, mode="overwrite")
    table.create_index("wnids", config=lancedb.index.LabelList())
    table.create_index(
        "vector",
        config=lancedb.index.IvfPq(distance_type="cosine", num_partitions=2, num_sub_vectors=2),
    )
    (index_dir / ann.INDEX_FILE).unlink()
    meta = json.loads((index_dir / "index.json").read_text())
    meta["vector_index"] = {"type": "ivf_pq", "num_partitions": 2, "trained_rows": 600}
    for key in ("next_id", "optimized_rows"):
        del meta[key]
    (index_dir / "index.json").write_text(json.dumps(meta))

    index = open_index(str(index_dir))
    assert index.vectors is None  # LanceDB's own index answers
    hits = query.by_vector(index, vectors[42], k=10)
    assert hits[0].key == "s42" and hits[0].score == pytest.approx(1.0, abs=1e-6)
    assert query.by_key(index, "s42", k=3)[0].key != "s42"
    assert query.by_tag(index, [so.GOLDEN[0]], k=5) == new_answer  # ranked from `categories`
    more = so.synthetic_output(str(tmp_path / "b"), so.clustered(10, 32, seed=5), prefix="t")
    with pytest.raises(SearchError, match="earlier version.*Rebuild it.*" + output):
        build_index(more, str(index_dir))
    assert open_index(str(index_dir)).images.count_rows() == 600


def test_float16_embeddings_are_stored_as_float16(tmp_path):
    vectors = so.clustered(20, 8).astype(np.float16)
    output = so.synthetic_output(str(tmp_path / "a"), vectors, embedding_dtype="float16")
    build_index(output, str(tmp_path / "ix"))
    index = open_index(str(tmp_path / "ix"))
    assert index.images.schema.field("vector").type.value_type == pa.float16()
    hits = query.by_vector(index, vectors[4].astype(np.float32), k=3)
    assert hits[0].key == "s4" and hits[0].score == pytest.approx(1.0, abs=1e-12)
    # A float32 run appended to it is stored the index's way.
    more = so.synthetic_output(str(tmp_path / "b"), so.clustered(5, 8, seed=3), prefix="t")
    assert build_index(more, str(tmp_path / "ix"))["rows_added"] == 5


def test_categories_and_tags_merge_like_the_row_by_row_rule():
    """Per row: every wnid once, with its best score (categories win ties, being first), best
    first, ties in the order the wnids first appear; a missing list counts as empty."""

    def reference(tag_rows, category_rows):
        merged = []
        for tags, cats in zip(tag_rows, category_rows):
            best = {}
            for item in (cats or []) + (tags or []):
                score = float(np.float32(item["score"]))
                if item["wnid"] not in best or score > best[item["wnid"]][0]:
                    best[item["wnid"]] = (score, item["label"])
            merged.append(
                [
                    {"wnid": w, "label": lab, "score": s}
                    for w, (s, lab) in sorted(best.items(), key=lambda kv: -kv[1][0])
                ]
            )
        return merged

    rng = np.random.default_rng(0)

    def items(kind, with_index):
        out = []
        for _ in range(rng.integers(0, 5)):
            w = f"n{rng.integers(0, 6)}"
            item = {"wnid": w, "label": f"{w}-{kind}", "score": float(rng.choice([0.1, 0.5, 0.9]))}
            out.append({"index": 0, **item} if with_index else item)
        return None if rng.random() < 0.1 else out

    for _ in range(100):
        n = int(rng.integers(0, 7))
        tags = [items("t", True) for _ in range(n)]
        cats = [items("c", False) for _ in range(n)]
        batch = pa.record_batch(
            {
                "tags": pa.array(tags, so._list(so.tag_type())),
                "categories": pa.array(cats, so._list(so.CATEGORY_TYPE)),
            }
        )
        if n > 1:
            batch, tags, cats = batch.slice(1), tags[1:], cats[1:]
        got = [
            [{**c, "score": float(np.float32(c["score"]))} for c in row]
            for row in search_index._categories(batch).to_pylist()
        ]
        assert got == reference(tags, cats)


def test_index_json_is_plain_json(job_output, tmp_path):
    output, _ = job_output
    build_index(output, str(tmp_path / "ix"))
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert set(meta) >= {"settings", "runs", "rows", "bytes", "bytes_per_image", "vector_index"}


def test_a_run_without_results_rows_makes_an_empty_index_that_later_runs_fill(tmp_path):
    index_dir = str(tmp_path / "ix")
    empty = build_index(so.synthetic_output(str(tmp_path / "a"), np.zeros((0, 8))), index_dir)
    assert empty["rows"] == 0
    filled = build_index(so.synthetic_output(str(tmp_path / "b"), so.clustered(10, 8)), index_dir)
    assert filled["rows_added"] == 10
    index = open_index(index_dir)
    assert "wnids_idx" in {i.name for i in index.images.list_indices()}
    assert len(query.by_tag(index, [so.GOLDEN[0]], k=20)) == 10


# ------------------------------------------------------------------------------- index safety


def test_a_second_writer_is_refused_naming_the_holder(job_output, tmp_path):
    output, _ = job_output
    index_dir = str(tmp_path / "ix")
    with claim(index_dir, "./run.sh index") as held:
        with pytest.raises(SearchError, match=f"{index_dir} is claimed by ./run.sh index") as e:
            build_index(output, index_dir)
    assert f"pid {os.getpid()}, started {held.holder['started']})" in str(e.value)
    assert not (tmp_path / "ix" / "images.lance").exists()
    assert build_index(output, index_dir)["rows"] == so.NUM_PHOTOS  # released: the next one runs


def test_a_missing_index_json_next_to_the_tables_is_never_a_silent_rebuild(job_output, tmp_path):
    output, _ = job_output
    index_dir = tmp_path / "ix"
    build_index(output, str(index_dir))
    (index_dir / "index.json").unlink()
    other = so.retag(output, str(tmp_path / "other"), key_prefix="x/")
    with pytest.raises(SearchError, match=f"{index_dir} holds images.lance, terms.lance but no"):
        build_index(other, str(index_dir))
    with pytest.raises(SearchError, match="index.json: the index is damaged; move"):
        open_index(str(index_dir))
    import lancedb

    assert lancedb.connect(str(index_dir)).open_table("images").count_rows() == so.NUM_PHOTOS


@pytest.mark.parametrize(
    "damage", [b'{"settings": {"embed_model_sha256": "', b"[]", b'{"settings": {}, "runs": []}']
)
def test_a_damaged_index_json_is_an_error_naming_it(job_output, tmp_path, damage):
    output, _ = job_output
    index_dir = tmp_path / "ix"
    build_index(output, str(index_dir))
    (index_dir / "index.json").write_bytes(damage)
    for attempt in (
        lambda: open_index(str(index_dir)),
        lambda: build_index(output, str(index_dir)),
    ):
        with pytest.raises(SearchError, match=f"{index_dir / 'index.json'} is damaged"):
            attempt()


def test_a_failed_index_json_write_leaves_the_previous_one(job_output, tmp_path, monkeypatch):
    output, _ = job_output
    index_dir = tmp_path / "ix"
    build_index(output, str(index_dir))
    before = (index_dir / "index.json").read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_index(so.retag(output, str(tmp_path / "b"), key_prefix="b/"), str(index_dir))
    assert (index_dir / "index.json").read_bytes() == before
    assert [p.name for p in index_dir.iterdir() if p.name.startswith(".index.json")] == []


def test_an_incomplete_output_is_refused(job_output, tmp_path):
    output, _ = job_output
    killed = so.retag(output, str(tmp_path / "killed"))
    os.remove(os.path.join(killed, "summary.json"))
    with pytest.raises(SearchError, match=f"{killed} holds an incomplete run"):
        build_index(killed, str(tmp_path / "ix"))


def test_an_overwritten_output_replaces_its_rows_and_its_own_index_asks_for_it(
    job_output, tmp_path
):
    output, _ = job_output
    first = so.retag(output, str(tmp_path / "run"))
    everything = str(tmp_path / "everything")
    build_index(first)  # its own index, OUTPUT/index
    build_index(first, everything)
    build_index(so.retag(output, str(tmp_path / "other"), key_prefix="o/"), everything)
    # --overwrite: a new run with half the images, changed vectors, commits into the same OUTPUT.
    table = so.results(first).slice(0, so.NUM_PHOTOS // 2)
    vectors = np.stack(table.column("embedding").to_pylist())[::-1].astype(np.float32)
    table = table.set_column(
        table.schema.get_field_index("embedding"),
        "embedding",
        pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.ravel()), type=table.schema.field("embedding").type
        ),
    )
    so.write_output(first, table, so.footer(first))
    with pytest.raises(SearchError, match=f"{first}/index is out of date: {first} was replaced"):
        open_index(first)
    for index_dir in (None, everything):
        report = build_index(first, index_dir)
        index = open_index(index_dir or first)
        rows = index.images.to_arrow()
        mine = rows.filter(pc.equal(rows.column("run"), first)).sort_by("key")
        assert mine.column("key").to_pylist() == table.column("key").to_pylist()
        np.testing.assert_array_equal(np.stack(mine.column("vector").to_pylist()), vectors)
        assert report["rows"] == len(table) + (so.NUM_PHOTOS if index_dir else 0)
    assert [r["output"] for r in read_meta(everything)["runs"]][-1] == first


def test_an_index_dir_that_is_a_file_or_read_only_is_one_clear_error(job_output, tmp_path):
    output, _ = job_output
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SearchError, match=f"--index_dir {tmp_path / 'file'}: .* is a file"):
        build_index(output, str(tmp_path / "file"))
    with read_only(tmp_path / "ro") as readonly:
        with pytest.raises(SearchError, match=f"cannot write to {readonly}: Read-only file system"):
            build_index(output, str(readonly))


def test_tag_filters_are_answered_by_the_label_list_index(tmp_path):
    """`wnids` is an Arrow `list<item: string>`: against the Parquet-style `element` list LanceDB
    cast the column and scanned every row (25x slower at 50,000 rows)."""
    index_dir = str(tmp_path / "ix")
    build_index(so.synthetic_output(str(tmp_path / "a"), so.clustered(50, 8)), index_dir)
    images = open_index(index_dir).images
    assert images.schema.field("wnids").type == search_index.WNIDS_TYPE
    plan = images.search().where(query._wnid_filter([so.GOLDEN[0]])).explain_plan(verbose=True)
    assert "ScalarIndexQuery" in plan and "CAST" not in plan


def test_category_keys_pack_each_categorys_wnid_offset_and_score():
    categories = pa.array(
        [
            [{"wnid": "n02084071", "label": "dog", "score": 0.75}],
            [],
            [
                {"wnid": "n00001740", "label": "entity", "score": 1.0},
                {"wnid": "n00000001", "label": "tiny", "score": 1e-30},
            ],
        ],
        pa.list_(search_index.CATEGORY_TYPE),
    )
    keys = search_index.category_keys(categories.slice(1))  # a slice: its own offsets
    assert [len(row) for row in keys.to_pylist()] == [0, 2]
    offsets, scores = search_index.split_category_keys(keys.flatten().to_numpy())
    assert offsets.tolist() == [1740, 1] and scores.tolist() == [1.0, np.float32(1e-30)]
    assert search_index.wnid_offset("n02084071") == 2084071
    bad = pa.array([[{"wnid": "x02084071", "label": "?", "score": 0.5}]], categories.type)
    with pytest.raises(SearchError, match="not a WordNet noun id.*x02084071"):
        search_index.category_keys(bad)
    with pytest.raises(ValueError, match="n02084071x"):
        search_index.wnid_offset("n02084071x")


@pytest.mark.parametrize("batch_rows", [65_536, 16])
def test_tag_ties_are_broken_by_key_across_all_matching_rows(tmp_path, monkeypatch, batch_rows):
    """Every row of a synthetic output carries the same tag with the same score: the top k are
    the k smallest keys, wherever they are stored, and whichever batch they are read in."""
    monkeypatch.setattr(query, "TAG_BATCH_ROWS", batch_rows)
    output = so.synthetic_output(str(tmp_path / "a"), so.clustered(120, 8))
    build_index(output, str(tmp_path / "ix"))
    hits = query.by_tag(open_index(str(tmp_path / "ix")), [so.GOLDEN[0]], k=7)
    assert [h.key for h in hits] == sorted(f"s{i}" for i in range(120))[:7]
    assert {(h.wnid, h.score) for h in hits} == {(so.GOLDEN[0], 0.5)}
