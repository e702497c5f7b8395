"""`python -m search.pgvector load OUTPUT --into DSN` (what `./run.sh load` runs)."""

import sys

from search.pgvector.cli import main

sys.exit(main())
