"""PostgreSQL + pgvector as the search index of the job's results (`./run.sh load`).

`load.load_output` streams an OUTPUT's `results-*.parquet` into a table (binary COPY, upsert by
key) and creates the indexes pgvector can build; `query` holds the queries that are right
(`nearest`, `by_tag`); `db` the connection, the server checks and the one rule that says how each
vector column is indexed and searched; `copy` the binary COPY encoding; `cli` the command line.
No Beam, no TensorFlow: a scheduled job can call `load_output` directly. docs/pgvector.md is the
user's guide.
"""

from search.pgvector.db import connect
from search.pgvector.load import load_output
from search.pgvector.query import Hit, by_tag, nearest

__all__ = ["Hit", "by_tag", "connect", "load_output", "nearest"]
