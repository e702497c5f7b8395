"""Rebuild the BiT ImageNet-21k label files byte for byte, offline, from the timm wheel.

BiT publishes `gs://bit_models/imagenet21k_wordnet_ids.txt` and `..._lemmas.txt`
(one class per line, in logit order). Both can be reproduced from data shipped in
timm's wheel (Apache-2.0), see docs/checkpoint-format.md section 4:

* ids    = `timm/data/_info/imagenet21k_goog_synsets.txt`, unchanged;
* lemmas = for each id, timm's `imagenet_synset_to_lemma.txt` entry (`wnid<TAB>lemma, lemma`)
  with the spaces inside each lemma replaced by `_`, lemmas joined by ", ".

Usage (the only network access is the package registry, through pip):

    pip download --no-deps timm==1.0.31 -d /tmp/timm
    python model/data/build_labels.py /tmp/timm/timm-1.0.31-py3-none-any.whl

The outputs are checked against the sha256 of the official files before being written.
"""

import hashlib
import os
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
IDS_FILE = "imagenet21k_wordnet_ids.txt"
LEMMAS_FILE = "imagenet21k_wordnet_lemmas.txt"
IDS_SHA256 = "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"
LEMMAS_SHA256 = "860c2ce731aa376d21352403caf83069577a71c26462a618621ccd38ae9c8c7f"
NUM_CLASSES = 21843


def build(wheel_path):
    """Return (ids_bytes, lemmas_bytes) rebuilt from a timm wheel."""
    with zipfile.ZipFile(wheel_path) as wheel:
        ids_bytes = wheel.read("timm/data/_info/imagenet21k_goog_synsets.txt")
        synset_to_lemma = wheel.read("timm/data/_info/imagenet_synset_to_lemma.txt").decode("ascii")
    lemma_of = dict(line.split("\t", 1) for line in synset_to_lemma.splitlines() if line)
    ids = ids_bytes.decode("ascii").splitlines()
    lines = [
        ", ".join(lemma.strip().replace(" ", "_") for lemma in lemma_of[wnid].split(","))
        for wnid in ids
    ]
    return ids_bytes, ("\n".join(lines) + "\n").encode("ascii")


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    ids_bytes, lemmas_bytes = build(argv[1])
    for name, data, want in (
        (IDS_FILE, ids_bytes, IDS_SHA256),
        (LEMMAS_FILE, lemmas_bytes, LEMMAS_SHA256),
    ):
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            sys.exit(f"{name}: sha256 {got} != expected {want}; wrong timm version?")
        lines = data.count(b"\n")
        if lines != NUM_CLASSES:
            sys.exit(f"{name}: {lines} lines, expected {NUM_CLASSES}")
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
        print(f"wrote {name} ({len(data)} bytes, sha256 {got})")


if __name__ == "__main__":
    main(sys.argv)
