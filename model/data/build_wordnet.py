"""Rebuild `wordnet30_hypernyms.tsv.gz` byte for byte, offline, from Debian's `wordnet-base`.

BiT's 21,843 ImageNet-21k classes are WordNet 3.0 noun synsets: the wnid `nXXXXXXXX` is the
synset's offset in `data.noun` (also the byte position of its line). The shipped file is the
hypernym closure of those classes: every class and every synset above it, following the `@`
(hypernym) and `@i` (instance hypernym) pointers up to `entity` (n00001740), 23,547 synsets.

One line per synset, sorted by wnid, tab-separated, ASCII, gzip (mtime 0, no file name):

    wnid <TAB> depth <TAB> parent wnids (space-separated; empty for entity) <TAB> label

* depth: the LONGEST hypernym path from `entity` (depth 0), so every synset is deeper than each
  of its ancestors (WordNet is a DAG: dog n02084071 has two parents, canine and domestic_animal);
* label: the synset's lemmas joined by ", ", underscores kept, the convention of
  `imagenet21k_wordnet_lemmas.txt` (checked equal for all 21,843 classes).

Usage (the only network access is the Debian mirror, through apt):

    apt-get update && apt-get download wordnet-base
    dpkg-deb -x wordnet-base_*.deb /tmp/wordnet
    python model/data/build_wordnet.py /tmp/wordnet/usr/share/wordnet/data.noun

The output is checked against the recorded sha256 before being written, and WordNet's license
notice (the 29-line header of data.noun) is written beside it as `WORDNET_LICENSE`.
"""

import gzip
import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT_FILE = "wordnet30_hypernyms.tsv.gz"
LICENSE_FILE = "WORDNET_LICENSE"
# sha256 of the gzip file as written (gzip level 9, mtime 0) and of its uncompressed text.
OUTPUT_SHA256 = "8bbec5329f814e61aa6700822e01f73b41e27f4da9dfa71fe9b50abc29d9f589"
TEXT_SHA256 = "1cd3dfcbd9bff0770691a169d254294fce44847c15336bda5cb77fd0351fd230"
IDS_FILE = "imagenet21k_wordnet_ids.txt"
LEMMAS_FILE = "imagenet21k_wordnet_lemmas.txt"
ROOT = "n00001740"
LICENSE_LINES = 29
HYPERNYM_POINTERS = ("@", "@i")


def parse_data_noun(data: bytes):
    """{wnid: (lemmas label, [parent wnids])} and the license header of WordNet's data.noun."""
    lines = data.decode("latin-1").split("\n")
    header = [line for line in lines[:LICENSE_LINES]]
    if not all(line.startswith("  ") for line in header):
        raise ValueError("data.noun does not start with the 29-line license header")
    synsets = {}
    position = sum(len(line) + 1 for line in header)
    for line in lines[LICENSE_LINES:]:
        if not line:
            position += 1
            continue
        fields = line.split(" ")
        offset = fields[0]
        if int(offset) != position:
            raise ValueError(f"synset {offset} is at byte {position}: not WordNet 3.0's data.noun")
        position += len(line) + 1
        n_words = int(fields[3], 16)
        words = fields[4 : 4 + 2 * n_words : 2]
        i = 4 + 2 * n_words
        n_pointers = int(fields[i])
        parents = []
        for j in range(n_pointers):
            symbol, target, pos = fields[i + 1 + 4 * j : i + 4 + 4 * j]
            if symbol in HYPERNYM_POINTERS and pos == "n":
                parents.append("n" + target)
        synsets["n" + offset] = (", ".join(words), parents)
    return synsets, "\n".join(header) + "\n"


def closure(synsets: dict, classes: list) -> dict:
    """{wnid: (depth, parents, label)} for the classes and all their hypernym ancestors."""
    nodes, stack = set(), list(classes)
    while stack:
        wnid = stack.pop()
        if wnid not in nodes:
            nodes.add(wnid)
            stack.extend(synsets[wnid][1])
    depth = {}

    def longest(wnid):  # iterative: no recursion limit on deep chains
        todo = [wnid]
        while todo:
            w = todo[-1]
            missing = [p for p in synsets[w][1] if p not in depth]
            if missing:
                todo.extend(missing)
                continue
            todo.pop()
            depth[w] = 1 + max((depth[p] for p in synsets[w][1]), default=-1)
        return depth[wnid]

    out = {}
    for wnid in nodes:
        label, parents = synsets[wnid]
        out[wnid] = (longest(wnid), parents, label)
    roots = [w for w, (_, parents, _) in out.items() if not parents]
    if roots != [ROOT]:
        raise ValueError(f"expected the single root {ROOT} (entity), got {roots}")
    return out


def build(data_noun: bytes, ids: list, lemmas: list):
    """(gzip bytes, text bytes, license text) of the shipped file, checked against the labels."""
    synsets, license_text = parse_data_noun(data_noun)
    for wnid, lemma in zip(ids, lemmas):
        if synsets[wnid][0] != lemma:
            raise ValueError(f"{wnid}: data.noun lemmas {synsets[wnid][0]!r} != label {lemma!r}")
    nodes = closure(synsets, ids)
    text = "".join(
        f"{w}\t{d}\t{' '.join(parents)}\t{label}\n"
        for w, (d, parents, label) in sorted(nodes.items())
    )
    text_bytes = text.encode("ascii")
    return gzip.compress(text_bytes, compresslevel=9, mtime=0), text_bytes, license_text


def _lines(name):
    with open(os.path.join(HERE, name), "rb") as f:
        return f.read().decode("ascii").split("\n")[:-1]


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    with open(argv[1], "rb") as f:
        data_noun = f.read()
    packed, text, license_text = build(data_noun, _lines(IDS_FILE), _lines(LEMMAS_FILE))
    for what, data, want in (("text", text, TEXT_SHA256), (OUTPUT_FILE, packed, OUTPUT_SHA256)):
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            sys.exit(f"{what}: sha256 {got} != expected {want}; not WordNet 3.0 (wordnet-base)?")
    with open(os.path.join(HERE, OUTPUT_FILE), "wb") as f:
        f.write(packed)
    with open(os.path.join(HERE, LICENSE_FILE), "w", encoding="ascii") as f:
        f.write(license_text)
    synsets = text.count(b"\n")
    print(
        f"wrote {OUTPUT_FILE} ({len(packed)} bytes, {synsets} synsets, "
        f"sha256 {hashlib.sha256(packed).hexdigest()}) and {LICENSE_FILE}"
    )


if __name__ == "__main__":
    main(sys.argv)
