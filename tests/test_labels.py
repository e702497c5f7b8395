"""model.labels: the packaged BiT ImageNet-21k label files, byte for byte."""

import hashlib
import os
import re

import pytest

from model import labels as labels_mod
from model.labels import LabelSet, imagenet21k


def test_size_and_types():
    ls = imagenet21k()
    assert isinstance(ls, LabelSet)
    assert len(ls) == 21843 == len(ls.wnids) == len(ls.labels)
    assert ls.wnids.dtype == object and isinstance(ls.wnids[0], str)
    assert ls.labels.dtype == object and isinstance(ls.labels[0], str)
    assert imagenet21k() is ls  # cached


@pytest.mark.parametrize(
    "name,sha256",
    [
        (
            "imagenet21k_wordnet_ids.txt",
            "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2",
        ),
        (
            "imagenet21k_wordnet_lemmas.txt",
            "860c2ce731aa376d21352403caf83069577a71c26462a618621ccd38ae9c8c7f",
        ),
    ],
)
def test_file_checksums(name, sha256):
    with open(os.path.join(labels_mod.DATA_DIR, name), "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == sha256
    assert data.endswith(b"\n") and data.count(b"\n") == 21843 and b"\r" not in data
    data.decode("ascii")


@pytest.mark.parametrize(
    "index,wnid,label",
    [
        (0, "n00004475", "organism, being"),
        (359, "n01440764", "tench, Tinca_tinca"),
        (2167, "n02084071", "dog, domestic_dog, Canis_familiaris"),
        (2388, "n02121808", "domestic_cat, house_cat, Felis_domesticus, Felis_catus"),
        (
            9205,
            "n03931044",
            "picture, image, icon, ikon",
        ),  # one of the two extra (non-fall11) classes
        (15027, "n09859684", "bleacher"),  # the other one
        (21842, "n15102894", "knothole"),
    ],
)
def test_known_lookups(index, wnid, label):
    assert imagenet21k().lookup(index) == (wnid, label)


def test_id_order():
    ls = imagenet21k()
    assert all(re.fullmatch(r"n\d{8}", w) for w in ls.wnids)
    assert len(set(ls.wnids)) == 21843
    # Logit order is sorted WordNet-id order (fall11 order plus the two extra ids in place).
    assert list(ls.wnids) == sorted(ls.wnids)
    assert all(lab and lab == lab.strip() and "  " not in lab for lab in ls.labels)
    assert ls.version == "imagenet21k-bit-2019 sha256:860c2ce731aa"


def test_corrupt_data_is_refused(tmp_path, monkeypatch):
    for name in (labels_mod.IDS_FILE, labels_mod.LEMMAS_FILE):
        data = open(os.path.join(labels_mod.DATA_DIR, name), "rb").read()
        (tmp_path / name).write_bytes(data)
    (tmp_path / labels_mod.LEMMAS_FILE).write_bytes(data.replace(b"knothole", b"knotholf"))
    monkeypatch.setattr(labels_mod, "DATA_DIR", str(tmp_path))
    labels_mod.imagenet21k.cache_clear()
    try:
        with pytest.raises(labels_mod.LabelError, match="corrupt"):
            labels_mod.imagenet21k()
        os.remove(tmp_path / labels_mod.IDS_FILE)
        with pytest.raises(labels_mod.LabelError, match="missing"):
            labels_mod.imagenet21k()
    finally:
        labels_mod.imagenet21k.cache_clear()  # the next caller reads the real files again
