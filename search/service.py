"""What `./run.sh serve` answers, as plain dicts: one opened index, its queries, tag suggestions,
category filters and thumbnails. A thin layer over `search.query` (the functions `./run.sh search`
runs), so an answer's results are `search --json`'s, each with its `id` and `thumbnail` added.

- `Service(index_or_output)` opens the index once; the embed model is loaded on the first photo
  query (`model()`, once, under a lock) and kept.
- Ids are LanceDB row ids of the table version opened (`search.query.Hit.row_id`), valid while this
  service runs; thumbnail URLs carry the version (`?v=`), so a URL cached by a browser never shows
  another image after the index changed (`NotFound`).
- Errors: `NotFound` (an unknown tag, with the closest lemmas; an unknown key or id: HTTP 404),
  `BadRequest` (a bad value or photo: 400); both are `SearchError`s, one line each.
"""

from __future__ import annotations

import bisect
import collections
import difflib
import hashlib
import json
import logging
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc

from core.schema import SPAN_COLUMNS
from search import SearchError, query, terms
from search.index import lance_errors, open_index
from search.originals import Location
from search.thumbnails import ThumbnailError, Thumbnails

_LOG = logging.getLogger(__name__)

MAX_K = 1_000  # results per query of the server (the CLI allows more; a page shows a grid)
FACETS = 8  # categories offered as filters
SUGGESTIONS = 10
MAX_FILTERS = 8


class NotFound(SearchError):
    """An unknown tag, key or id (HTTP 404); `suggestions`: the closest lemmas of a tag."""

    def __init__(self, message: str, suggestions: list | None = None):
        super().__init__(message)
        self.suggestions = suggestions or []


class BadRequest(SearchError):
    """A value out of range, a photo that cannot be decoded (HTTP 400)."""


class _TimedModel:
    """The embed model, timing its forward pass (the `embed_ms` of a photo query) per thread."""

    def __init__(self, model):
        self._model = model
        self._local = threading.local()

    def __call__(self, images):
        started = time.perf_counter()
        try:
            return self._model(images)
        finally:
            self._local.seconds = time.perf_counter() - started

    def last_seconds(self) -> float:
        return getattr(self._local, "seconds", 0.0)

    def __getattr__(self, name):
        return getattr(self._model, name)


class Vocabulary:
    """The index's tag terms in memory (`terms.lance`): suggestions as one types, closest lemmas
    of an unknown tag, and how many images carry each synset (counted in the background)."""

    def __init__(self, index):
        table = index.vocabulary.to_arrow()
        rows = sorted(
            zip(
                table.column("term").to_pylist(),
                table.column("wnid").to_pylist(),
                table.column("label").to_pylist(),
            )
        )
        self.rows = rows
        self.terms = [r[0] for r in rows]
        self.synsets_of = collections.Counter(self.terms)
        self.synsets: dict[str, list] = {}  # term -> [(wnid, label)], as `resolve_tag` reads them
        for term, wnid, label in rows:
            self.synsets.setdefault(term, []).append((wnid, label))
        self.images: dict[str, int] = {}
        self.names = {wnid: terms.display_name(label) or wnid for _, wnid, label in rows}
        self._lemmas = sorted({t for t in self.terms if not terms.WNID.match(t)})

    def count_images(self, index) -> None:
        """Fills `images` (wnid -> images carrying it) from the index's `wnids` column."""
        counts: collections.Counter = collections.Counter()
        reader = index.images.search().select(["wnids"]).limit(None).to_batches(65_536)
        for batch in reader:
            values = batch.column("wnids").flatten()
            if len(values):
                found = pc.value_counts(values)
                counts.update(
                    dict(zip(found.field("values").to_pylist(), found.field("counts").to_pylist()))
                )
        self.images = dict(counts)

    def suggest(self, text: str, limit: int = SUGGESTIONS) -> list[dict]:
        """Terms starting with `text` (normalised as `search --tag` reads it), then terms with a
        word starting with it; exact first, then by images, then shorter."""
        q = terms.normalise(text)
        if not q:
            return []
        found = []
        start = bisect.bisect_left(self.terms, q)
        for term, wnid, label in self.rows[start:]:
            if not term.startswith(q) or len(found) >= 200:
                break
            found.append((term, wnid, label))
        if len(found) < limit:
            inner = "_" + q
            seen = set(found)
            found += [r for r in self.rows if inner in r[0] and r not in seen][: 200 - len(found)]
        found.sort(key=lambda r: (r[0] != q, -self.images.get(r[1], 0), len(r[0]), r[0]))
        return [
            {
                "term": term,
                "wnid": wnid,
                "label": label,
                "name": terms.display_name(label) or term,
                "images": self.images.get(wnid),
                "value": term if self.synsets_of[term] == 1 else wnid,
            }
            for term, wnid, label in found[:limit]
        ]

    def closest(self, text: str, n: int = 5) -> list[str]:
        """The lemmas nearest to an unknown term (spelling), best first."""
        q = terms.normalise(text)
        near = [t for t in self._lemmas if abs(len(t) - len(q)) <= 3]
        return difflib.get_close_matches(q, near, n=n, cutoff=0.7)


class Service:
    """One opened index and everything the server answers (see the module docstring)."""

    def __init__(
        self,
        index_or_output: str,
        *,
        embed_model: str | None = None,
        tags_model: str | None = None,
        model_cache_dir: str | None = None,
        thumbnails: Thumbnails | None = None,
        count_images: bool = True,
    ):
        self.index = open_index(index_or_output)
        self.images = self.index.images
        self._model_args = (embed_model, tags_model, model_cache_dir)
        self._model = None
        self._model_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self.thumbnails = thumbnails or Thumbnails()
        names = self.images.schema.names
        self.span_columns = [c for c in SPAN_COLUMNS if c in names]
        if not self.span_columns:
            _LOG.warning(
                "%s was indexed before results recorded where each image is (source_offset, "
                "source_length): thumbnails from TFRecord and tar shards scan their shard; index "
                "again (./run.sh index OUTPUT into a new --index_dir) to read them directly",
                self.index.dir,
            )
        runs = json.dumps(self.index.meta.get("runs", []), sort_keys=True)
        token = f"{self.index.dir}|{self.images.version}|{runs}"
        self.version = hashlib.sha256(token.encode()).hexdigest()[:12]
        with lance_errors(self.index.dir):
            self.rows = self.images.count_rows()
            self.vocabulary = Vocabulary(self.index)
        if count_images:
            threading.Thread(target=self._count, daemon=True, name="count-images").start()

    def _count(self) -> None:
        try:
            self.vocabulary.count_images(self.index)
        except Exception:  # noqa: BLE001 - suggestions then have no counts; the server goes on
            _LOG.warning("could not count the images of each tag", exc_info=True)

    # ---------------------------------------------------------------------------------- about

    def info(self) -> dict:
        s = self.index.settings
        return {
            "index": self.index.dir,
            "images": self.rows,
            "runs": len(self.index.meta.get("runs", [])),
            "terms": len(self.vocabulary.terms),
            "embed_model": s.get("embed_model"),
            "vector": f"{s.get('vector_column')} ({s.get('dim')}-d)",
            "categories": s.get("tag_column") == "categories",
            "version": self.version,
        }

    # -------------------------------------------------------------------------------- queries

    def by_tag(self, tag: str, k: int = 10, within: list[str] | None = None) -> dict:
        started = time.perf_counter()
        k, within = _check_k(k), _check_filters(within)
        synsets = self.resolve(tag)
        wnids = [w for w, _ in synsets]
        with lance_errors(self.index.dir):
            hits = query.by_tag(self.index, wnids, k, within=within)
        return self._answer(hits, started, within, wnids, synsets=synsets, tag=tag)

    def by_key(self, key: str, k: int = 10, within: list[str] | None = None) -> dict:
        started = time.perf_counter()
        k, within = _check_k(k), _check_filters(within)
        try:
            with lance_errors(self.index.dir):
                vector = query.vector_of(self.index, key)
        except SearchError as e:
            raise NotFound(str(e)) from None
        with lance_errors(self.index.dir):
            hits = query.by_vector(self.index, vector, k, exclude_key=key, within=within)
        return self._answer(hits, started, within, key=key)

    def by_image(
        self, data: bytes, k: int = 10, tag: str | None = None, within: list[str] | None = None
    ) -> dict:
        started = time.perf_counter()
        k, within = _check_k(k), _check_filters(within)
        synsets = self.resolve(tag) if tag else []
        wnids = [w for w, _ in synsets] or None
        model = self.model()
        with self._run_lock:  # one forward pass at a time: the model uses every core
            try:
                vector = query.embed_image(self.index, data, model, what="the photo")
            except SearchError as e:
                raise BadRequest(str(e)) from None
            embed_ms = model.last_seconds() * 1000
        with lance_errors(self.index.dir):
            hits = query.by_vector(self.index, vector, k, wnids=wnids, within=within)
        extra = {"synsets": synsets, "tag": tag} if tag else {}
        return self._answer(
            hits, started, within, wnids or [], embed_ms=round(embed_ms, 2), **extra
        )

    def resolve(self, tag: str) -> list[tuple[str, str]]:
        """(wnid, label) of each synset `tag` names (as `search --tag`); NotFound with the closest
        lemmas when it names none."""
        known = self.vocabulary.synsets.get(terms.normalise(tag))
        if known:  # the index's vocabulary, in memory: what resolve_tag would read from it
            return list(dict.fromkeys(known))
        try:
            return query.resolve_tag(self.index, tag)
        except SearchError as e:
            if not terms.normalise(tag):
                raise BadRequest("the tag is empty") from None
            raise NotFound(str(e), self.vocabulary.closest(tag)) from None

    def model(self):
        """The embed model, loaded on first use (seconds) and kept."""
        with self._model_lock:
            if self._model is None:
                _LOG.info("loading the embed model (first photo query)")
                started = time.perf_counter()
                self._model = _TimedModel(query.load_model(self.index, *self._model_args))
                _LOG.info("embed model loaded in %.1f s", time.perf_counter() - started)
            return self._model

    def _answer(self, hits, started, within, wnids=(), synsets=(), **extra) -> dict:
        """The JSON answer: results (`search --json`'s, with id and thumbnail), the categories
        that would narrow them, the filters applied, the tag's synsets, and the time taken."""
        results = [
            {"id": h.row_id, **h.as_dict(), "thumbnail": self.thumbnail_url(h.row_id)} for h in hits
        ]
        answer = {
            "results": results,
            "categories": self._facets(hits, {*wnids, *within}),
            "filters": [{"wnid": w, "label": self.vocabulary.names.get(w, w)} for w in within],
        }
        if synsets:
            answer["synsets"] = [{"wnid": w, "label": lab} for w, lab in synsets]
        if self.index.settings.get("tag_column") == "tags":
            answer["note"] = (
                "this index was built from results without a categories column: tags match only "
                "the tagged classes themselves, not their hypernyms"
            )
        answer.update(extra)
        answer["took_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return answer

    def _facets(self, hits, exclude: set) -> list[dict]:
        """The categories most common among `hits` that narrow them (in some, not all), with
        how many of the hits carry each; those already asked for are left out."""
        ids = [h.row_id for h in hits if h.row_id is not None]
        if len(ids) < 2:
            return []
        with lance_errors(self.index.dir):
            found = self.images.take_row_ids(ids).select(["categories"]).to_arrow()
        values = found.column("categories").combine_chunks().flatten()
        if not len(values):
            return []
        table = pa.table({"wnid": values.field("wnid"), "score": values.field("score")})
        grouped = table.group_by("wnid").aggregate([("wnid", "count"), ("score", "sum")])
        labels = dict(zip(values.field("wnid").to_pylist(), values.field("label").to_pylist()))
        rows = [
            (w, n, s)
            for w, n, s in zip(
                grouped.column("wnid").to_pylist(),
                grouped.column("wnid_count").to_pylist(),
                grouped.column("score_sum").to_pylist(),
            )
            if n < len(ids) and w not in exclude
        ]
        rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
        return [
            {"wnid": w, "label": terms.display_name(labels[w] or w), "count": n}
            for w, n, _ in rows[:FACETS]
        ]

    def suggest(self, text: str, limit: int = SUGGESTIONS) -> list[dict]:
        return self.vocabulary.suggest(text, max(1, min(limit, 50)))

    # ----------------------------------------------------------------------------- thumbnails

    def thumbnail_url(self, row_id) -> str | None:
        return None if row_id is None else f"/api/thumbnail/{row_id}?v={self.version}"

    def location(self, row_id: int) -> Location:
        """Where the image of row `row_id` is; NotFound for an id the index does not have."""
        if not 0 <= row_id < 1 << 63:
            raise NotFound(f"no image with id {row_id}")
        columns = ["key", "source", *self.span_columns, "run"]
        with lance_errors(self.index.dir):
            found = self.images.take_row_ids([row_id]).select(columns).to_arrow().to_pylist()
        if not found:
            raise NotFound(f"no image with id {row_id}")
        row = found[0]
        return Location(
            row["key"],
            row["source"],
            row.get("source_offset"),
            row.get("source_length"),
            row.get("run"),
        )

    def thumbnail(self, row_id: int, version: str | None = None) -> bytes:
        """The JPEG thumbnail of row `row_id`; NotFound for an unknown id, one of another version
        of the index, or an image that cannot be read any more (the reason logged)."""
        if version is not None and version != self.version:
            raise NotFound("this thumbnail is from another version of the index: search again")
        at = self.location(row_id)
        try:
            return self.thumbnails.get((self.version, row_id), at)
        except ThumbnailError as e:
            _LOG.warning("no thumbnail for %s: %s", at.key, e)
            raise NotFound(f"no thumbnail for this image: {e}") from None


def _check_k(k) -> int:
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be an integer from 1 to {MAX_K}")
    return k


def _check_filters(within) -> list[str]:
    within = list(dict.fromkeys(within or []))
    if len(within) > MAX_FILTERS:
        raise BadRequest(f"at most {MAX_FILTERS} category filters")
    for wnid in within:
        if not terms.WNID.match(wnid):
            raise BadRequest(f"a category filter is a wnid (n + 8 digits), not {wnid!r}")
    return within
