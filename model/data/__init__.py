"""Data files shipped with the package (labels, WordNet hypernyms) and their checked reader."""

import hashlib
import os
from typing import Optional

DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def read_checked(
    path: str, sha256: Optional[str], what: str, rebuild: str, error: type[Exception]
) -> bytes:
    """The bytes of a shipped data file, refused (`error`) when missing or when their sha256 is
    not `sha256` (None skips the check): a corrupt install fails loudly, never mislabels."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise error(f"{what} {path} is missing from the install: {e}") from e
    got = hashlib.sha256(data).hexdigest()
    if sha256 is not None and got != sha256:
        raise error(
            f"{what} {path} is corrupt: sha256 {got}, expected {sha256}; "
            f"reinstall the package or rerun {rebuild}"
        )
    return data
