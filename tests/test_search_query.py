"""`search.query` on an index of a real job output (retagged with hand-made tags and categories,
tests/search_outputs.py): by image, by key, by tag, image within a tag, and the bad inputs."""

import numpy as np
import pyarrow as pa
import pytest

from model import pca
from search import SearchError, ann, query
from search.index import build_index, open_index
from tests import search_outputs as so
from tests.bit_checkpoints import write_checkpoint


@pytest.fixture(scope="module")
def tagged(job_output, tmp_path_factory):
    """(index, written results sorted by key, photo paths): the categories path."""
    output, photos = job_output
    root = tmp_path_factory.mktemp("tagged")
    tagged_output = so.retag(output, str(root / "out"))
    build_index(tagged_output)
    return open_index(tagged_output), so.results(tagged_output), photos


@pytest.fixture(scope="module")
def model(tagged):
    return query.load_model(tagged[0])


def exact_order(table, vector):
    """Keys by exact cosine to `vector`, best first, with the cosines."""
    sims = ann.cosine(vector, np.stack(table.column("embedding").to_pylist()))
    order = np.argsort(-sims, kind="stable")
    return [table.column("key")[int(i)].as_py() for i in order], sims[order]


def by_score(table, column, wnid):
    """(score, key) of every entry for `wnid` in the rows' `column` (tags or categories), best
    first."""
    return sorted(
        (
            (entry["score"], row["key"])
            for row in table.to_pylist()
            for entry in row[column]
            if entry["wnid"] == wnid
        ),
        reverse=True,
    )


def test_neighbours_of_a_key_are_the_exact_nearest_without_itself(tagged):
    index, table, _ = tagged
    key = table.column("key")[2].as_py()
    hits = query.by_key(index, key, k=4)
    keys, sims = exact_order(table, np.asarray(table.column("embedding")[2].as_py()))
    assert keys[0] == key
    assert [h.key for h in hits] == keys[1:5]
    np.testing.assert_allclose([h.score for h in hits], sims[1:5], rtol=1e-6)
    assert all(h.tags for h in hits)


def test_a_photo_queried_with_its_own_file_comes_first(tagged, model):
    index, table, photos = tagged
    for i in (0, 5):
        vector = query.embed_image(index, open(photos[i], "rb").read(), model)
        hits = query.by_vector(index, vector, k=3)
        assert hits[0].key == photos[i] and hits[0].score >= 0.999
        assert [h.key for h in hits] == exact_order(table, vector)[0][:3]


def test_tag_returns_images_whose_categories_contain_it_by_category_score(tagged):
    index, table, _ = tagged
    synsets = query.resolve_tag(index, "dog")  # a hypernym: only in the categories
    assert synsets == [so.DOG]
    hits = query.by_tag(index, [so.DOG[0]], k=10)
    expected = by_score(table, "categories", so.DOG[0])
    assert [(pytest.approx(h.score), h.key) for h in hits] == [(s, k) for s, k in expected]
    assert len(hits) == so.NUM_PHOTOS // 2 and {h.wnid for h in hits} == {so.DOG[0]}
    assert [h.key for h in query.by_tag(index, [so.DOG[0]], k=2)] == [k for _, k in expected[:2]]


def test_a_tag_read_a_few_rows_at_a_time_gives_the_same_answer(tagged, monkeypatch):
    """by_tag keeps only the best rows of each batch it reads (its memory is one batch)."""
    index, table, _ = tagged
    expected = by_score(table, "categories", so.DOG[0])
    monkeypatch.setattr(query, "TAG_BATCH_ROWS", 3)
    for k in (1, 2, len(expected)):
        hits = query.by_tag(index, [so.DOG[0]], k=k)
        assert [(pytest.approx(h.score), h.key) for h in hits] == expected[:k]


def test_a_lemma_naming_several_synsets_matches_all_of_them(tagged):
    index, _, _ = tagged
    synsets = query.resolve_tag(index, "Crane")
    assert sorted(synsets) == sorted([so.CRANE_BIRD, so.CRANE_MACHINE])
    hits = query.by_tag(index, [w for w, _ in synsets], k=10)
    assert len(hits) == so.NUM_PHOTOS
    assert {h.wnid for h in hits} == {so.CRANE_BIRD[0], so.CRANE_MACHINE[0]}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_wnids_and_spaced_lemmas_resolve(tagged):
    index, _, _ = tagged
    assert query.resolve_tag(index, "N02099601") == [so.GOLDEN]
    assert query.resolve_tag(index, "Domestic Cat") == [so.CAT]
    # A known class that no indexed image has: no error, no rows.
    assert query.resolve_tag(index, "tabby cat") == [so.TABBY]
    assert query.resolve_tag(index, "flat-coated retriever")[0][0].startswith("n")
    assert (
        query.by_tag(index, [w for w, _ in query.resolve_tag(index, "flat-coated retriever")], k=5)
        == []
    )


def test_without_categories_tags_match_only_the_tagged_classes(job_output, tmp_path):
    """A `--no_categories` output: the tags are the categories, hypernyms match nothing."""
    output, _ = job_output
    tags_only = so.retag(output, str(tmp_path / "out"), categories=False)
    build_index(tags_only)
    index = open_index(tags_only)
    assert index.settings["tag_column"] == "tags"
    hits = query.by_tag(index, [w for w, _ in query.resolve_tag(index, "golden retriever")], k=10)
    table = so.results(tags_only)
    expected = by_score(table, "tags", so.GOLDEN[0])
    assert [(pytest.approx(h.score), h.key) for h in hits] == [(s, k) for s, k in expected]
    dogs = query.resolve_tag(index, "dog")  # known classes (the animal, the andiron) ...
    assert so.DOG in dogs and len(dogs) == 2
    assert query.by_tag(index, [w for w, _ in dogs], k=10) == []  # ... no image is tagged with


def test_image_within_a_tag_only_returns_images_of_that_tag(tagged, model):
    index, table, photos = tagged
    vector = query.embed_image(index, open(photos[1], "rb").read(), model)
    cats = query.by_vector(index, vector, k=10, wnids=[so.CAT[0]])
    cat_keys = {
        row["key"]
        for row in table.to_pylist()
        if any(c["wnid"] == so.CAT[0] for c in row["categories"])
    }
    assert {h.key for h in cats} == cat_keys and photos[1] not in cat_keys
    assert {h.wnid for h in cats} == {so.CAT[0]}
    assert [h.score for h in cats] == sorted((h.score for h in cats), reverse=True)


def test_bad_inputs_are_search_errors(tagged, model, tmp_path):
    index, _, _ = tagged
    with pytest.raises(SearchError, match="unknown tag 'no such thing'"):
        query.resolve_tag(index, "no such thing")
    with pytest.raises(SearchError, match="key 'nope' is not in the index"):
        query.by_key(index, "nope")
    with pytest.raises(SearchError, match="cannot be decoded"):
        query.embed_image(index, b"<html>not an image</html>", model)
    with pytest.raises(SearchError, match="cannot read --image"):
        query.read_image(str(tmp_path / "missing.jpg"))


def test_a_different_embed_model_is_refused(tagged, tmp_path):
    other = tmp_path / "other.npz"
    write_checkpoint(other, units=(1, 1, 1, 1), width=1, num_classes=None, seed=7)
    with pytest.raises(SearchError, match="embedded by a different model"):
        query.load_model(tagged[0], embed_model=str(other))


def test_image_query_against_reduced_embeddings(job_output, tmp_path, model):
    """An output with `embedding_reduced` (PCA basis in the contract's .npz layout): the index is
    over the reduced vectors and a query image is projected with the same basis."""
    output, photos = job_output
    table = so.results(output)
    embeddings = np.stack(table.column("embedding").to_pylist()).astype(np.float32)
    mean = embeddings.mean(axis=0)
    _, s, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    dims = 4
    basis_path = tmp_path / "basis.npz"
    variance = (s[:dims] ** 2 / (len(embeddings) - 1)).astype(np.float64)
    np.savez(
        basis_path,
        mean=mean,
        components=vt[:dims].astype(np.float32),
        explained_variance=variance,
        explained_variance_ratio=variance / np.sum(s**2 / (len(embeddings) - 1)),
        num_samples=np.int64(len(embeddings)),
    )
    basis = pca.load_basis(str(basis_path))
    reduced = basis.project(embeddings)
    column = pa.FixedSizeListArray.from_arrays(
        pa.array(reduced.astype(np.float32).ravel()),
        type=pa.list_(pa.field("element", pa.float32()), dims),
    )
    reduced_output = so.retag(
        output,
        str(tmp_path / "out"),
        extra_columns={"embedding_reduced": column},
        metadata={
            "pca_basis": str(basis_path),
            "pca_basis_sha256": basis.sha256,
            "pca_dims": str(dims),
            "pca_input_dim": str(embeddings.shape[1]),
        },
    )
    build_index(reduced_output)
    index = open_index(reduced_output)
    assert index.settings["vector_column"] == "embedding_reduced" and index.settings["dim"] == dims
    vector = query.embed_image(index, open(photos[3], "rb").read(), model)
    hits = query.by_vector(index, vector, k=2)
    assert hits[0].key == photos[3] and hits[0].score >= 0.999
