"""The three queries of `./run.sh search`: by image, by key, by tag (and image within a tag).

- `by_vector` (used by `--image` and `--key`): approximate candidates from the index, re-ranked by
  exact cosine (`search/ann.py`), optionally only among images carrying some synsets.
- `by_tag`: the images whose `categories` contain one of the synsets, by that category's score
  (vectorised: only the top k rows become Python objects).
- `within` (both): only images whose categories contain every one of those wnids (the search
  page's category filters).
- `embed_image`: a query image embedded as the job embedded the indexed ones: the embed model,
  precision, image size and resize recorded in the results' footer, then the PCA basis when the
  index holds `embedding_reduced`. A model whose sha256 is not the index's is refused.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import storage
from search import SearchError, ann, terms
from search.index import (
    CATEGORY_KEYS,
    Index,
    category_keys,
    split_category_keys,
    wnid_offset,
)

_LOG = logging.getLogger(__name__)

ROW_ID = "_rowid"  # LanceDB's row id: which row of the opened table a hit is
DISPLAY_COLUMNS = ["key", "source", "tags", ROW_ID]


@dataclass
class Hit:
    """One result: `score` is the cosine similarity (image/key queries) or the category score
    (tag-only queries); `wnid` is the matching synset of a tag query. `row_id` says which row of
    the opened index it is (`Index.images`; not part of `as_dict`, the `--json` answer)."""

    key: str
    source: str
    score: float
    tags: list[str] = field(default_factory=list)
    wnid: str | None = None
    row_id: int | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        del out["row_id"]
        if out["wnid"] is None:
            del out["wnid"]
        return out


def _wnid_filter(wnids, within=None) -> str | None:
    """SQL over the `wnids` column: any of `wnids`, and all of `within`."""
    parts = []
    if wnids is not None:
        parts.append(f"array_has_any(wnids, {terms.sql_list(wnids)})")
    if within:
        parts.append(f"array_has_all(wnids, {terms.sql_list(within)})")
    return " AND ".join(parts) or None


def by_vector(
    index: Index,
    vector: np.ndarray,
    k: int = 10,
    wnids: list[str] | None = None,
    exclude_key: str | None = None,
    nprobes: int = ann.DEFAULT_NPROBES,
    refine_factor: int = ann.DEFAULT_REFINE_FACTOR,
    within: list[str] | None = None,
) -> list[Hit]:
    """The `k` images nearest to `vector` (exact cosine), among those with one of `wnids` and
    all of `within` when given."""
    vector = np.asarray(vector, np.float32).reshape(-1)
    if vector.shape[0] != index.settings["dim"]:
        raise SearchError(
            f"query vector has {vector.shape[0]} dimensions, the index {index.settings['dim']}"
        )
    limit = k + (exclude_key is not None)
    columns = DISPLAY_COLUMNS + (["categories"] if wnids else [])
    candidates = ann.nearest(
        index.images,
        vector,
        limit,
        columns,
        where=_wnid_filter(wnids, within),
        nprobes=nprobes,
        refine_factor=refine_factor,
        vectors=index.vectors,
    )
    rows, sims = ann.exact_rerank(vector, candidates, limit)
    hits = []
    # Not the vectors: 10 x 6144 Python floats took 20 ms, most of a query.
    for row, sim in zip(rows.select(columns).to_pylist(), sims):
        if row["key"] == exclude_key:
            continue
        match = _best_category(row["categories"], wnids)[0] if wnids else None
        hits.append(
            Hit(row["key"], row["source"], float(sim), row["tags"] or [], match, row[ROW_ID])
        )
    return hits[:k]


def vector_of(index: Index, key: str) -> np.ndarray:
    """The indexed vector of `key`; SearchError when the key is not in the index."""
    found = (
        index.images.search()
        .where(f"key = {terms.sql_text(key)}")
        .select([ann.VECTOR_COLUMN])
        .limit(1)
        .to_arrow()
    )
    if found.num_rows == 0:
        raise SearchError(f"key {key!r} is not in the index {index.dir}")
    return np.asarray(found.column(ann.VECTOR_COLUMN)[0].as_py(), np.float32)


def by_key(index: Index, key: str, k: int = 10, **kwargs) -> list[Hit]:
    """The `k` nearest neighbours of an indexed image (itself excluded)."""
    return by_vector(index, vector_of(index, key), k, exclude_key=key, **kwargs)


def resolve_tag(index: Index, term: str) -> list[tuple[str, str]]:
    """(wnid, label) of every synset `term` names in the index's vocabulary, else in the model's
    label set (a known tag no indexed image has); SearchError for an unknown term."""
    normalised = terms.normalise(term)
    if not normalised:
        raise SearchError("--tag is empty")
    found = (
        index.vocabulary.search()
        .where(f"term = {terms.sql_text(normalised)}")
        .limit(None)
        .to_arrow()
    )
    synsets = list(
        dict.fromkeys(zip(found.column("wnid").to_pylist(), found.column("label").to_pylist()))
    )
    if not synsets:
        synsets = terms.label_set_synsets(normalised)
    if not synsets:
        raise SearchError(
            f"unknown tag {term!r}: no wnid or lemma of that name in the index "
            "or in the ImageNet-21k label set"
        )
    return synsets


def _best_category(categories, wnids) -> tuple[str | None, float]:
    best = (None, float("-inf"))
    for item in categories or []:
        if item["wnid"] in wnids and item["score"] > best[1]:
            best = (item["wnid"], float(item["score"]))
    return best


TAG_BATCH_ROWS = 65_536  # rows of a tag query read at once: its memory, whatever the tag matches


def by_tag(
    index: Index, wnids: list[str], k: int = 10, within: list[str] | None = None
) -> list[Hit]:
    """The `k` images whose categories contain one of `wnids` (and all of `within`), by that
    category's score (the first of equal best ones), ties by key.

    Reads the matching rows' `category_keys` (one int64 a category: the wnid's offset, its
    score), not their `categories` structs: a third of the time. An index built before that
    column existed has its keys computed from `categories` here, the same ranking. The rows come
    `TAG_BATCH_ROWS` at a time and only the best so far (and rows tied with the k-th) are kept,
    so a tag that every image carries costs time in proportion to the index, not memory."""
    stored = CATEGORY_KEYS in index.images.schema.names
    targets = np.array([wnid_offset(w) for w in wnids], np.int64)
    query = (
        index.images.search()
        .where(_wnid_filter(wnids, within))
        .select([CATEGORY_KEYS if stored else "categories", ROW_ID])
        .limit(None)
    )
    # The best so far: (score, row id, matching wnid's offset) of each candidate row.
    best = (np.empty(0, np.float32), np.empty(0, np.int64), np.empty(0, np.int64))
    for batch in query.to_batches(TAG_BATCH_ROWS):
        keys = batch.column(CATEGORY_KEYS) if stored else category_keys(batch.column("categories"))
        found = _best_matches(keys, targets)
        row_ids = batch.column(ROW_ID).to_numpy().astype(np.int64)
        best = _top_with_ties(
            *(np.concatenate(pair) for pair in zip(best, (found[0], row_ids[found[1]], found[2]))),
            k,
        )
    row_ids = best[1].tolist()
    shown = _rows_by_id(index, row_ids, ["key", "source", "tags"])
    ranked = sorted(
        zip(row_ids, best[0].tolist(), best[2].tolist()),
        key=lambda hit: (-hit[1], shown[hit[0]]["key"]),
    )[:k]
    return [
        Hit(
            shown[rid]["key"],
            shown[rid]["source"],
            score,
            shown[rid]["tags"] or [],
            f"n{offset:08d}",
            rid,
        )
        for rid, score, offset in ranked
    ]


def _best_matches(keys: pa.ListArray, targets: np.ndarray):
    """(score, row, offset) per row of `keys` that holds one of the `targets` offsets: its best
    matching category (the first of equal best ones)."""
    offsets, scores = split_category_keys(keys.flatten().to_numpy(zero_copy_only=False))
    at = np.flatnonzero(np.isin(offsets, targets))
    rows = pc.list_parent_indices(keys).to_numpy()[at]
    order = np.lexsort((at, -scores[at], rows))  # by row, score descending, position
    rows, first = np.unique(rows[order], return_index=True)
    chosen = at[order[first]]
    return scores[chosen], rows, offsets[chosen]


def _top_with_ties(scores: np.ndarray, row_ids: np.ndarray, offsets: np.ndarray, k: int):
    """The candidates with the `k` best scores and every one tied with the k-th (the tie is
    broken later, by key)."""
    if len(scores) <= k:
        return scores, row_ids, offsets
    kth = np.partition(-scores, k - 1)[k - 1]
    keep = -scores <= kth
    return scores[keep], row_ids[keep], offsets[keep]


def _rows_by_id(index: Index, row_ids: list[int], columns: list[str]) -> dict[int, dict]:
    """Row id -> {column: value} of rows of the opened index."""
    if not row_ids:
        return {}
    table = index.images.take_row_ids(row_ids).select([*columns, ROW_ID]).to_arrow()
    return {row[ROW_ID]: row for row in table.to_pylist()}


# ------------------------------------------------------------------------- query images


def load_model(
    index: Index,
    embed_model: str | None = None,
    tags_model: str | None = None,
    cache_dir: str | None = None,
):
    """The job's model as the index's footer records it (sources overridable), checked to be the
    same embed model (sha256) as the indexed vectors'."""
    from model.bit import TagAndEmbedModel

    s = index.settings
    embed_source, tags_source = embed_model or s["embed_model"], tags_model or s["tags_model"]
    try:
        model = TagAndEmbedModel.load(
            tags_source, embed_source, precision=s["precision"] or "float32", cache_dir=cache_dir
        )
    except (OSError, ValueError) as e:
        raise SearchError(
            f"cannot load the model to embed the query image: {type(e).__name__}: {e}"
        ) from None
    got = model.metadata()["embed_model_sha256"]
    if s["embed_model_sha256"] and got != s["embed_model_sha256"]:
        raise SearchError(
            f"the query would be embedded by a different model: {embed_source} has sha256 "
            f"{got[:16]}..., the index was built from {s['embed_model']} "
            f"({s['embed_model_sha256'][:16]}...)"
        )
    return model


def read_image(path: str) -> bytes:
    try:
        with storage.open_file(path, "rb") as f:
            return f.read()
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot read --image {path}: {type(e).__name__}: {e}") from None


def embed_image(index: Index, data: bytes, model, what: str = "image") -> np.ndarray:
    """The index-space vector of an encoded image, preprocessed as the indexed images were."""
    from core.decode import DecodeError, decode_image

    s = index.settings
    try:
        pixels, _, _ = decode_image(data, int(s["image_size"]), resize=s["resize"])
    except DecodeError as e:
        raise SearchError(f"{what} cannot be decoded: {e}") from None
    embedding = model(pixels[None]).embeddings
    if s.get("embedding_dtype") == "float16":  # round as the indexed vectors were
        embedding = embedding.astype(np.float16).astype(np.float32)
    if s["vector_column"] == "embedding_reduced":
        embedding = _project(s, embedding)
    return embedding[0]


def _project(settings: dict, embeddings: np.ndarray) -> np.ndarray:
    from model.pca import PcaBasisError, load_basis

    try:
        basis = load_basis(settings["pca_basis"])
    except PcaBasisError as e:
        raise SearchError(f"cannot project the query image: {e}") from None
    if settings["pca_basis_sha256"] and basis.sha256 != settings["pca_basis_sha256"]:
        raise SearchError(
            f"PCA basis {settings['pca_basis']} has changed since the results were "
            "written (sha256 differs): the query cannot be projected like them"
        )
    return basis.project(embeddings)
