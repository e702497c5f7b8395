"""Build, append to and open the search index of job outputs (`./run.sh index OUTPUT`).

An index is a directory (LanceDB, embedded, no server) holding:
- `images.lance`: one row per image: `id` (its number in the index, the vector index's entry),
  `key`, `source`, `source_offset` and `source_length` (where its bytes are in `source`'s file, as
  the results have them; null where they do not), `run` (the OUTPUT it came from), `vector`
  (`embedding`, or `embedding_reduced` when the results have it; float16 when the first run's
  embeddings were, else float32), `categories` (`list<struct<wnid, label, score>>`: the results'
  categories merged with their tags, or the tags alone when the results have no `categories`
  column, e.g. a `--no_categories` run), `wnids` (the wnids of `categories`, for tag filters) and
  `tags` (top-3 tag names, for display); with scalar indexes on `id`, `key` (B-trees) and `wnids`
  (label list);
- `vectors.faiss`: the vector index of `search/ann.py`, once the index has `--ann_min_rows` images;
- `terms.lance`: the tag vocabulary (term -> wnid, label) of `search/terms.py`;
- `index.json`: the settings every run in it must share (embed model sha256, PCA basis sha256,
  vector column and size, precision, image size, resize), the runs indexed, build times and size,
  the vector index's settings.

Indexing another OUTPUT appends to the same index (rows whose key is already there are skipped,
so indexing the same OUTPUT twice adds nothing); outputs made with another embed model, PCA basis
or preprocessing are refused with `SearchError`, as their vectors are not comparable. An append
costs time proportional to the rows it adds: they get the next ids, go into the trained vector
index and a new LanceDB fragment; the vector index is trained again, and the table compacted and
its scalar indexes updated, only when the index has doubled since (`ann.RETRAIN_GROWTH`). An index
written before `id` and `vectors.faiss` existed (LanceDB's own IVF-PQ) still answers queries;
appending to it is refused with the command to rebuild it.

Safety (docs/outputs.md): one writer at a time (`core.claim` on the index directory: a second
`index` exits 2 naming the holder); `index.json` written atomically (`core.atomic`), last, after
the tables; a missing or damaged `index.json` next to existing tables, or damaged Lance files, are
`SearchError`s naming the path (never a silent rebuild). Only committed runs are indexed (an
OUTPUT without `summary.json` is refused), and each run is recorded with its `run_id`: indexing an
OUTPUT that a newer run replaced (`--overwrite`) replaces its rows, and an OUTPUT's own index
(`OUTPUT/index/`) refuses searches once the OUTPUT was replaced, until it is indexed again.

Where the index lives: `--index_dir`, else `OUTPUT/index/` for a local OUTPUT, and for a `gs://`
OUTPUT a local directory, `$BIT_CACHE_DIR/index/gs/BUCKET/PATH` (default `~/.cache/bit_tagger/...`):
results are read from Cloud Storage, the index is built on local disk, where queries are fastest.
An explicit `--index_dir gs://...` is passed to LanceDB's own object store (default Google
credentials); that path is not covered by the tests, whose GCS emulator lacks the XML API LanceDB
uses, so it is refused while `STORAGE_EMULATOR_HOST` is set.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import posixpath
import re
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import claim as claims
from core import storage
from core.atomic import atomic_write
from core.outputs import SUMMARY_FILE, incomplete_message, output_files
from core.schema import SPAN_COLUMNS, category_type
from core.schema import list_type as _list
from search import SearchError, ann, terms

_LOG = logging.getLogger(__name__)

META_FILE = "index.json"
IMAGES = "images"
VOCABULARY = "terms"
TOP_TAGS = 3
READ_BATCH_ROWS = 2048
# Runs whose values differ here have incomparable vectors: one index refuses to mix them.
COMPATIBILITY_KEYS = (
    "embed_model_sha256",
    "pca_basis_sha256",
    "vector_column",
    "dim",
    "precision",
    "image_size",
    "resize",
)
CATEGORY_TYPE = category_type()
# Arrow's own list naming (`item`), not the Parquet-compliant `element` of the results: a tag
# filter's literal list is `List(Utf8)`, and only a column of exactly that type lets LanceDB answer
# `array_has_any(wnids, [...])` from the label-list index. Against an `element` list it casts the
# column and scans every row instead (4 ms against 94 ms for 50,000 rows of 60 wnids).
WNIDS_TYPE = pa.list_(pa.string())
# Per row, one int64 a category, in `categories`' order: the wnid's WordNet noun offset in the high
# 32 bits, the float32 bits of its score in the low 32 (scores are >= 0, so the bits order as the
# scores do). A tag query ranks the matching rows by this one numeric list: reading it for the
# rows of a tag took 6 ms where the `categories` structs, labels and all, took 16-22 ms.
CATEGORY_KEYS = "category_keys"
CATEGORY_KEYS_TYPE = pa.list_(pa.int64())


def images_schema(dim: int, vector_type: pa.DataType = pa.float32()) -> pa.Schema:
    return pa.schema(
        [
            pa.field(ann.ID_COLUMN, pa.int64(), nullable=False),
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("source_offset", pa.int64()),
            pa.field("source_length", pa.int64()),
            pa.field("run", pa.string()),
            pa.field(ann.VECTOR_COLUMN, _list(vector_type, dim)),
            pa.field("wnids", WNIDS_TYPE),
            pa.field("categories", _list(CATEGORY_TYPE)),
            pa.field(CATEGORY_KEYS, CATEGORY_KEYS_TYPE),
            pa.field("tags", _list(pa.string())),
        ]
    )


def wnid_offset(wnid: str) -> int:
    """The WordNet noun offset of a wnid (`n02084071` -> 2084071); ValueError for another form."""
    if not terms.WNID.fullmatch(wnid):
        raise ValueError(f"not a WordNet noun id (n + 8 digits): {wnid!r}")
    return int(wnid[1:])


def category_keys(categories: pa.ListArray) -> pa.ListArray:
    """`CATEGORY_KEYS` of `list<struct<wnid, label, score>>` rows (the index's `categories`)."""
    values = categories.flatten()
    wnids = values.field("wnid")
    malformed = pc.invert(pc.match_substring_regex(wnids, terms.WNID.pattern))
    if pc.any(malformed).as_py():
        raise SearchError(
            "a category's wnid is not a WordNet noun id (n + 8 digits): "
            f"{wnids.filter(malformed)[0]}"
        )
    offsets = pc.cast(pc.utf8_slice_codeunits(wnids, 1), pa.int64()).to_numpy()
    scores = values.field("score").cast(pa.float32()).to_numpy(zero_copy_only=False)
    bits = np.ascontiguousarray(scores, np.float32).view(np.uint32).astype(np.int64)
    starts = pc.subtract(categories.offsets, categories.offsets[0])
    packed = pa.array((offsets << 32) | bits)
    return pa.ListArray.from_arrays(starts, packed, type=CATEGORY_KEYS_TYPE)


def split_category_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(WordNet offsets, float32 scores) of `CATEGORY_KEYS` values."""
    keys = np.asarray(keys, np.int64)
    return keys >> 32, (keys & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


# ------------------------------------------------------------------------------- locations


def is_gcs(path: str) -> bool:
    return path.startswith(("gs://", "gcs://"))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_gcs(base) else os.path.join(base, *parts)


def default_index_dir(output: str) -> str:
    """`OUTPUT/index` for a local OUTPUT; a local cache directory for a gs:// one (see above)."""
    output = output.rstrip("/")
    if not is_gcs(output):
        return os.path.join(output, "index")
    cache = os.environ.get("BIT_CACHE_DIR") or os.path.join("~", ".cache", "bit_tagger")
    scheme, rest = output.split("://", 1)
    return os.path.join(os.path.expanduser(cache), "index", "gs", *rest.split("/"))


def results_files(output: str) -> list[str]:
    """The `results-*.parquet` files of a job output (local or gs://), sorted."""
    try:
        return output_files(output)
    except OSError as e:  # StorageUnavailableError, a permission error: not "no results"
        raise SearchError(f"cannot list {output}: {e}") from None


def _exists(path: str) -> bool:
    try:
        return storage.exists(path)
    except OSError as e:
        raise SearchError(f"cannot check {path}: {e}") from None


def run_id(output: str) -> str:
    """The id of the committed run in OUTPUT: its summary.json's `run_id` (a run of an older
    version: `sha256:` of the summary's bytes). `SearchError` when OUTPUT has no summary.json (a
    run that did not commit: its results are not all there) or it cannot be read."""
    path = f"{output}/{SUMMARY_FILE}"
    if not _exists(path):
        raise SearchError(incomplete_message(output, ", then index it"))
    try:
        with storage.open_file(path, "rb") as f:
            data = f.read()
        summary = json.loads(data)
    except OSError as e:
        raise SearchError(f"cannot read {path}: {e}") from None
    except ValueError as e:
        raise SearchError(f"{path} is damaged (not JSON: {e})") from None
    found = summary.get("run_id") if isinstance(summary, dict) else None
    return str(found) if found else "sha256:" + hashlib.sha256(data).hexdigest()


def _has_tables(index_dir: str) -> list[str]:
    return [n for n in (IMAGES, VOCABULARY) if _exists(join(index_dir, f"{n}.lance"))]


def _rebuild_hint(index_dir: str) -> str:
    return (
        f"move {index_dir} away and index the outputs it held again (./run.sh index OUTPUT "
        f"--index_dir {index_dir}; they are the `run` column of its images)"
    )


def read_meta(index_dir: str) -> dict | None:
    """The index's `index.json`, or None when there is no index there. `SearchError` when it is
    missing next to existing tables, or damaged: never read as "no index" (that would rebuild
    the index from one output and lose the others)."""
    path = join(index_dir, META_FILE)
    try:
        if not storage.exists(path):
            tables = _has_tables(index_dir)
            if tables:
                raise SearchError(
                    f"{index_dir} holds {', '.join(t + '.lance' for t in tables)} but no "
                    f"{META_FILE}: the index is damaged; {_rebuild_hint(index_dir)}"
                )
            return None
        with storage.open_file(path, "rb") as f:
            data = f.read()
    except OSError as e:  # StorageUnavailableError, a permission error
        raise SearchError(f"cannot read {path}: {e}") from None
    try:
        meta = json.loads(data)
    except ValueError as e:
        raise SearchError(
            f"{path} is damaged (not JSON: {e}); {_rebuild_hint(index_dir)}"
        ) from None
    settings = meta.get("settings") if isinstance(meta, dict) else None
    if (
        not isinstance(settings, dict)
        or not isinstance(meta.get("runs"), list)
        or any(k not in settings for k in COMPATIBILITY_KEYS)
    ):
        raise SearchError(
            f"{path} is damaged (not the index description this tool writes); "
            f"{_rebuild_hint(index_dir)}"
        )
    return meta


def _write_meta(index_dir: str, meta: dict) -> None:
    """index.json, all or nothing: a crash leaves the previous one or the new one."""
    atomic_write(join(index_dir, META_FILE), json.dumps(meta, indent=1, sort_keys=True).encode())


_LANCE_SOURCE = re.compile(r",\s*/\S+\.rs:\d+:\d+\s*$")


@contextlib.contextmanager
def lance_errors(index_dir: str):
    """Turns LanceDB's errors about damaged files (a truncated `.lance` data file or manifest, a
    missing one) into a one-line `SearchError` naming the index and what to do (a full disk or a
    permission error named as such, not as damage)."""
    try:
        yield
    except (RuntimeError, OSError, ValueError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not ("lance error" in text.lower() or "LanceError" in text or "was not found" in text):
            raise
        text = _LANCE_SOURCE.sub("", text)
        if any(s in text for s in ("No space left on device", "Disk quota exceeded")):
            raise SearchError(f"cannot write the index {index_dir}: {text}") from None
        if any(s in text for s in ("Permission denied", "Read-only file system")):
            raise SearchError(f"cannot read or write the index {index_dir}: {text}") from None
        raise SearchError(
            f"the index {index_dir} is damaged ({text}); {_rebuild_hint(index_dir)}"
        ) from None


@contextlib.contextmanager
def writer_lock(index_dir: str):
    """Holds the index directory's claim (`core.claim`) while the index is written: one writer
    at a time. `SearchError` naming the holder when another `index` holds it."""
    try:
        held = claims.claim(index_dir, "./run.sh index")
    except claims.ClaimedError as e:
        raise SearchError(
            f"{e}; wait for it to finish (indexing into one directory is one run at a time)"
        ) from None
    except claims.ClaimError as e:
        raise SearchError(f"--index_dir {index_dir}: {e}") from None
    with held:
        yield held


def _dir_bytes(index_dir: str) -> int:
    fs, path = storage.get_filesystem(index_dir)
    return int(fs.du(path, total=True))


def connect(index_dir: str):
    """The LanceDB connection of an index directory (local, or gs:// with default credentials)."""
    import lancedb

    if is_gcs(index_dir) and os.environ.get("STORAGE_EMULATOR_HOST"):
        raise SearchError(
            f"--index_dir {index_dir}: LanceDB cannot use the GCS emulator set by "
            "STORAGE_EMULATOR_HOST (it lacks the XML API LanceDB needs); use a local --index_dir"
        )
    return lancedb.connect(index_dir)


# ------------------------------------------------------------------------ run settings


def read_footer(path: str) -> tuple[dict, pa.Schema]:
    """(footer key-value metadata as str -> str, Arrow schema) of one results file."""
    try:
        with storage.open_file(path, "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise SearchError(f"cannot read the results file {path}: {e}") from None
    meta = {
        k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if k != b"ARROW:schema"
    }
    return meta, schema


def run_settings(footer: dict, schema: pa.Schema) -> dict:
    """What an index keeps about a run: the compatibility keys and how to embed a query."""
    names = set(schema.names)
    column = "embedding_reduced" if "embedding_reduced" in names else "embedding"
    if column not in names:
        raise SearchError(f"the results have no {column} column: not a results file of the job")
    resize = footer.get("resize") or (
        "center_crop" if "center_crop" in footer.get("preprocessing", "") else "squash"
    )
    keys = (
        "embed_model",
        "embed_model_sha256",
        "tags_model",
        "tags_model_sha256",
        "precision",
        "image_size",
        "embedding_dtype",
        "pca_basis",
        "pca_basis_sha256",
        "label_set",
    )
    settings = {k: footer.get(k, "") for k in keys}
    settings.update(
        vector_column=column,
        dim=schema.field(column).type.list_size,
        resize=resize,
        tag_column="categories" if "categories" in names else "tags",
    )
    return settings


def check_compatible(index_settings: dict, settings: dict, what: str) -> None:
    """SearchError naming every compatibility key where `settings` differ from the index's."""
    diffs = [
        f"{k} {settings.get(k)!r} (index has {index_settings.get(k)!r})"
        for k in COMPATIBILITY_KEYS
        if str(settings.get(k)) != str(index_settings.get(k))
    ]
    if diffs:
        raise SearchError(
            f"{what} cannot join this index, its vectors are not comparable: " + "; ".join(diffs)
        )


# ---------------------------------------------------------------------- rows of the index


def _categories(batch: pa.RecordBatch) -> pa.ListArray:
    """list<struct<wnid, label, score>> per row: categories merged with tags (max score per wnid,
    best first), or the tags alone when the batch has no categories."""
    tags = batch.column("tags")
    if "categories" not in batch.schema.names:
        values = tags.values
        structs = pa.StructArray.from_arrays(
            [values.field("wnid"), values.field("label"), values.field("score")],
            fields=list(CATEGORY_TYPE),
        )
        return pa.ListArray.from_arrays(tags.offsets, structs, type=_list(CATEGORY_TYPE))
    # Vectorised (a Python loop over the rows was a tenth of the build): every (row, wnid) item of
    # the categories then the tags; per (row, wnid) the best score (the first item among equals),
    # rows sorted by score, ties in the order the wnids first appear.
    parts = [batch.column("categories"), tags]
    rows = np.concatenate([pc.list_parent_indices(p).to_numpy() for p in parts]).astype(np.int64)
    flat = [pc.list_flatten(p) for p in parts]
    wnids = pa.concat_arrays([f.field("wnid") for f in flat])
    labels = pa.concat_arrays([f.field("label") for f in flat])
    scores = pa.concat_arrays([f.field("score").cast(pa.float32()) for f in flat])
    if not len(rows):
        return pa.array([[]] * batch.num_rows, _list(CATEGORY_TYPE))
    codes = pc.dictionary_encode(wnids).indices.to_numpy().astype(np.int64)
    negative = -scores.to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.arange(len(rows))  # categories before tags, each in its row's order
    by_group = np.lexsort((order, negative, codes, rows))
    starts = np.ones(len(by_group), bool)
    starts[1:] = (rows[by_group][1:] != rows[by_group][:-1]) | (
        codes[by_group][1:] != codes[by_group][:-1]
    )
    first_seen = np.minimum.reduceat(order[by_group], np.flatnonzero(starts))
    best = by_group[starts]
    keep = best[np.lexsort((first_seen, negative[best], rows[best]))]
    offsets = np.zeros(batch.num_rows + 1, np.int32)
    np.cumsum(np.bincount(rows[keep], minlength=batch.num_rows), out=offsets[1:])
    take = pa.array(keep)
    structs = pa.StructArray.from_arrays(
        [wnids.take(take), labels.take(take), scores.take(take)], fields=list(CATEGORY_TYPE)
    )
    return pa.ListArray.from_arrays(pa.array(offsets), structs, type=_list(CATEGORY_TYPE))


def vector_type(settings: dict) -> pa.DataType:
    """How a new index stores vectors: float16 for float16 embeddings (half the disk, and exact:
    they are the job's values), else float32."""
    if settings["vector_column"] == "embedding" and settings.get("embedding_dtype") == "float16":
        return pa.float16()
    return pa.float32()


def _vectors(column: pa.Array, dim: int, value_type: pa.DataType) -> pa.FixedSizeListArray:
    values = column.flatten()
    if values.type != value_type:
        values = pa.array(
            values.to_numpy(zero_copy_only=False).astype(value_type.to_pandas_dtype())
        )
    return pa.FixedSizeListArray.from_arrays(values, type=_list(value_type, dim))


def index_rows(
    batch: pa.RecordBatch,
    settings: dict,
    run: str,
    first_id: int = 0,
    value_type: pa.DataType = pa.float32(),
) -> pa.RecordBatch:
    """Rows of `images.lance` for one batch of a results file, numbered from `first_id`."""
    categories = _categories(batch)
    wnids = pa.ListArray.from_arrays(
        categories.offsets, categories.values.field("wnid"), type=WNIDS_TYPE
    )
    top = [
        [terms.display_name(t["label"]) for t in (row or [])[:TOP_TAGS]]
        for row in batch.column("tags").to_pylist()
    ]
    spans = [
        batch.column(name) if name in batch.schema.names else pa.nulls(batch.num_rows, pa.int64())
        for name in SPAN_COLUMNS
    ]
    return pa.record_batch(
        [
            pa.array(np.arange(first_id, first_id + batch.num_rows, dtype=np.int64)),
            batch.column("key"),
            batch.column("source"),
            *spans,
            pa.array([run] * batch.num_rows, pa.string()),
            _vectors(batch.column(settings["vector_column"]), settings["dim"], value_type),
            wnids,
            categories,
            category_keys(categories),
            pa.array(top, _list(pa.string())),
        ],
        schema=images_schema(settings["dim"], value_type),
    )


class _Progress:
    """Logs images read and the rate every `every_secs` seconds, and counts what was read."""

    def __init__(self, total_files: int, every_secs: float):
        self.total_files, self.every = total_files, every_secs
        self.files = self.rows = 0
        self.start = self.last = time.monotonic()

    def update(self, rows: int = 0, files: int = 0) -> None:
        self.rows += rows
        self.files += files
        now = time.monotonic()
        if self.every and (now - self.last >= self.every or self.files == self.total_files):
            self.last = now
            rate = self.rows / max(now - self.start, 1e-9)
            _LOG.info(
                "indexing: %d/%d files, %d images read (%.0f images/s)",
                self.files,
                self.total_files,
                self.rows,
                rate,
            )


@contextlib.contextmanager
def _parquet_file(path: str) -> Iterator[pq.ParquetFile]:
    """A results file: a local one read by Arrow itself, memory-mapped (a quarter faster than
    through a Python file object: the embeddings are most of the bytes); gs:// via core.storage."""
    if is_gcs(path):
        with storage.open_file(path, "rb") as f:
            yield pq.ParquetFile(f)
    else:
        with pq.ParquetFile(path, memory_map=True) as reader:
            yield reader


def _read_rows(
    files: list[str],
    settings: dict,
    run: str,
    synsets: set,
    progress: _Progress,
    first_id: int,
    value_type: pa.DataType,
) -> Iterator[pa.RecordBatch]:
    columns = ["key", "source", "tags", settings["vector_column"]]
    if settings["tag_column"] == "categories":
        columns.append("categories")
    next_id = first_id
    for path in files:
        try:
            with _parquet_file(path) as reader:
                spans = [c for c in SPAN_COLUMNS if c in reader.schema_arrow.names]
                for batch in reader.iter_batches(READ_BATCH_ROWS, columns=columns + spans):
                    rows = index_rows(batch, settings, run, next_id, value_type)
                    next_id += rows.num_rows
                    values = rows.column("categories").values
                    pairs = pa.table([values.field("wnid"), values.field("label")], ["w", "l"])
                    pairs = pairs.group_by(["w", "l"], use_threads=False).aggregate([])
                    synsets.update(
                        zip(pairs.column("w").to_pylist(), pairs.column("l").to_pylist())
                    )
                    progress.update(rows=rows.num_rows)
                    yield rows
        except (OSError, pa.ArrowException) as e:
            raise SearchError(f"cannot read the results file {path}: {e}") from None
        progress.update(files=1)


# ----------------------------------------------------------------------------------- build


def build_index(
    output: str,
    index_dir: str | None = None,
    *,
    ann_min_rows: int = ann.ANN_MIN_ROWS,
    log_every_secs: float = 10.0,
) -> dict:
    """Index (or append) OUTPUT's results; returns what was done (also logged and kept in
    `index.json`): rows read and added, seconds, total rows, bytes per image, vector index."""
    started = time.monotonic()
    output = output.rstrip("/")
    if not is_gcs(output):
        output = os.path.abspath(os.path.expanduser(output))
    index_dir = (index_dir or default_index_dir(output)).rstrip("/")
    if is_gcs(index_dir):
        connect(index_dir)  # refused against the emulator before anything is claimed
    files = results_files(output)
    if not files:
        raise SearchError(f"no results-*.parquet in {output}: is it the --output of a job run?")
    with writer_lock(index_dir), lance_errors(index_dir):
        return _build(output, index_dir, files, ann_min_rows, log_every_secs, started)


def _indexed_run(meta: dict | None, output: str) -> str | None:
    """The run id of OUTPUT as last indexed ("" for an index older than run ids), or None."""
    runs = [r for r in (meta or {}).get("runs", []) if r.get("output") == output]
    return str(runs[-1].get("run_id") or "") if runs else None


def _build(output, index_dir, files, ann_min_rows, log_every_secs, started) -> dict:
    """build_index's work, while holding the index's writer lock."""
    run = run_id(output)
    settings = None
    for path in files:
        footer, schema = read_footer(path)
        file_settings = run_settings(footer, schema)
        if settings is None:
            settings = file_settings
        else:
            check_compatible(settings, file_settings, path)
    meta = read_meta(index_dir)
    if meta is not None:
        check_compatible(meta["settings"], settings, output)
    db = connect(index_dir)

    synsets: set = set()
    progress = _Progress(len(files), log_every_secs)
    if meta is None:
        value_type, first_id = vector_type(settings), 0
    else:
        table = db.open_table(IMAGES)
        _check_appendable(table, meta, index_dir)
        value_type = table.schema.field(ann.VECTOR_COLUMN).type.value_type
        first_id = _next_id(table, meta.get("next_id", 0))
    reader = pa.RecordBatchReader.from_batches(
        images_schema(settings["dim"], value_type),
        _read_rows(files, settings, output, synsets, progress, first_id, value_type),
    )
    if meta is None:
        table = db.create_table(IMAGES, reader, mode="overwrite")
        added = table.count_rows()
    else:
        indexed = _indexed_run(meta, output)
        if indexed is not None and indexed != run:
            # OUTPUT was replaced by a newer run since it was indexed: its rows go, the new
            # run's come in (changed images get their new vectors, deleted ones disappear; the
            # vector index drops their ids as it catches up).
            replaced = table.count_rows(f"run = {terms.sql_text(output)}")
            table.delete(f"run = {terms.sql_text(output)}")
            _LOG.info("replacing the %d rows of the earlier run of %s", replaced, output)
        # Keys already indexed are skipped (the key index makes that a lookup per new row).
        added = table.merge_insert("key").when_not_matched_insert_all().execute(reader)
        added = added.num_inserted_rows
        synsets.update(_vocabulary_synsets(db))
    db.create_table(VOCABULARY, terms.vocabulary(sorted(synsets)), mode="overwrite")
    written = time.monotonic()

    rows = table.count_rows()
    vector_index, trained, optimized_rows = _update_indexes(
        table, index_dir, meta or {}, settings["dim"], rows, added, ann_min_rows
    )
    if run_id(output) != run:
        raise SearchError(
            f"{output} was replaced by a new run while it was indexed; index it again"
        )
    seconds = time.monotonic() - started
    size = _dir_bytes(index_dir)
    report = {
        "output": output,
        "index_dir": index_dir,
        "files": len(files),
        "rows_read": progress.rows,
        "rows_added": added,
        "seconds": round(seconds, 2),
        "write_seconds": round(written - started, 2),
        "rows": rows,
        "bytes": size,
        "bytes_per_image": round(size / max(rows, 1)),
        "vector_index": vector_index["type"] if vector_index else "none (exact scan)",
        "vector_index_trained": trained,
        "indexed_at": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    meta = meta or {"settings": settings, "runs": []}
    meta["runs"].append(
        {
            **{
                k: report[k]
                for k in ("output", "files", "rows_read", "rows_added", "seconds", "indexed_at")
            },
            "tag_column": settings["tag_column"],
            "run_id": run,
        }
    )
    meta.update(
        rows=rows,
        bytes=size,
        bytes_per_image=report["bytes_per_image"],
        vector_index=vector_index,
        next_id=first_id + progress.rows,
        optimized_rows=optimized_rows,
    )
    _write_meta(index_dir, meta)
    return report


def _check_appendable(table, meta: dict, index_dir: str) -> None:
    """SearchError for an index written before rows had an `id` and source offsets (and LanceDB's
    IVF-PQ was the vector index): it can be searched, but not appended to."""
    names = table.schema.names
    if (
        ann.ID_COLUMN in names
        and all(c in names for c in SPAN_COLUMNS)
        and table.schema.field("wnids").type == WNIDS_TYPE
        and CATEGORY_KEYS in names
    ):
        return
    runs = list(dict.fromkeys(r["output"] for r in meta.get("runs", [])))
    raise SearchError(
        f"the index {index_dir} was built by an earlier version of ./run.sh index (no row ids or "
        "source offsets, LanceDB's own vector index): it can still be searched, but not appended "
        f"to. Rebuild it into a new --index_dir by indexing its runs again: {' '.join(runs)}"
    )


def _next_id(table, hint: int) -> int:
    """The first unused row id: `hint` (index.json's), or past any row an interrupted build
    wrote after it."""
    found = table.search().where(f"{ann.ID_COLUMN} >= {int(hint)}").select([ann.ID_COLUMN])
    ids = found.limit(None).to_arrow().column(ann.ID_COLUMN).to_numpy()
    return max(int(hint), int(ids.max()) + 1 if len(ids) else 0)


def _update_indexes(
    table, index_dir: str, meta: dict, dim: int, rows: int, added: int, ann_min_rows: int
) -> tuple[dict | None, bool, int]:
    """Bring the vector index and the scalar indexes up to date after rows were added; returns
    (the vector index's settings for index.json, whether it was trained now, rows at the last
    compaction).

    - Vector index: trained on all rows when `ann.retrain_due` (first time past `ann_min_rows`,
      or the table has doubled since) or when `vectors.faiss` is damaged, else `ann.catch_up`
      adds the new rows to it (and removes deleted ones).
    - Scalar indexes (`id`, `key`: B-tree; `wnids`: label list) are created with the first rows.
      LanceDB's `optimize` (compaction, which rewrites small fragments, and the scalar indexes'
      update) runs only when the table has doubled since the last one: on every append it would
      rewrite up to a million rows. Until then new rows sit in their own fragments and are
      scanned, not looked up, by filters."""
    import lancedb.index

    vector_index = meta.get("vector_index")
    if not meta:
        _remove_stale_vector_index(index_dir)
    vectors = None
    trained = ann.retrain_due(rows, vector_index, ann_min_rows)
    if not trained and vector_index and vector_index.get("type") == ann.INDEX_TYPE:
        try:
            vectors = load_vectors(index_dir, vector_index, writable=True)
        except ann.DamagedIndexError as e:
            _LOG.warning("%s; training it again", e)
            trained = True
    if trained:
        _LOG.info("training the vector index on %d vectors of %d-d", rows, dim)
        vectors = ann.train(table, dim, log=_LOG.info)
        _save_vectors(vectors, index_dir)
        vector_index = vectors.settings
    elif vectors is not None:
        added_rows, removed = ann.catch_up(vectors, table)
        if added_rows or removed:
            _save_vectors(vectors, index_dir)
        _LOG.info(
            "vector index: %d rows added, %d removed (trained on %d rows; trained again from %d)",
            added_rows,
            removed,
            vector_index["trained_rows"],
            ann.RETRAIN_GROWTH * vector_index["trained_rows"],
        )
    optimized_rows = meta.get("optimized_rows", 0)
    existing = {i.name for i in table.list_indices()}
    if rows and "wnids_idx" not in existing:
        table.create_index("wnids", config=lancedb.index.LabelList())
        table.create_index(ann.ID_COLUMN, config=lancedb.index.BTree())
        table.create_index("key", config=lancedb.index.BTree())
        optimized_rows = rows
    elif added and rows >= ann.RETRAIN_GROWTH * optimized_rows:
        table.optimize()
        optimized_rows = rows
    return vector_index, trained, optimized_rows


def load_vectors(index_dir: str, settings: dict, writable: bool = False) -> ann.VectorIndex:
    """The index's `vectors.faiss` (memory-mapped for queries on a local directory; gs://: read
    whole through core.storage); `ann.DamagedIndexError` when it is missing or unreadable."""
    path = join(index_dir, ann.INDEX_FILE)
    if not is_gcs(index_dir):
        return ann.VectorIndex.load(path, settings, writable)
    try:
        with storage.open_file(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ann.DamagedIndexError(path, f"{type(e).__name__}: {e}") from None
    return ann.VectorIndex.from_bytes(data, settings, path)


def _save_vectors(vectors: ann.VectorIndex, index_dir: str) -> None:
    """`vectors.faiss`, replaced all or nothing (`core.atomic`: temp file + fsync + rename, or
    one object upload on gs://)."""
    atomic_write(join(index_dir, ann.INDEX_FILE), vectors.to_bytes())


def _remove_stale_vector_index(index_dir: str) -> None:
    """A `vectors.faiss` without an index.json is left from an interrupted first build."""
    path = join(index_dir, ann.INDEX_FILE)
    try:
        if storage.exists(path):
            fs, fs_path = storage.get_filesystem(path)
            fs.rm(fs_path)
    except storage.StorageUnavailableError as e:
        raise SearchError(str(e)) from None


def _vocabulary_synsets(db) -> list[tuple[str, str]]:
    table = db.open_table(VOCABULARY).to_arrow()
    return list(
        dict.fromkeys(zip(table.column("wnid").to_pylist(), table.column("label").to_pylist()))
    )


# ------------------------------------------------------------------------------------ open


class Index:
    """An opened index: `dir`, `meta` (index.json), `settings`, `images` and `vocabulary` tables,
    `vectors` (the vector index)."""

    def __init__(self, index_dir: str, meta: dict):
        self.dir, self.meta, self.settings = index_dir, meta, meta["settings"]
        db = connect(index_dir)
        with lance_errors(index_dir):
            self.images = db.open_table(IMAGES)
            self.vocabulary = db.open_table(VOCABULARY)
        self._vectors = False

    @property
    def vectors(self) -> ann.VectorIndex | None:
        """The vector index (`vectors.faiss`, memory-mapped, opened on first use); None below
        `--ann_min_rows` and for an index from before it existed (LanceDB searches those)."""
        if self._vectors is False:
            settings = self.meta.get("vector_index")
            self._vectors = None
            if settings and settings.get("type") == ann.INDEX_TYPE:
                self._vectors = load_vectors(self.dir, settings)
        return self._vectors


def check_current(index_dir: str, meta: dict) -> None:
    """`SearchError` when the OUTPUT whose own index this is (`default_index_dir(OUTPUT)`) no
    longer holds the run that was indexed (an `--overwrite` replaced it, or is replacing it): its
    changed and deleted images must not be served from the old rows. One summary.json read;
    indexes that gather other outputs are brought up to date by indexing those again."""
    latest = {}
    for entry in meta.get("runs", []):
        latest[entry.get("output")] = entry
    for output, entry in latest.items():
        if not output or default_index_dir(output).rstrip("/") != index_dir.rstrip("/"):
            continue
        recorded = entry.get("run_id")
        if not recorded:
            continue  # indexed before runs had ids: cannot tell
        try:
            current = run_id(output)
        except SearchError:
            current = None  # no committed run there now
        if current != recorded:
            raise SearchError(
                f"the index {index_dir} is out of date: {output} was replaced by another run "
                f"(--overwrite) after it was indexed; run ./run.sh index {output} to update it"
            )


def open_index(index_or_output: str) -> Index:
    """The index at INDEX_OR_OUTPUT, or at the default index directory of that OUTPUT."""
    path = index_or_output.rstrip("/")
    candidates = [path, default_index_dir(path)]
    if is_gcs(path):  # a gs:// OUTPUT's index is local by default: look there first
        candidates.reverse()
    for candidate in dict.fromkeys(candidates):
        meta = read_meta(candidate)
        if meta is not None:
            check_current(candidate, meta)
            return Index(candidate, meta)
    raise SearchError(
        f"no index at {path} (nor at {default_index_dir(path)}): "
        f"build one with ./run.sh index OUTPUT"
    )
