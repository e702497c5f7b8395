"""`python -m search index|search ...` (what `./run.sh index` and `./run.sh search` run).

TensorFlow's C++ start-up lines and the CUDA probe of a machine without a GPU are filtered out of
stderr here, as for the job (`core/console.py`); the command's own lines pass through."""

import sys

from core.console import NativeStderrFilter, native_noise
from search.cli import main

with NativeStderrFilter(native_noise()):
    code = main()
sys.exit(code)
