"""BiT-M's 21,843 ImageNet-21k classes (WordNet ids and lemmas) in logit order.

The two text files in `model/data/` are byte-identical copies of BiT's
`imagenet21k_wordnet_{ids,lemmas}.txt` (rebuilt offline by `model/data/build_labels.py`).
They ship with the package, so tagging needs no network; their sha256 is checked at load
so a corrupt install fails loudly instead of mislabelling every image.
"""

import functools
import os
from typing import NamedTuple

import numpy as np

from model.data import DATA_DIR, read_checked

IDS_FILE = "imagenet21k_wordnet_ids.txt"
LEMMAS_FILE = "imagenet21k_wordnet_lemmas.txt"
IDS_SHA256 = "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"
LEMMAS_SHA256 = "860c2ce731aa376d21352403caf83069577a71c26462a618621ccd38ae9c8c7f"
NUM_CLASSES = 21843
VERSION_NAME = "imagenet21k-bit-2019"


class LabelError(RuntimeError):
    """The packaged label data is missing or corrupt."""


class LabelSet(NamedTuple):
    """Class `i` of the model's logits is `(wnids[i], labels[i])`."""

    wnids: np.ndarray  # object array of str, e.g. "n00004475"
    labels: np.ndarray  # object array of str, e.g. "organism, being"
    version: str  # e.g. "imagenet21k-bit-2019 sha256:860c2ce731aa" (recorded in the outputs)

    def lookup(self, i):
        """(wnid, label) of logit index `i`."""
        return self.wnids[i], self.labels[i]

    def __len__(self):
        return len(self.wnids)


def _read_checked(name, sha256):
    path = os.path.join(DATA_DIR, name)
    data = read_checked(path, sha256, "label file", "model/data/build_labels.py", LabelError)
    lines = data.decode("ascii").split("\n")[:-1]  # the files end with a newline
    if len(lines) != NUM_CLASSES:
        raise LabelError(f"label file {path} has {len(lines)} lines, expected {NUM_CLASSES}")
    return np.array(lines, dtype=object)


@functools.cache
def imagenet21k():
    """The BiT-M ImageNet-21k LabelSet (read once per process, checksums verified)."""
    wnids = _read_checked(IDS_FILE, IDS_SHA256)
    labels = _read_checked(LEMMAS_FILE, LEMMAS_SHA256)
    return LabelSet(wnids, labels, f"{VERSION_NAME} sha256:{LEMMAS_SHA256[:12]}")
