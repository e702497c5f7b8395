"""WordNet 3.0 categories: roll each image's tags up the noun hierarchy, vectorised per batch.

BiT's 21,843 classes are WordNet 3.0 noun synsets, so a tag `golden_retriever` also means
retriever, sporting_dog, hunting_dog, dog, canine, carnivore, ..., entity. A keyword index needs
those words in the row ("dog" must find golden retrievers). `model/data/wordnet30_hypernyms.tsv.gz`
(rebuilt by `model/data/build_wordnet.py` from Debian's `wordnet-base`; sha256 checked at load;
license in `model/data/WORDNET_LICENSE`) holds the 23,547 synsets at or above the classes,
following `@` (hypernym) and `@i` (instance hypernym) pointers up to `entity`. It is a DAG: 453
classes have more than one parent (dog -> canine and dog -> domestic_animal).

Depth is the LONGEST hypernym path from `entity` (depth 0; golden_retriever is 17), so a synset is
always deeper than each of its ancestors, and "deeper first" means "more specific first".

`Hierarchy.roll_up` works on a whole batch at once: each class's ancestor set (itself included) is
precomputed as CSR arrays (`ancestor_ptr`, `ancestor_ids`: 253,408 entries); a batch's kept tags
are expanded through it with `np.repeat`, and one lexsort keeps, per (row, synset), the highest
score among the row's tags at or below it. No Python loop runs per image or per tag.
"""

from __future__ import annotations

import functools
import gzip
import os
from typing import NamedTuple, Optional

import numpy as np

from model.data import DATA_DIR, read_checked

HYPERNYMS_FILE = "wordnet30_hypernyms.tsv.gz"
HYPERNYMS_SHA256 = "8bbec5329f814e61aa6700822e01f73b41e27f4da9dfa71fe9b50abc29d9f589"
VERSION_NAME = "wordnet-3.0"
ROOT = "n00001740"  # entity


class WordNetError(RuntimeError):
    """The packaged WordNet data is missing, corrupt or does not cover the label set."""


class Categories(NamedTuple):
    """A batch's categories, flat: row i is `ids[offsets[i]:offsets[i+1]]` (synset ids), in order
    score descending, depth descending, wnid ascending, with `scores` beside them."""

    offsets: np.ndarray  # int32 [B + 1]
    ids: np.ndarray  # int32 [C], index into Hierarchy.wnids / .labels / .depths
    scores: np.ndarray  # float32 [C]


class Hierarchy:
    """The hypernym closure of a label set: synsets (`wnids`, `labels`, `depths`, `parents`) and,
    per class index of the label set, its ancestors (CSR `ancestor_ptr` / `ancestor_ids`)."""

    def __init__(self, wnids, labels, depths, parents, class_wnids, version=None):
        self.wnids = np.asarray(wnids, dtype=object)
        self.labels = np.asarray(labels, dtype=object)
        self.depths = np.asarray(depths, dtype=np.int32)
        self.parents = [np.asarray(p, dtype=np.int32) for p in parents]
        self.version = version
        self._id = {w: i for i, w in enumerate(self.wnids)}
        missing = [w for w in class_wnids if w not in self._id]
        if missing:
            raise WordNetError(
                f"{len(missing)} classes are not in the WordNet data (first: {missing[0]})"
            )
        # Ancestor sets, parents before children (longest-path depth strictly increases).
        ancestors = [None] * len(self.wnids)
        for i in np.argsort(self.depths, kind="stable"):
            s = {int(i)}
            for p in self.parents[i]:
                s.update(ancestors[p])
            ancestors[i] = s
        class_ids = [self._id[w] for w in class_wnids]
        sizes = np.fromiter((len(ancestors[i]) for i in class_ids), np.int64, len(class_ids))
        self.ancestor_ptr = np.zeros(len(class_ids) + 1, np.int64)
        np.cumsum(sizes, out=self.ancestor_ptr[1:])
        self.ancestor_ids = np.fromiter(
            (a for i in class_ids for a in sorted(ancestors[i])),
            np.int32,
            int(self.ancestor_ptr[-1]),
        )
        # Position of each synset in (depth descending, wnid ascending) order: the tie-breaks.
        by_wnid = np.empty(len(self.wnids), np.int64)
        by_wnid[np.argsort(self.wnids.astype(str), kind="stable")] = np.arange(len(self.wnids))
        order = np.lexsort((by_wnid, -self.depths))
        self.rank = np.empty(len(order), np.int32)
        self.rank[order] = np.arange(len(order), dtype=np.int32)

    def __len__(self):
        return len(self.wnids)

    def index(self, wnid: str) -> int:
        return self._id[wnid]

    def ancestors(self, wnid: str) -> list:
        """The synset and every synset above it (wnids), deepest first, then by wnid."""
        todo, seen = [self._id[wnid]], set()
        while todo:
            i = todo.pop()
            if i not in seen:
                seen.add(i)
                todo.extend(int(p) for p in self.parents[i])
        return [self.wnids[i] for i in sorted(seen, key=lambda i: self.rank[i])]

    def roll_up(
        self, offsets: np.ndarray, classes: np.ndarray, scores: np.ndarray, min_depth: int = 0
    ) -> Categories:
        """Categories of a batch of B rows from its kept tags, flat: row i's tags are
        `classes[offsets[i]:offsets[i+1]]` (class indices of the label set) with `scores`.

        Each row gets every synset at or above its tags, once, scored with the highest score of
        the row's tags at or below it; synsets with depth < `min_depth` are dropped."""
        offsets = np.asarray(offsets, dtype=np.int64)
        classes = np.asarray(classes, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        b = len(offsets) - 1
        tag_rows = np.repeat(np.arange(b, dtype=np.int64), np.diff(offsets))
        starts = self.ancestor_ptr[classes]
        counts = self.ancestor_ptr[classes + 1] - starts
        total = int(counts.sum())
        # For tag t, positions starts[t] .. starts[t] + counts[t] - 1 of ancestor_ids.
        first_of_tag = np.repeat(np.cumsum(counts) - counts, counts)
        ids = self.ancestor_ids[np.repeat(starts, counts) + np.arange(total) - first_of_tag]
        rows = np.repeat(tag_rows, counts)
        cat_scores = np.repeat(scores, counts)
        if min_depth > 0:
            deep = self.depths[ids] >= min_depth
            ids, rows, cat_scores = ids[deep], rows[deep], cat_scores[deep]
        # One entry per (row, synset): the highest score (first after sorting score descending).
        pair = rows * len(self.wnids) + ids
        order = np.lexsort((-cat_scores, pair))
        pair, cat_scores = pair[order], cat_scores[order]
        first = np.ones(len(pair), bool)
        first[1:] = pair[1:] != pair[:-1]
        pair, cat_scores = pair[first], cat_scores[first]
        rows, ids = np.divmod(pair, len(self.wnids))
        # Row, then score descending, then depth descending, then wnid.
        order = np.lexsort((self.rank[ids], -cat_scores, rows))
        out_offsets = np.zeros(b + 1, np.int32)
        np.cumsum(np.bincount(rows, minlength=b), out=out_offsets[1:])
        return Categories(out_offsets, ids[order].astype(np.int32), cat_scores[order])


def read_hypernyms(path: Optional[str] = None, sha256: Optional[str] = HYPERNYMS_SHA256):
    """(wnids, labels, depths, parent wnid lists) of the shipped file, its sha256 checked."""
    path = path or os.path.join(DATA_DIR, HYPERNYMS_FILE)
    packed = read_checked(path, sha256, "WordNet file", "model/data/build_wordnet.py", WordNetError)
    wnids, depths, parents, labels = [], [], [], []
    for line in gzip.decompress(packed).decode("ascii").split("\n")[:-1]:
        wnid, depth, parent_text, label = line.split("\t")
        wnids.append(wnid)
        depths.append(int(depth))
        parents.append(parent_text.split())
        labels.append(label)
    return wnids, labels, depths, parents


@functools.cache
def imagenet21k_hierarchy() -> Hierarchy:
    """The hierarchy over BiT-M's ImageNet-21k classes, in logit order (built once per process,
    about 0.5 s)."""
    from model.labels import imagenet21k

    wnids, labels, depths, parents = read_hypernyms()
    position = {w: i for i, w in enumerate(wnids)}
    parent_ids = [[position[p] for p in ps] for ps in parents]
    return Hierarchy(
        wnids, labels, depths, parent_ids, list(imagenet21k().wnids), version=VERSION_NAME
    )
