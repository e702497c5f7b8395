"""Build, append to and open the search index of job outputs (`./run.sh index OUTPUT`).

An index is a directory (LanceDB, embedded, no server) holding:
- `images.lance`: one row per image: `key`, `source`, `source_offset` and `source_length` (where
  its bytes are in `source`'s file, as the results have them; null for results written before
  those columns existed), `run` (the OUTPUT it came from), `vector`
  (`embedding`, or `embedding_reduced` when the results have it, as float32), `categories`
  (`list<struct<wnid, label, score>>`: the results' categories merged with their tags, or the tags
  alone when the results have no `categories` column, e.g. a `--no_categories` run), `wnids` (the
  wnids of `categories`, with a label-list index for tag filters) and `tags` (top-3 tag names, for
  display); plus the vector index of `search/ann.py` once it is big enough;
- `terms.lance`: the tag vocabulary (term -> wnid, label) of `search/terms.py`;
- `index.json`: the settings every run in it must share (embed model sha256, PCA basis sha256,
  vector column and size, precision, image size, resize), the runs indexed, build times and size.

Indexing another OUTPUT appends to the same index (rows whose key is already there are skipped,
so indexing the same OUTPUT twice adds nothing); outputs made with another embed model, PCA basis
or preprocessing are refused with `SearchError`, as their vectors are not comparable.

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
import pyarrow.parquet as pq

from core import claim as claims
from core import storage
from core.atomic import atomic_write
from core.outputs import output_files
from core.schema import SPAN_COLUMNS, category_type
from core.schema import list_type as _list
from search import SearchError, ann, terms

_LOG = logging.getLogger(__name__)

META_FILE = "index.json"
SUMMARY_FILE = "summary.json"  # a job output's commit marker (transforms/outputs.py)
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


def images_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("source_offset", pa.int64()),
            pa.field("source_length", pa.int64()),
            pa.field("run", pa.string()),
            pa.field(ann.VECTOR_COLUMN, _list(pa.float32(), dim)),
            pa.field("wnids", _list(pa.string())),
            pa.field("categories", _list(CATEGORY_TYPE)),
            pa.field("tags", _list(pa.string())),
        ]
    )


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
        raise SearchError(
            f"{output} holds an incomplete run: results without {SUMMARY_FILE} (the run was "
            "killed or failed before it committed, or is still running); rerun the job into it "
            "with --overwrite, then index it"
        )
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
    rows = []
    for tag_row, cat_row in zip(tags.to_pylist(), batch.column("categories").to_pylist()):
        best: dict[str, tuple[float, str]] = {}
        for item in (cat_row or []) + (tag_row or []):
            score = float(item["score"])
            if item["wnid"] not in best or score > best[item["wnid"]][0]:
                best[item["wnid"]] = (score, item["label"])
        rows.append(
            [
                {"wnid": w, "label": lab, "score": s}
                for w, (s, lab) in sorted(best.items(), key=lambda kv: -kv[1][0])
            ]
        )
    return pa.array(rows, _list(CATEGORY_TYPE))


def _vectors(column: pa.Array, dim: int) -> pa.FixedSizeListArray:
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(values), type=_list(pa.float32(), dim))


def index_rows(batch: pa.RecordBatch, settings: dict, run: str) -> pa.RecordBatch:
    """Rows of `images.lance` for one batch of a results file."""
    categories = _categories(batch)
    wnids = pa.ListArray.from_arrays(
        categories.offsets, categories.values.field("wnid"), type=_list(pa.string())
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
            batch.column("key"),
            batch.column("source"),
            *spans,
            pa.array([run] * batch.num_rows, pa.string()),
            _vectors(batch.column(settings["vector_column"]), settings["dim"]),
            wnids,
            categories,
            pa.array(top, _list(pa.string())),
        ],
        schema=images_schema(settings["dim"]),
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


def _read_rows(
    files: list[str], settings: dict, run: str, synsets: set, progress: _Progress
) -> Iterator[pa.RecordBatch]:
    columns = ["key", "source", "tags", settings["vector_column"]]
    if settings["tag_column"] == "categories":
        columns.append("categories")
    for path in files:
        try:
            with storage.open_file(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                spans = [c for c in SPAN_COLUMNS if c in parquet.schema_arrow.names]
                for batch in parquet.iter_batches(READ_BATCH_ROWS, columns=columns + spans):
                    rows = index_rows(batch, settings, run)
                    values = rows.column("categories").values
                    synsets.update(
                        zip(values.field("wnid").to_pylist(), values.field("label").to_pylist())
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


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


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
    reader = pa.RecordBatchReader.from_batches(
        images_schema(settings["dim"]), _read_rows(files, settings, output, synsets, progress)
    )
    if meta is None:
        table = db.create_table(IMAGES, reader, mode="overwrite")
        added = table.count_rows()
    else:
        table = db.open_table(IMAGES)
        _add_span_columns(table)
        indexed = _indexed_run(meta, output)
        if indexed is not None and indexed != run:
            # OUTPUT was replaced by a newer run since it was indexed: its rows go, the new
            # run's come in (changed images get their new vectors, deleted ones disappear).
            replaced = table.count_rows(f"run = {_sql_text(output)}")
            table.delete(f"run = {_sql_text(output)}")
            _LOG.info("replacing the %d rows of the earlier run of %s", replaced, output)
        added = table.merge_insert("key").when_not_matched_insert_all().execute(reader)
        added = added.num_inserted_rows
        synsets.update(_vocabulary_synsets(db))
    db.create_table(VOCABULARY, terms.vocabulary(sorted(synsets)), mode="overwrite")

    rows = table.count_rows()
    vector_index = (meta or {}).get("vector_index")
    if rows >= max(ann_min_rows, ann.MIN_ROWS_PER_PARTITION) and (
        vector_index is None or rows > 2 * vector_index["trained_rows"]
    ):
        _LOG.info("training the vector index on %d vectors of %d-d", rows, settings["dim"])
        vector_index = ann.create_vector_index(table, rows, settings["dim"])
    indices = {i.name for i in table.list_indices()} if rows else {"wnids_idx", "key_idx"}
    if "wnids_idx" not in indices or "key_idx" not in indices:
        import lancedb.index

        if "wnids_idx" not in indices:
            table.create_index("wnids", config=lancedb.index.LabelList())
        # a B-tree over the keys: `--key` and the server's lookups read one page, not the column
        table.create_scalar_index("key", index_type="BTREE")
    elif added:
        table.optimize()  # new rows into the vector and label indexes; small files compacted
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
        "rows": rows,
        "bytes": size,
        "bytes_per_image": round(size / max(rows, 1)),
        "vector_index": vector_index["type"] if vector_index else "none (exact scan)",
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
        rows=rows, bytes=size, bytes_per_image=report["bytes_per_image"], vector_index=vector_index
    )
    _write_meta(index_dir, meta)
    return report


def _add_span_columns(table) -> None:
    """An index built before `source_offset`/`source_length` existed gets them (null: its images
    are found by a scan of their shard) before new rows come in."""
    missing = [name for name in SPAN_COLUMNS if name not in table.schema.names]
    if missing:
        table.add_columns([pa.field(name, pa.int64()) for name in missing])


def _vocabulary_synsets(db) -> list[tuple[str, str]]:
    table = db.open_table(VOCABULARY).to_arrow()
    return list(
        dict.fromkeys(zip(table.column("wnid").to_pylist(), table.column("label").to_pylist()))
    )


# ------------------------------------------------------------------------------------ open


class Index:
    """An opened index: `dir`, `meta` (index.json), `settings`, `images` and `vocabulary` tables."""

    def __init__(self, index_dir: str, meta: dict):
        self.dir, self.meta, self.settings = index_dir, meta, meta["settings"]
        db = connect(index_dir)
        with lance_errors(index_dir):
            self.images = db.open_table(IMAGES)
            self.vocabulary = db.open_table(VOCABULARY)


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
