"""The server side of the pgvector index: connecting, the checks a server must pass, table names,
and the one rule (`VectorColumn`) saying how a vector column is stored, indexed and searched,
shared by the loader's DDL and the queries so they always agree.

pgvector stores `vector` (float32) and `halfvec` (float16) columns of up to 16,000 dimensions, but
its HNSW and IVFFlat indexes take at most 2,000 (`vector`) or 4,000 (`halfvec`) dimensions. So a
column is indexed one of three ways, by its type and size:
- `direct`: HNSW on the column itself, cosine (`vector` <= 2,000, `halfvec` <= 4,000 dims);
- `halfvec`: HNSW on the column cast to `halfvec(D)` (a float32 column of 2,001-4,000 dims); the
  queries order candidates by the halfvec distance, then re-sort them by the exact one;
- `binary`: HNSW (Hamming) on `binary_quantize(column)::bit(D)` (over 4,000 dims, e.g. BiT's 6144-d
  embedding: one bit a dimension, set where the value is > 0); the queries take the N nearest by
  Hamming distance, then re-sort them by exact cosine distance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict

from search import SearchError

MIN_PGVECTOR = (0, 8, 0)  # halfvec, binary_quantize (0.7) and iterative index scans (0.8)
MAX_DIMS = 16_000  # what a vector or halfvec column can store
INDEX_MAX_DIMS = {"vector": 2_000, "halfvec": 4_000}  # what HNSW / IVFFlat can index
BIT_INDEX_MAX_DIMS = 64_000  # HNSW on bit
CONNECT_TIMEOUT_S = 10
TABLE_NAME = re.compile(r"^(?:[a-z_][a-z0-9_]{0,39}\.)?[a-z_][a-z0-9_]{0,39}$")


# ------------------------------------------------------------------------------ connecting


def describe(dsn: str) -> str:
    """`host:port/db as user` of a connection string, never its password (for messages)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise SearchError(
            "--into is not a PostgreSQL connection string (expected postgresql://USER@HOST:PORT/DB)"
        ) from None
    host = params.get("host") or params.get("hostaddr") or "the default host"
    where = f"{host}:{params.get('port') or 5432}/{params.get('dbname') or '(default database)'}"
    return where + (f" as {params['user']}" if params.get("user") else "")


def _password(dsn: str) -> str | None:
    try:
        return conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        return None


def one_line(error: BaseException, dsn: str) -> str:
    """The error's message on one line, with the connection string's password taken out."""
    text = " ".join(str(error).split()) or type(error).__name__
    password = _password(dsn)
    return text.replace(password, "***") if password else text


def connect(dsn: str, **kwargs) -> psycopg.Connection:
    """A connection (not autocommit) to `dsn`, or SearchError naming the server, never the
    password. `connect_timeout` defaults to 10 s, so a server that is down fails fast."""
    if not dsn or not dsn.strip():
        raise SearchError("--into is empty: give postgresql://USER@HOST:PORT/DB")
    where = describe(dsn)
    params = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "bit-tagger", **kwargs}
    if "connect_timeout" in conninfo_to_dict(dsn):
        del params["connect_timeout"]
    try:
        return psycopg.connect(dsn, **params)
    except psycopg.Error as e:
        raise SearchError(f"cannot connect to PostgreSQL at {where}: {one_line(e, dsn)}") from None


# What a server that is down, full, read-only or refusing this user raises, and what a wrong
# --table schema or --index_memory gives: set-up errors (exit 2). Anything else is a bug.
REFUSALS = (
    psycopg.OperationalError,  # connection lost, shut down, disk full, out of memory
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.InvalidSchemaName,
    psycopg.errors.InvalidParameterValue,
    psycopg.errors.ReadOnlySqlTransaction,
)


def server_error(error: psycopg.Error, dsn: str, doing: str) -> SearchError:
    """A SearchError for what the server refused or a lost connection, naming the server."""
    return SearchError(f"PostgreSQL at {describe(dsn)}, {doing}: {one_line(error, dsn)}")


def pgvector_version(conn: psycopg.Connection) -> tuple[int, ...] | None:
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    return None if row is None else tuple(int(p) for p in re.findall(r"\d+", row[0])[:3])


def require_pgvector(conn: psycopg.Connection, dsn: str, create: bool = True) -> str:
    """Make sure the `vector` extension is there (creating it if `create`) and recent enough;
    returns its version. SearchError otherwise, saying what to do."""
    version = pgvector_version(conn)
    if version is None and create:
        available = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
        if available is None:
            raise SearchError(
                f"pgvector is not installed on the server at {describe(dsn)}: install the "
                "extension (https://github.com/pgvector/pgvector) on the server, then load again"
            )
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('bit-tagger:pgvector'))")
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.errors.InsufficientPrivilege:
            raise SearchError(
                f"the vector extension is not enabled in {describe(dsn)} and this user may not "
                "enable it: run CREATE EXTENSION vector; as the database owner, then load again"
            ) from None
        version = pgvector_version(conn)
    if version is None:
        raise SearchError(f"the vector extension is not enabled in {describe(dsn)}")
    text = ".".join(map(str, version))
    if version < MIN_PGVECTOR:
        raise SearchError(
            f"pgvector {text} in {describe(dsn)} is too old: 0.8.0 or later is needed "
            "(halfvec, binary_quantize, iterative index scans); run ALTER EXTENSION vector UPDATE;"
        )
    return text


# ---------------------------------------------------------------------------------- tables


def check_table_name(name: str) -> str:
    """`name` or `schema.name`: lowercase letters, digits and `_`, up to 40 characters each (the
    derived index and run-table names must stay within PostgreSQL's 63)."""
    if not TABLE_NAME.match(name or ""):
        raise SearchError(
            f"--table {name!r}: use a lowercase name (letters, digits, _; up to 40 characters), "
            "optionally schema-qualified: images, search.images"
        )
    return name


def bare_name(table: str) -> str:
    return table.rsplit(".", 1)[-1]


def runs_table(table: str) -> str:
    """The table that records each load into `table` (and the settings its vectors share)."""
    return f"{table}_runs"


def table_exists(conn: psycopg.Connection, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", [table]).fetchone()[0]


# --------------------------------------------------------------------------- vector columns


@dataclass(frozen=True)
class VectorColumn:
    """A vector column: `type` is `vector` or `halfvec`, `dim` its dimensions."""

    name: str
    type: str
    dim: int

    @property
    def kind(self) -> str:
        """How it is indexed: `direct`, `halfvec` or `binary` (the module docstring)."""
        if self.dim <= INDEX_MAX_DIMS[self.type]:
            return "direct"
        return "halfvec" if self.dim <= INDEX_MAX_DIMS["halfvec"] else "binary"

    @property
    def sql_type(self) -> str:
        return f"{self.type}({self.dim})"

    def index_name(self, table: str) -> str:
        return f"{bare_name(table)}_{self.name}_hnsw"

    def create_index(self, table: str) -> str:
        """CREATE INDEX (HNSW) for this column on `table`."""
        expression, opclass = {
            "direct": (self.name, f"{self.type}_cosine_ops"),
            "halfvec": (f"({self.name}::halfvec({self.dim}))", "halfvec_cosine_ops"),
            "binary": (f"(binary_quantize({self.name})::bit({self.dim}))", "bit_hamming_ops"),
        }[self.kind]
        return (
            f"CREATE INDEX IF NOT EXISTS {self.index_name(table)} ON {table} "
            f"USING hnsw ({expression} {opclass})"
        )

    def index_order(self, param: str = "%(q)s") -> str:
        """The ORDER BY expression the HNSW index answers (`param`: the query vector)."""
        if self.kind == "direct":
            return f"{self.name} <=> {param}::{self.sql_type}"
        if self.kind == "halfvec":
            return f"{self.name}::halfvec({self.dim}) <=> {param}::halfvec({self.dim})"
        return (
            f"binary_quantize({self.name})::bit({self.dim}) "
            f"<~> binary_quantize({param}::vector({self.dim}))"
        )

    def distance(self, param: str = "%(q)s") -> str:
        """The exact cosine distance of the stored values to the query vector."""
        return f"{self.name} <=> {param}::{self.sql_type}"


def vector_columns(conn: psycopg.Connection, table: str) -> dict[str, VectorColumn]:
    """The `vector` / `halfvec` columns of `table`, by name (dimension from the type modifier)."""
    rows = conn.execute(
        """SELECT a.attname, t.typname, a.atttypmod
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
             AND t.typname IN ('vector', 'halfvec')""",
        [table],
    ).fetchall()
    return {name: VectorColumn(name, typ, int(dim)) for name, typ, dim in rows}
