"""The files of a job's output directory (local or gs://), listed one way for every reader: the
accounting (`transforms.outputs`), the report (`pipeline.report`), `pipeline.fit_pca` and the search
index (`search.index`). File names: ARCHITECTURE.md, "Outputs".
"""

from __future__ import annotations

import re
import urllib.parse

from core import storage

RESULTS = "results"
FAILURES = "failures"
# A run's commit marker, written last (docs/outputs.md): results without it are an incomplete run.
SUMMARY_FILE = "summary.json"
_GLOB_CHARS = re.compile(r"[*?\[]")


def has_glob(path: str) -> bool:
    """True when `path` has glob characters (`*`, `?`, `[`)."""
    return bool(_GLOB_CHARS.search(path))


def match(pattern: str) -> list[str]:
    """The files (not directories) one glob matches, local or gs://, sorted; gs:// matches keep
    their scheme. [] when nothing matches; `StorageUnavailableError` when the store is offline."""
    fs, fs_pattern = storage.get_filesystem(pattern)
    found = fs.glob(fs_pattern, detail=True)
    names = sorted(name for name, info in found.items() if info.get("type") != "directory")
    scheme = urllib.parse.urlsplit(pattern).scheme if "://" in pattern else ""
    if scheme in ("", "file"):
        return names
    return [fs.unstrip_protocol(name) for name in names]


def output_files(output: str, kind: str = RESULTS) -> list[str]:
    """`OUTPUT/<kind>-*.parquet` (kind: "results" or "failures") of one output directory, sorted."""
    if kind not in (RESULTS, FAILURES):
        raise ValueError(f"kind must be {RESULTS!r} or {FAILURES!r}, not {kind!r}")
    return match(f"{output.rstrip('/')}/{kind}-*.parquet")


def incomplete_message(output: str, then: str = "") -> str:
    """What to tell a user about an output with results but no summary.json (one line); `then`:
    what to do once the run is redone (", then index it")."""
    return (
        f"{output} holds an incomplete run: results without {SUMMARY_FILE} (the run was killed "
        f"or failed before it committed, or is still running); rerun the job into it with "
        f"--overwrite{then}"
    )
