"""WordNet categories: the shipped hierarchy against hand-checked chains, and the vectorised
roll-up against a brute-force walk of the shipped file."""

import functools
import gzip
import shutil

import numpy as np
import pytest

from model import wordnet
from model.labels import imagenet21k
from model.wordnet import Hierarchy, WordNetError, imagenet21k_hierarchy, read_hypernyms

GOLDEN_RETRIEVER = "n02099601"
DOG = "n02084071"
STOKER = "n11318824"  # Bram Stoker: an instance (`@i`) of writer


@pytest.fixture(scope="module")
def hierarchy():
    return imagenet21k_hierarchy()


@pytest.fixture(scope="module")
def class_of():
    return {w: i for i, w in enumerate(imagenet21k().wnids)}


def labels_of(h, wnids):
    return [h.labels[h.index(w)] for w in wnids]


def test_golden_retriever_rolls_up_to_entity(hierarchy):
    chain = hierarchy.ancestors(GOLDEN_RETRIEVER)
    assert len(chain) == 19
    names = labels_of(hierarchy, chain)
    assert names[:7] == [
        "golden_retriever",
        "retriever",
        "sporting_dog, gun_dog",
        "hunting_dog",
        "dog, domestic_dog, Canis_familiaris",
        "canine, canid",
        "carnivore",
    ]
    assert "domestic_animal, domesticated_animal" in names  # through dog's second parent
    assert names[-3:] == ["object, physical_object", "physical_entity", "entity"]
    assert hierarchy.depths[hierarchy.index(GOLDEN_RETRIEVER)] == 17


def test_dog_has_two_hypernyms_and_is_deeper_than_both(hierarchy):
    i = hierarchy.index(DOG)
    parents = sorted(hierarchy.wnids[p] for p in hierarchy.parents[i])
    assert parents == ["n01317541", "n02083346"]  # domestic_animal, canine
    # Longest path: canine (12) is deeper than domestic_animal (7); dog is one below the deeper.
    assert [hierarchy.depths[hierarchy.index(p)] for p in parents] == [7, 12]
    assert hierarchy.depths[i] == 13


def test_instance_hypernym_is_followed(hierarchy):
    chain = hierarchy.ancestors(STOKER)
    assert labels_of(hierarchy, chain[:4]) == [
        "Stoker, Bram_Stoker, Abraham_Stoker",
        "writer, author",
        "communicator",
        "person, individual, someone, somebody, mortal, soul",
    ]
    assert {"n00007347", "n00004475"} <= set(chain)  # person -> causal_agent and organism
    assert chain[-1] == wordnet.ROOT


def test_shipped_file_covers_the_classes_with_their_labels(hierarchy):
    labels = imagenet21k()
    assert len(hierarchy) == 23547
    ids = [hierarchy.index(w) for w in labels.wnids]
    assert list(hierarchy.labels[ids]) == list(labels.labels)  # same lemma convention as tags
    above = {a for c in range(len(labels)) for a in hierarchy.ancestors(labels.wnids[c])[1:]}
    assert len(above) == 6293 and len(above - set(labels.wnids)) == 1704
    assert sum(len(hierarchy.parents[i]) > 1 for i in ids) == 453
    # Longest-path depth: one more than the deepest parent; entity alone at 0.
    for i, parents in enumerate(hierarchy.parents):
        want = 1 + max((hierarchy.depths[p] for p in parents), default=-1)
        assert hierarchy.depths[i] == want


def test_corrupt_data_fails_loudly(tmp_path):
    bad = tmp_path / wordnet.HYPERNYMS_FILE
    shutil.copy(f"{wordnet.DATA_DIR}/{wordnet.HYPERNYMS_FILE}", bad)
    text = gzip.decompress(bad.read_bytes()).replace(b"\tdog,", b"\tcat,")
    bad.write_bytes(gzip.compress(text, mtime=0))
    with pytest.raises(WordNetError, match="corrupt"):
        read_hypernyms(str(bad))
    with pytest.raises(WordNetError, match="missing"):
        read_hypernyms(str(tmp_path / "absent.tsv.gz"))


def brute_force(classes, scores, min_depth):
    """One row: walk the parent lists of the shipped file from every tag, keep the best score."""
    wnids, _, depths, parents = read_hypernyms_cached()
    depth_of = dict(zip(wnids, depths))
    parents_of = dict(zip(wnids, parents))
    best = {}
    for c, s in zip(classes, scores):
        todo, seen = [imagenet21k().wnids[c]], set()
        while todo:
            w = todo.pop()
            if w in seen:
                continue
            seen.add(w)
            todo.extend(parents_of[w])
            if depth_of[w] >= min_depth:
                best[w] = max(best.get(w, -1.0), float(s))
    return sorted(best.items(), key=lambda ws: (-ws[1], -depth_of[ws[0]], ws[0]))


@functools.cache
def read_hypernyms_cached():
    return read_hypernyms()


@pytest.mark.parametrize("min_depth", [0, 6])
def test_vectorised_roll_up_equals_brute_force(hierarchy, min_depth):
    rng = np.random.default_rng(min_depth)
    b = 24
    counts = rng.integers(0, 8, b)
    counts[0] = 0  # a row without kept tags has no categories
    offsets = np.concatenate([[0], np.cumsum(counts)])
    classes = rng.integers(0, len(imagenet21k()), offsets[-1])
    # Coarse scores make ties common: the order's tie-breaks are exercised.
    scores = rng.integers(0, 5, offsets[-1]).astype(np.float32) / 4
    got = hierarchy.roll_up(offsets, classes, scores, min_depth=min_depth)
    assert got.offsets[0] == 0 and got.offsets[1] == 0
    for r in range(b):
        lo, hi = got.offsets[r], got.offsets[r + 1]
        row = [(hierarchy.wnids[i], float(s)) for i, s in zip(got.ids[lo:hi], got.scores[lo:hi])]
        want = brute_force(
            classes[offsets[r] : offsets[r + 1]], scores[offsets[r] : offsets[r + 1]], min_depth
        )
        assert row == want


def test_score_is_the_best_tag_below(hierarchy, class_of):
    offsets = np.array([0, 2])
    classes = np.array([class_of[GOLDEN_RETRIEVER], class_of[DOG]])
    got = hierarchy.roll_up(offsets, classes, np.array([0.3, 0.8], np.float32))
    by_wnid = {hierarchy.wnids[i]: s for i, s in zip(got.ids, got.scores)}
    assert by_wnid[DOG] == pytest.approx(0.8) and by_wnid["n02083346"] == pytest.approx(0.8)
    assert by_wnid[GOLDEN_RETRIEVER] == pytest.approx(0.3)
    assert by_wnid["n02099029"] == pytest.approx(0.3)  # retriever: only golden retriever below
    assert len(by_wnid) == 19 and len(got.ids) == 19
    # Within a score, deeper first: dog (13), canine (12), ... ; golden retriever's chain last.
    assert list(hierarchy.wnids[got.ids[:2]]) == [DOG, "n02083346"]


def test_hierarchy_refuses_classes_it_does_not_cover():
    with pytest.raises(WordNetError, match="not in the WordNet data"):
        Hierarchy(["n1", "n2"], ["a", "b"], [0, 1], [[], [0]], ["n2", "n3"])


def fake_data_noun(synsets):
    """A data.noun in WordNet's format: the 29-line license header, then one line per synset
    whose 8-digit offset is its byte position. synsets: [(name, words, [(symbol, parent name)])]."""
    header = "".join(f"  {i + 1} license line  \n" for i in range(29))

    def render(offsets):
        lines = []
        for name, words, pointers in synsets:
            ptrs = " ".join(f"{sym} {offsets[p]:08d} n 0000" for sym, p in pointers)
            lines.append(
                f"{offsets[name]:08d} 05 n {len(words):02x} "
                + " ".join(f"{w} 0" for w in words)
                + f" {len(pointers):03d} {ptrs} | a gloss  \n"
            )
        return lines

    lengths = [len(line) for line in render({name: 0 for name, _, _ in synsets})]
    offsets, position = {}, len(header)
    for (name, _, _), length in zip(synsets, lengths):
        offsets[name] = position
        position += length
    return (header + "".join(render(offsets))).encode("latin-1"), offsets


def test_build_script_derives_the_closure_from_data_noun():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_wordnet", f"{wordnet.DATA_DIR}/build_wordnet.py"
    )
    build_wordnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_wordnet)
    data, offsets = fake_data_noun(
        [
            ("entity", ["entity"], []),
            ("animal", ["animal", "beast"], [("@", "entity")]),
            ("pet", ["pet"], [("@", "entity"), ("~", "animal")]),  # `~` (hyponym) is not followed
            ("rock", ["rock"], [("@", "entity")]),  # above no class: left out
            ("dog", ["dog", "domestic_dog"], [("@", "animal"), ("@", "pet")]),
            ("rex", ["Rex"], [("@i", "dog")]),
        ]
    )
    wnid = {name: f"n{offset:08d}" for name, offset in offsets.items()}
    build_wordnet.ROOT = wnid["entity"]
    packed, text, license_text = build_wordnet.build(
        data, [wnid["dog"], wnid["rex"]], ["dog, domestic_dog", "Rex"]
    )
    assert gzip.decompress(packed) == text and license_text.count("\n") == 29
    rows = [line.split("\t") for line in text.decode().splitlines()]
    assert rows == sorted(rows)
    got = {w: (int(d), set(p.split()), label) for w, d, p, label in rows}
    assert got == {
        wnid["entity"]: (0, set(), "entity"),
        wnid["animal"]: (1, {wnid["entity"]}, "animal, beast"),
        wnid["pet"]: (1, {wnid["entity"]}, "pet"),
        wnid["dog"]: (2, {wnid["animal"], wnid["pet"]}, "dog, domestic_dog"),
        wnid["rex"]: (3, {wnid["dog"]}, "Rex"),
    }
    with pytest.raises(ValueError, match="lemmas"):
        build_wordnet.build(data, [wnid["dog"]], ["dog"])
