"""`python -m search index|search ...` (what `./run.sh index` and `./run.sh search` run)."""

import sys

from search.cli import main

sys.exit(main())
