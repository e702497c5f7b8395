"""The queries of the pgvector table that are right: each returns k rows when the table has them.

- `nearest(conn, vector, k)`: the k rows nearest to `vector` by cosine distance, through the HNSW
  index of the column (`db.VectorColumn`): on `embedding_reduced` directly; on a 6144-d
  `embedding`, the `candidates` nearest by the Hamming distance of `binary_quantize`, re-sorted by
  exact cosine distance. With `tag`, only rows whose `categories` hold that wnid.
- `by_tag(conn, tag, k)`: the rows whose `categories` hold a wnid (GIN index), by its score.

The trap these functions close: an HNSW index scan looks at `hnsw.ef_search` (default 40)
candidates and stops, and a WHERE clause is applied to those candidates afterwards. So a plain
`... WHERE categories @> ARRAY['n02084071'] ORDER BY embedding <=> q LIMIT 10` on a tag held by 10%
of the rows returns about 4 rows instead of 10, and `LIMIT 100` with the default ef_search at most
40, with no error. The functions turn on pgvector 0.8's iterative index scans
(`hnsw.iterative_scan = relaxed_order`: the scan goes on until the LIMIT is met, up to
`hnsw.max_scan_tuples`), raise `ef_search` to the number of candidates asked for, re-sort by exact
distance (relaxed order may return rows slightly out of order), and when the scan still returns
fewer rows than the filter matches, answer again with the exact plan and log a warning. Settings
are changed for the query's own transaction only (`set_config(..., true)`), then put back.

Plans (`plan=`):
- `index`: the HNSW scan, always (sequential scans, bitmap scans and sorts turned off for the
  query: vectors stored out of line (TOAST) make a sequential scan look far cheaper to
  the planner than it is, and at 20,000 rows it chose one that took 50 times as long);
- `exact`: no vector index: a sequential scan, or for a tag a bitmap scan of the GIN index, then
  an exact sort; always the true answer, at a cost that grows with the rows the filter matches;
- `auto` (default): `index` without a tag; with a tag, `exact` when the tag's rows m (the
  planner's estimate) satisfy m^2 <= candidates x table rows, i.e. when sorting them costs less
  than the ~candidates x rows / m index tuples an iterative scan reads to find as many (measured
  per row, `bench/pg_load.py`: the two cost about the same), else `index`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types import TypeInfo

from search import SearchError, terms
from search.pgvector import copy, db

_LOG = logging.getLogger(__name__)

EF_SEARCH = 40  # pgvector's default
MAX_EF_SEARCH = 1000  # pgvector's limit
MAX_SCAN_TUPLES = 20_000  # pgvector's default limit of an iterative scan, raised for rare tags
SCAN_TUPLES_CAP = 1_000_000  # ... up to this (then the exact plan answers, see `_nearest`)
MIN_CANDIDATES = 100  # `binary` / `halfvec` columns: rows taken before the exact re-sort
PLANS = ("auto", "index", "exact")


@dataclass
class Hit:
    """One row: `score` is the cosine distance (`nearest`: 0 = same direction, smaller is nearer)
    or the category's score (`by_tag`: larger is better)."""

    key: str
    source: str | None
    score: float


class QueryVector:
    """A query vector, sent as a binary `vector` parameter (no decimal text to format)."""

    def __init__(self, values: np.ndarray):
        self.values = values


def _prepare(conn: psycopg.Connection) -> None:
    """Teach the connection to send `QueryVector`s (once), and load pgvector's library in the
    session, which defines the `hnsw.*` settings."""
    if conn.adapters.types.get("vector") is not None:
        return
    info = TypeInfo.fetch(conn, "vector")
    if info is None:
        raise SearchError("the vector extension is not enabled in this database")
    info.register(conn)

    class VectorDumper(Dumper):
        format = Format.BINARY
        oid = info.oid

        def dump(self, obj: QueryVector) -> bytes:
            return copy.vector_value(obj.values)

    conn.adapters.register_dumper(QueryVector, VectorDumper)
    conn.execute("SELECT '[1]'::vector")


@contextmanager
def _settings(conn: psycopg.Connection, values: dict):
    """`values` set for the statements inside, local to the transaction (the caller opens one),
    the old values put back after (for a caller whose own transaction goes on). Two round trips
    before, one after."""
    names = list(values)

    def set_all(settings: list) -> None:
        if not settings:
            return
        calls = ", ".join(["set_config(%s, %s, true)"] * len(settings))
        conn.execute(f"SELECT {calls}", [p for pair in settings for p in pair])

    old = conn.execute(
        "SELECT " + ", ".join(["current_setting(%s, true)"] * len(names)), names
    ).fetchone()
    set_all([(name, str(value)) for name, value in values.items()])
    yield
    set_all([(name, value) for name, value in zip(names, old) if value is not None])


def _column(conn, table: str, column: str | None) -> db.VectorColumn:
    columns = db.vector_columns(conn, table)
    if not columns:
        raise SearchError(f"table {table} does not exist or has no vector column")
    if column is None:
        column = "embedding_reduced" if "embedding_reduced" in columns else "embedding"
    if column not in columns:
        raise SearchError(f"table {table} has no vector column {column!r} ({', '.join(columns)})")
    return columns[column]


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not terms.WNID.match(tag):
        raise SearchError(f"tag {tag!r}: give a WordNet id such as n02084071 (dog)")
    return tag


def nearest(
    conn: psycopg.Connection,
    vector,
    k: int = 10,
    *,
    table: str = "images",
    column: str | None = None,
    tag: str | None = None,
    candidates: int | None = None,
    ef_search: int | None = None,
    plan: str = "auto",
) -> list[Hit]:
    """The `k` rows nearest to `vector` by cosine distance (nearest first, ties by key) in
    `column` (default `embedding_reduced` when the table has it, else `embedding`), only rows
    whose categories hold the wnid `tag` when given. `candidates`: rows taken through the index
    before the exact re-sort (default: max(40, k) on a column indexed directly, whose relaxed-order
    iterative scan returns rows a little out of order; max(100, 10 k) on a `binary` or `halfvec`
    one, ordered by an approximate distance); `ef_search`: the HNSW search width (default 40,
    raised to `candidates`, at most 1000)."""
    table = db.check_table_name(table)
    if plan not in PLANS:
        raise SearchError(f"plan {plan!r}: one of {', '.join(PLANS)}")
    if k < 1:
        raise SearchError("k must be at least 1")
    if tag is not None:
        check_tag(tag)
    # a transaction of its own, or a savepoint in the caller's: the connection is left as found
    with conn.transaction():
        _prepare(conn)
        return _nearest(conn, vector, k, table, column, tag, candidates, ef_search, plan)


def _nearest(conn, vector, k, table, column, tag, candidates, ef_search, plan) -> list[Hit]:
    col = _column(conn, table, column)
    query = np.asarray(vector, np.float32).reshape(-1)
    if query.shape[0] != col.dim or not np.isfinite(query).all():
        raise SearchError(
            f"the query vector has {query.shape[0]} values; {table}.{col.name} needs {col.dim} "
            "finite ones"
        )
    limit = candidates
    if limit is None:  # what one HNSW pass finds anyway; more where it orders by an approximation
        limit = max(EF_SEARCH, k) if col.kind == "direct" else max(MIN_CANDIDATES, 10 * k)
    if limit < k:
        raise SearchError(f"candidates ({limit}) must be at least k ({k})")
    params = {"q": QueryVector(query), "k": k, "limit": limit, "tag": tag}
    where = f"{col.name} IS NOT NULL"
    if tag is not None:
        where += " AND categories @> ARRAY[%(tag)s]::text[]"
    total, matches = (1.0, 1.0) if tag is None else _row_estimates(conn, table, tag)
    if plan == "auto":  # exact when sorting the tag's rows costs less than finding them in HNSW
        plan = "exact" if tag is not None and matches**2 <= limit * total else "index"
    if plan == "exact":
        return _exact(conn, table, col, where, params)
    # The iterative scan reads about limit / (share of rows matching) index tuples.
    expected_scan = 4 * limit * total / max(matches, 1)
    settings = {
        "hnsw.iterative_scan": "relaxed_order",
        "hnsw.ef_search": min(max(ef_search or EF_SEARCH, limit), MAX_EF_SEARCH),
        "hnsw.max_scan_tuples": int(min(max(MAX_SCAN_TUPLES, expected_scan), SCAN_TUPLES_CAP)),
        # The HNSW scan, not the planner's guess: vectors stored out of line (TOAST) make a
        # sequential scan look far cheaper to it than it is, and a sort on the key index
        # (seqscan and bitmap scans off) is the next cheapest-looking plan.
        "enable_seqscan": "off",
        "enable_bitmapscan": "off",
        "enable_sort": "off",
    }
    sql = f"""
        WITH candidates AS MATERIALIZED (
          SELECT key, source, {col.name} FROM {table} WHERE {where}
          ORDER BY {col.index_order()} LIMIT %(limit)s)
        SELECT key, source, {col.distance()} AS distance FROM candidates
        ORDER BY distance, key LIMIT %(k)s"""
    with _settings(conn, settings):
        rows = conn.execute(sql, params).fetchall()
    if len(rows) < k:
        matching = conn.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchone()
        if matching[0] > len(rows):
            _LOG.warning(
                "the HNSW index scan of %s.%s returned %d of the %d rows asked for (%d match); "
                "answering with the exact plan instead",
                table,
                col.name,
                len(rows),
                k,
                matching[0],
            )
            return _exact(conn, table, col, where, params)
    return [Hit(key, source, float(d)) for key, source, d in rows]


def _row_estimates(conn, table: str, tag: str) -> tuple[float, float]:
    """(rows in the table, rows holding `tag`) as the planner estimates them (no scan)."""
    plan = conn.execute(
        f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {table} WHERE categories @> ARRAY[%s]::text[]",
        [tag],
    ).fetchone()[0]
    total = conn.execute(
        "SELECT greatest(reltuples, 1) FROM pg_class WHERE oid = to_regclass(%s)", [table]
    ).fetchone()[0]
    return float(total), float(plan[0]["Plan"]["Plan Rows"])


def _exact(conn, table: str, col: db.VectorColumn, where: str, params: dict) -> list[Hit]:
    """Every matching row's exact distance, sorted: no vector index (a sequential scan, or the
    GIN index's bitmap for a tag)."""
    sql = f"""SELECT key, source, {col.distance()} AS distance FROM {table} WHERE {where}
              ORDER BY distance, key LIMIT %(k)s"""
    with _settings(conn, {"enable_indexscan": "off"}):
        rows = conn.execute(sql, params).fetchall()
    return [Hit(key, source, float(d)) for key, source, d in rows]


def by_tag(conn: psycopg.Connection, tag: str, k: int = 10, *, table: str = "images") -> list[Hit]:
    """The `k` rows whose categories hold the wnid `tag`, by that category's score (best first,
    ties by key), through the GIN index of `categories`."""
    table = db.check_table_name(table)
    check_tag(tag)
    if k < 1:
        raise SearchError("k must be at least 1")
    with conn.transaction():
        if not db.table_exists(conn, table):
            raise SearchError(f"table {table} does not exist: load an output into it first")
        rows = conn.execute(
            f"""SELECT key, source, category_scores[array_position(categories, %(tag)s)] AS score
                FROM {table} WHERE categories @> ARRAY[%(tag)s]::text[]
                ORDER BY score DESC NULLS LAST, key LIMIT %(k)s""",
            {"tag": tag, "k": k},
        ).fetchall()
    return [Hit(key, source, float(score)) for key, source, score in rows]
