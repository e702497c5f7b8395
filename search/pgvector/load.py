"""Load a job OUTPUT into a PostgreSQL + pgvector table (`./run.sh load OUTPUT --into DSN`).

The table (default `images`), created if missing:

| column | type | from the results |
| --- | --- | --- |
| `key` | `text` primary key | `key` |
| `source`, `width`, `height` | `text`, `integer` | as they are |
| `tags` | `jsonb` | `tags` (`[{index, wnid, label, score}, ...]`) |
| `categories` | `text[]` (GIN index) | wnids of `categories` merged with `tags`, best score first |
| `category_scores` | `real[]` | their scores, aligned with `categories` |
| `embedding` | `vector(D)`, `halfvec(D)` for a float16 output | `embedding` |
| `embedding_reduced` | `vector(N)` | `embedding_reduced`, when the run had a `--pca_basis` |
| `run` | `text` | the OUTPUT that last inserted or changed the row |
| `loaded_at` | `timestamptz` | when that happened |

Each vector column gets the HNSW index `db.VectorColumn` says (cosine, or Hamming on
`binary_quantize` above the index limits). `TABLE_runs` records every load (output, counts,
seconds) and the run settings of the first one: outputs whose vectors are not comparable (another
embed model, PCA basis, precision, image size or resize; `search.index.COMPATIBILITY_KEYS`) are
refused, as by `./run.sh index`.

Loading upserts by key: a new key is inserted, a key whose row differs (any column but `run`) is
updated, an identical row is left alone (no write at all). So loading the same OUTPUT again
changes nothing, and the next night's OUTPUT adds its new keys and updates the changed ones; keys
absent from an OUTPUT are kept. Each row group of a results file is sent by binary COPY into a
temporary staging table, then merged (`INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE ... IS
DISTINCT FROM ...`) and committed: memory stays flat in the output's size, and a load that stops
halfway keeps what it committed (running it again finishes it). Indexes missing at the start of a
load are built after its rows are in (much faster than growing them row by row); existing ones are
maintained by the inserts. Loads into one table are serialised by an advisory lock.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from search import SearchError
from search import index as local_index
from search.pgvector import copy, db

_LOG = logging.getLogger(__name__)

BATCH_ROWS = 10_000  # rows a transaction (one COPY into the staging table, one upsert, a commit)
READ_ROWS = 1024  # rows read and encoded at a time: the client's memory
INDEX_MEMORY = "1GB"  # maintenance_work_mem for the HNSW builds (a limit, not a reservation)
SCALAR_COLUMNS = [
    ("key", "text"),
    ("source", "text"),
    ("width", "integer"),
    ("height", "integer"),
    ("tags", "jsonb"),
    ("categories", "text[]"),
    ("category_scores", "real[]"),
]
REQUIRED = ("key", "source", "width", "height", "tags", "embedding")
VECTOR_COLUMNS = ("embedding", "embedding_reduced")
_VECTOR_TYPES = {pa.float32(): "vector", pa.float16(): "halfvec"}


# --------------------------------------------------------------------------- what to load


def vector_columns_of(schema: pa.Schema, path: str) -> list[db.VectorColumn]:
    """The vector columns a results file's schema asks for; SearchError if it cannot load."""

    def refuse(reason: str) -> SearchError:
        return SearchError(f"{path}: cannot load this results file: {reason}")

    for name in REQUIRED:
        if name not in schema.names:
            raise refuse(f"no {name} column (not a results file of the job?)")
    for name, is_type, what in (
        ("key", pa.types.is_string, "a string"),
        ("source", pa.types.is_string, "a string"),
        ("width", pa.types.is_integer, "an integer"),
        ("height", pa.types.is_integer, "an integer"),
    ):
        if not is_type(schema.field(name).type):
            raise refuse(f"{name} is {schema.field(name).type}, not {what}")
    for name in ("tags", "categories"):
        if name not in schema.names:
            continue
        type_ = schema.field(name).type
        item = type_.value_type if pa.types.is_list(type_) else None
        if (
            item is None
            or not pa.types.is_struct(item)
            or not {"wnid", "label", "score"} <= {f.name for f in item}
        ):
            raise refuse(f"{name} is {type_}, not a list of structs with wnid, label and score")
    columns = []
    for name in VECTOR_COLUMNS:
        if name not in schema.names:
            continue
        type_ = schema.field(name).type
        if not pa.types.is_fixed_size_list(type_) or type_.value_type not in _VECTOR_TYPES:
            raise refuse(f"{name} is {type_}, not a fixed-size list of float32 or float16")
        if not 1 <= type_.list_size <= db.MAX_DIMS:
            raise refuse(
                f"{name} has {type_.list_size} dimensions; pgvector stores 1 to {db.MAX_DIMS:,}"
            )
        columns.append(db.VectorColumn(name, _VECTOR_TYPES[type_.value_type], type_.list_size))
    return columns


def plan(output: str) -> tuple[list[str], dict, list[db.VectorColumn]]:
    """(results files, run settings, vector columns) of OUTPUT; every file must agree."""
    files = local_index.results_files(output)
    if not files:
        raise SearchError(f"no results-*.parquet in {output}: is it the --output of a job run?")
    settings = columns = None
    for path in files:
        try:
            footer, schema = local_index.read_footer(path)
        except (OSError, pa.ArrowException) as e:
            raise SearchError(f"{path}: not a readable Parquet file ({e})") from None
        file_columns = vector_columns_of(schema, path)
        file_settings = local_index.run_settings(footer, schema)
        if settings is None:
            settings, columns = file_settings, file_columns
        else:
            local_index.check_compatible(settings, file_settings, path)
            if file_columns != columns:
                raise SearchError(f"{path}: its vector columns differ from {files[0]}'s")
    return files, settings, columns


# ----------------------------------------------------------------------------- encoding


def _text(value: str | None) -> bytes:
    return copy.NULL if value is None else copy.field(value.encode())


def _json(tags: list | None, key: str, path: str) -> str | None:
    try:
        return None if tags is None else json.dumps(tags, separators=(",", ":"), allow_nan=False)
    except ValueError:  # jsonb has no NaN
        raise SearchError(
            f"{path}: the tags of key {key!r} hold a score that is not finite; rows before it "
            "are loaded"
        ) from None


def _matrix(column: pa.Array, vector: db.VectorColumn, keys: list, path: str) -> np.ndarray:
    if column.null_count:
        key = keys[column.is_null().to_pylist().index(True)]
        raise SearchError(f"{path}: the row of key {key!r} has no {vector.name}")
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), vector.dim)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        key = keys[int(np.argmin(finite))]
        raise SearchError(
            f"{path}: the {vector.name} of key {key!r} is not finite (NaN or infinite), which "
            "pgvector cannot store; rows before it are loaded"
        )
    return matrix


def _items(column: pa.ListArray) -> tuple[np.ndarray, pa.StructArray]:
    """(row number of each item, the items) of a list column, slicing accounted for."""
    offsets = column.offsets.to_numpy()
    items = column.values.slice(offsets[0], offsets[-1] - offsets[0])
    return np.repeat(np.arange(len(column)), np.diff(offsets)), items


def merged_categories(batch: pa.RecordBatch) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(offsets [rows + 1], wnids, scores) of each row's categories merged with its tags: one
    entry per wnid with its best score, best first, ties in order of first appearance
    (categories, then tags) -- what `./run.sh index` stores (`search.index._categories`), here
    vectorised: the per-row Python of that one would dominate a load's time."""
    columns = [batch.column(c) for c in ("categories", "tags") if c in batch.schema.names]
    rows, wnids, scores = [], [], []
    for column in columns:
        row, items = _items(column)
        rows.append(row)
        wnids.append(items.field("wnid"))
        scores.append(items.field("score").to_numpy(zero_copy_only=False).astype(np.float32))
    rows, scores = np.concatenate(rows), np.concatenate(scores)
    order = np.arange(len(rows))  # position: a row's categories come before its tags
    encoded = pa.concat_arrays(wnids).dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    # The best item of each (row, wnid), and where that wnid first appeared in the row.
    by_group = np.lexsort((order, -scores, codes, rows))
    starts = np.ones(len(by_group), bool)
    starts[1:] = np.diff(rows[by_group]) != 0
    starts[1:] |= np.diff(codes[by_group]) != 0
    best = by_group[starts]
    first_seen = np.minimum.reduceat(order[by_group], np.flatnonzero(starts)) if len(best) else best
    kept = best[np.lexsort((first_seen, -scores[best], rows[best]))]
    offsets = np.searchsorted(rows[kept], np.arange(batch.num_rows + 1))
    return offsets, encoded.dictionary.take(pa.array(codes[kept])).to_pylist(), scores[kept]


def encode(batch: pa.RecordBatch, vectors: list[db.VectorColumn], path: str) -> bytearray:
    """The binary COPY tuples of one batch of a results file, in `copy_columns` order."""
    keys = batch.column("key").to_pylist()
    if None in keys:
        raise SearchError(f"{path}: a row has no key")
    tags = [_json(row, key, path) for row, key in zip(batch.column("tags").to_pylist(), keys)]
    offsets, wnids, scores = merged_categories(batch)
    fields = [
        [copy.field(k.encode()) for k in keys],
        [_text(s) for s in batch.column("source").to_pylist()],
        [copy.int4(w) for w in batch.column("width").to_pylist()],
        [copy.int4(h) for h in batch.column("height").to_pylist()],
        [copy.jsonb(t) for t in tags],
        [copy.text_array(wnids[a:b]) for a, b in zip(offsets[:-1], offsets[1:])],
        [copy.real_array(scores[a:b]) for a, b in zip(offsets[:-1], offsets[1:])],
    ]
    matrices = [(_matrix(batch.column(v.name), v, keys, path), v.type) for v in vectors]
    return copy.tuples(fields, matrices)


def _unique(batch: pa.RecordBatch, seen: set, path: str) -> pa.RecordBatch:
    """The batch without keys already staged in this transaction (the job writes each key once;
    one INSERT ... ON CONFLICT DO UPDATE may not meet a key twice)."""
    keys = batch.column("key").to_pylist()
    first = [k not in seen and not seen.add(k) for k in keys]
    if not all(first):
        _LOG.warning("%s: %d repeated keys skipped (first kept)", path, first.count(False))
        batch = batch.filter(pa.array(first))
    return batch


# ------------------------------------------------------------------------------ the table


def copy_columns(vectors: list[db.VectorColumn]) -> list[tuple[str, str]]:
    """(name, SQL type) of the columns a load sends, in COPY order."""
    return SCALAR_COLUMNS + [(v.name, v.sql_type) for v in vectors]


def create_table(conn: psycopg.Connection, table: str, vectors: list[db.VectorColumn]) -> None:
    """The table and its run log, if missing (indexes come after the rows: `_build_indexes`)."""
    columns = [f"{name} {type_}" for name, type_ in copy_columns(vectors)]
    columns[0] += " PRIMARY KEY"
    columns += ["run text NOT NULL", "loaded_at timestamptz NOT NULL DEFAULT now()"]
    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(columns)})")
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {db.runs_table(table)} (
              id bigserial PRIMARY KEY, output text NOT NULL,
              loaded_at timestamptz NOT NULL DEFAULT now(), files integer, rows_read bigint,
              inserted bigint, updated bigint, unchanged bigint, seconds real,
              settings jsonb NOT NULL)"""
    )


def check_table(
    conn: psycopg.Connection, table: str, vectors: list[db.VectorColumn], settings: dict, what: str
) -> None:
    """SearchError unless the existing table takes these vectors and these run settings."""
    have = db.vector_columns(conn, table)
    for vector in vectors:
        found = have.get(vector.name)
        if found != vector:
            held = found.sql_type if found else "no such column"
            raise SearchError(
                f"table {table} cannot take {what}: its {vector.name} is {vector.sql_type}, the "
                f"table's is {held}; load it into another --table"
            )
    missing = sorted(set(have) - {v.name for v in vectors})
    if missing:
        raise SearchError(
            f"table {table} cannot take {what}: it has no {', '.join(missing)} (the table has)"
        )
    first = conn.execute(
        f"SELECT settings FROM {db.runs_table(table)} ORDER BY id LIMIT 1"
    ).fetchone()
    if first is not None:
        local_index.check_compatible(first[0], settings, what)


def missing_indexes(conn: psycopg.Connection, table: str, vectors) -> dict[str, str]:
    """{index name: CREATE INDEX} of the indexes the table lacks."""
    schema = table.rsplit(".", 1)[0] + "." if "." in table else ""
    wanted = {v.index_name(table): v.create_index(table) for v in vectors}
    gin = f"{db.bare_name(table)}_categories_gin"
    wanted[gin] = f"CREATE INDEX IF NOT EXISTS {gin} ON {table} USING gin (categories)"
    return {
        name: ddl
        for name, ddl in wanted.items()
        if not conn.execute("SELECT to_regclass(%s) IS NOT NULL", [schema + name]).fetchone()[0]
    }


def _upsert_sql(table: str, columns: list[str], staging: str) -> str:
    names = ", ".join(columns)
    changed = columns[1:]
    return f"""
        WITH upserted AS (
          INSERT INTO {table} AS t ({names}, run)
          SELECT {names}, %(run)s FROM {staging}
          ON CONFLICT (key) DO UPDATE
            SET {", ".join(f"{c} = EXCLUDED.{c}" for c in changed)},
                run = EXCLUDED.run, loaded_at = now()
            WHERE ({", ".join(f"t.{c}" for c in changed)})
                  IS DISTINCT FROM ({", ".join(f"EXCLUDED.{c}" for c in changed)})
          RETURNING (xmax = 0) AS inserted)
        SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
        FROM upserted"""


def _lock(conn: psycopg.Connection, table: str) -> None:
    """One load at a time into `table` (a session advisory lock, released when the load ends)."""
    key = f"bit-tagger:load:{table}"
    if not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [key]).fetchone()[0]:
        _LOG.info("another load into %s is running: waiting for it to finish", table)
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [key])
    conn.commit()


def _unlock(conn: psycopg.Connection) -> None:
    """Release the lock now (closing would too, but a backend exits a moment after its client)."""
    try:
        conn.rollback()
        conn.execute("SELECT pg_advisory_unlock_all()")
        conn.commit()
    except psycopg.Error:
        pass  # the connection is gone: so is the lock


# ----------------------------------------------------------------------------------- load


def load_output(
    output: str,
    dsn: str,
    table: str = "images",
    *,
    batch_rows: int = BATCH_ROWS,
    index_memory: str = INDEX_MEMORY,
    log_every_secs: float = 10.0,
) -> dict:
    """Upsert OUTPUT's results (local or gs://) into `table` at `dsn`; create the table and its
    indexes if missing. Returns the report: files, rows_read, inserted, updated, unchanged, rows
    (in the table), seconds, load_seconds, index_seconds ({index: s}), rows_per_second, columns
    ({column: how it is indexed}), pgvector version. SearchError (one line, no password) for a
    bad OUTPUT, a results file it cannot load, or a server it cannot reach or that refuses."""
    started = time.monotonic()
    table = db.check_table_name(table)
    if batch_rows < 1:
        raise SearchError("--batch_rows must be at least 1")
    output = output.rstrip("/")
    if not local_index.is_gcs(output):
        output = os.path.abspath(os.path.expanduser(output))
    files, settings, vectors = plan(output)
    where = db.describe(dsn)
    conn = db.connect(dsn)
    doing = "connecting"
    try:
        version = db.require_pgvector(conn, dsn)
        doing = f"setting maintenance_work_mem to --index_memory {index_memory!r}"
        conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", [index_memory])
        conn.commit()
        doing = f"waiting for the lock of {table}"
        _lock(conn, table)
        doing = f"creating table {table}"
        with conn.transaction():
            create_table(conn, table, vectors)
        check_table(conn, table, vectors, settings, output)
        doing = f"loading {output} into {table}"
        counts = _load_rows(conn, table, files, vectors, output, batch_rows, log_every_secs)
        load_seconds = time.monotonic() - started
        doing = f"building the indexes of {table}"
        index_seconds = _build_indexes(conn, table, vectors)
        if counts["inserted"] or counts["updated"] or index_seconds:
            conn.execute(f"ANALYZE {table}")  # the planner's statistics for the tag filters
        rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        seconds = time.monotonic() - started
        conn.execute(
            f"""INSERT INTO {db.runs_table(table)} (output, files, rows_read, inserted, updated,
                  unchanged, seconds, settings) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
            [output, len(files), counts["rows_read"], counts["inserted"], counts["updated"],
             counts["unchanged"], round(seconds, 2), psycopg.types.json.Jsonb(settings)],
        )  # fmt: skip
        conn.commit()
        iterative = conn.execute("SELECT current_setting('hnsw.iterative_scan', true)").fetchone()
    except db.REFUSALS as e:
        raise db.server_error(e, dsn, doing) from None
    finally:
        _unlock(conn)
        conn.close()
    return {
        "output": output,
        "table": table,
        "server": where,
        "files": len(files),
        **counts,
        "rows": rows,
        "seconds": round(seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "rows_per_second": round(counts["rows_read"] / max(load_seconds, 1e-9), 1),
        "index_seconds": index_seconds,
        "columns": {v.name: f"{v.sql_type}, {v.kind}" for v in vectors},
        "pgvector": version,
        "iterative_scan": iterative[0] if iterative else None,
    }


def _batches(files: list[str], vectors: list[db.VectorColumn], read_rows: int):
    """(path, record batch) of every results file in turn, `read_rows` rows at a time."""
    names = ["key", "source", "width", "height", "tags"] + [v.name for v in vectors]
    for path in files:
        with storage.open_file(path, "rb") as f:
            results = pq.ParquetFile(f)
            read = names + (["categories"] if "categories" in results.schema_arrow.names else [])
            for batch in results.iter_batches(read_rows, columns=read):
                yield path, batch


def _load_rows(conn, table, files, vectors, output, batch_rows, log_every_secs) -> dict:
    """Upsert every row, `batch_rows` rows a transaction: one COPY into the staging table fed
    batch by batch (client memory: one read batch), one INSERT ... ON CONFLICT, one commit."""
    columns = copy_columns(vectors)
    names = [name for name, _ in columns]
    staging = f"pg_temp.{db.bare_name(table)}_staging"
    conn.execute(f"DROP TABLE IF EXISTS {staging}")
    conn.execute(
        f"CREATE TEMP TABLE {staging} ({', '.join(f'{n} {t}' for n, t in columns)}) "
        "ON COMMIT DELETE ROWS"
    )
    conn.commit()
    copy_sql = f"COPY {staging} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
    upsert = _upsert_sql(table, names, staging)
    counts = dict(rows_read=0, inserted=0, updated=0, unchanged=0, repeated=0)
    batches = _batches(files, vectors, min(READ_ROWS, batch_rows))
    start = last_log = time.monotonic()
    done = False
    while not done:
        staged, seen = 0, set()
        with conn.cursor() as cur:
            with cur.copy(copy_sql) as out:
                out.write(copy.SIGNATURE)
                for path, batch in batches:
                    read = batch.num_rows
                    batch = _unique(batch, seen, path)
                    counts["rows_read"] += read
                    counts["repeated"] += read - batch.num_rows
                    out.write(encode(batch, vectors, path))
                    staged += batch.num_rows
                    if staged >= batch_rows:
                        break
                else:
                    done = True
                out.write(copy.TRAILER)
            inserted, updated = cur.execute(upsert, {"run": output}).fetchone()
        conn.commit()
        counts["inserted"] += inserted
        counts["updated"] += updated
        counts["unchanged"] += staged - inserted - updated
        now = time.monotonic()
        if log_every_secs and now - last_log >= log_every_secs:
            last_log = now
            rate = counts["rows_read"] / (now - start)
            _LOG.info("loading: %d rows read (%.0f rows/s)", counts["rows_read"], rate)
    return counts


def _build_indexes(conn, table: str, vectors) -> dict[str, float]:
    todo = missing_indexes(conn, table, vectors)
    seconds = {}
    for name, ddl in todo.items():
        _LOG.info("building index %s", name)
        started = time.monotonic()
        conn.execute(ddl)
        conn.commit()
        seconds[name] = round(time.monotonic() - started, 2)
    return seconds
