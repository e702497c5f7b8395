"""Search what the job wrote: an embedded LanceDB index over `results-*.parquet`, and its queries.

`search.index` builds and appends (`./run.sh index`), `search.query` answers by image, key and tag
(`./run.sh search`), `search.ann` holds the vector-index settings, `search.terms` the tag
vocabulary, `search.cli` the command line. Imports `model` (to embed a query image the way the job
did) and `core`, never Apache Beam, `transforms` or `pipeline` (checked by `.importlinter`).
"""

import os

from core.errors import UsageError

# LanceDB's Rust core logs warnings (e.g. "No existing dataset ... it will be created") to stderr.
os.environ.setdefault("LANCEDB_LOG", "error")


class SearchError(UsageError):
    """A user-facing problem (bad input, missing or incompatible index): exit code 2, one line."""
