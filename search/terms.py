"""Tag terms: WordNet ids and lemmas, normalised, and the vocabulary table of an index.

A `--tag` term is a wnid (`n02084071`) or a lemma of a synset, compared case-insensitively with
spaces read as underscores (`Golden Retriever` = `golden_retriever`). Labels in the results are a
synset's lemmas joined by ", " (`dog, domestic_dog, Canis_familiaris`), so each lemma of a label
is a term. The index keeps one vocabulary row per (term, wnid): a lemma naming several synsets
(`crane`: the bird and the machine) resolves to all of them.
"""

from __future__ import annotations

import re
from typing import Iterable

import pyarrow as pa

WNID = re.compile(r"^n\d{8}$")
VOCABULARY_SCHEMA = pa.schema(
    [pa.field("term", pa.string()), pa.field("wnid", pa.string()), pa.field("label", pa.string())]
)


def normalise(term: str) -> str:
    """Lower case, surrounding blanks removed, inner runs of blanks as one underscore."""
    return re.sub(r"\s+", "_", term.strip().lower())


def lemmas(label: str) -> list[str]:
    """The normalised lemmas of a label (`"dog, domestic_dog"` -> `["dog", "domestic_dog"]`)."""
    return [normalise(part) for part in label.split(",") if part.strip()]


def display_name(label: str) -> str:
    """The first lemma of a label, as written (`"dog, domestic_dog"` -> `"dog"`)."""
    return label.split(",", 1)[0].strip()


def vocabulary(synsets: Iterable[tuple[str, str]]) -> pa.Table:
    """Vocabulary rows (term, wnid, label) for distinct (wnid, label) pairs: the wnid itself and
    each lemma of the label."""
    rows = {}
    for wnid, label in synsets:
        for term in (wnid, *lemmas(label or "")):
            rows[(term, wnid)] = label or ""
    terms, wnids, labels = (
        zip(*((t, w, lab) for (t, w), lab in sorted(rows.items()))) if rows else ((), (), ())
    )
    return pa.table(
        [pa.array(terms, pa.string()), pa.array(wnids, pa.string()), pa.array(labels, pa.string())],
        schema=VOCABULARY_SCHEMA,
    )


def label_set_synsets(term: str) -> list[tuple[str, str]]:
    """(wnid, label) of the ImageNet-21k classes that `term` names (wnid or lemma), from the
    label set the job tags with; used to tell "no image has it" from "no such tag"."""
    from model.labels import imagenet21k

    labels = imagenet21k()
    term = normalise(term)
    if WNID.match(term):
        return [(w, lab) for w, lab in zip(labels.wnids, labels.labels) if w == term]
    return [(w, lab) for w, lab in zip(labels.wnids, labels.labels) if term in lemmas(lab)]


def sql_text(value: str) -> str:
    """`value` as a LanceDB SQL string literal, quotes doubled."""
    return "'" + value.replace("'", "''") + "'"


def sql_list(values: Iterable[str]) -> str:
    """`['a', 'b']` as a LanceDB SQL list literal, quotes doubled."""
    return "[" + ", ".join(map(sql_text, values)) + "]"
