"""`python -m pipeline --input ... --output ...`"""

import sys

from pipeline.main import main

sys.exit(main())
