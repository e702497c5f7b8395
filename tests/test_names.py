"""Names that are not UTF-8 as keys (core/names.py): unchanged when valid, else escaped,
losslessly and stably, and always writable as UTF-8."""

import os

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.names import (
    escaped_name_taken,
    from_element,
    is_text,
    key_text,
    name_bytes,
    to_element,
)


@pytest.mark.parametrize(
    "name", ["/data/a.jpg", "/data/50% off.jpg", "/dämon/ü€😀.png", "gs://b/%41.jpg", ""]
)
def test_a_name_that_is_utf8_is_its_own_key(name):
    assert key_text(name) == name
    assert to_element(name) is name and from_element(name) == name


def test_undecodable_bytes_are_percent_escaped_and_so_is_percent():
    name = os.fsdecode(b"/data/caf\xe9 50%.jpg")  # Latin-1 e-acute, as os.walk hands it over
    assert not is_text(name)
    assert key_text(name) == "/data/caf%E9 50%25.jpg"
    assert name_bytes(key_text(name)) == b"/data/caf\xe9 50%.jpg"
    assert key_text(os.fsdecode(b"\xff\xfe")) == "%FF%FE"


def test_escaping_keeps_the_valid_utf8_around_the_bad_bytes():
    name = os.fsdecode("ü/€".encode() + b"\x80" + "😀.jpg".encode())
    assert key_text(name) == "ü/€%80😀.jpg"


@given(st.binary(max_size=40))
def test_every_byte_name_gets_a_stable_reversible_utf8_key(raw):
    name = os.fsdecode(raw)
    text = key_text(name)
    text.encode("utf-8")  # never raises
    assert key_text(os.fsdecode(raw)) == text  # a function of the bytes alone
    assert os.fsencode(from_element(to_element(name))) == raw  # travels through Beam intact
    if is_text(name):
        assert text == name
    else:
        assert name_bytes(text) == raw


@given(st.binary(max_size=12), st.binary(max_size=12))
def test_different_non_utf8_names_get_different_keys(a, b):
    name_a, name_b = os.fsdecode(a), os.fsdecode(b)
    if a != b and not is_text(name_a) and not is_text(name_b):
        assert key_text(name_a) != key_text(name_b)


def test_keys_are_writable_to_parquet():
    names = [os.fsdecode(b"/d/\xff.jpg"), os.fsdecode(b"/d/\xc3(.jpg"), "/d/ok.jpg"]
    with pytest.raises(UnicodeEncodeError):
        pa.array(names)  # what killed the job: a raw surrogate string
    assert pa.array([key_text(n) for n in names]).to_pylist() == [
        "/d/%FF.jpg",
        "/d/%C3(.jpg",
        "/d/ok.jpg",
    ]


def test_escaped_name_taken_only_when_the_escaped_text_is_a_file(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/x\xff.jpg"
    open(raw, "wb").close()
    name = os.fsdecode(raw)
    assert not escaped_name_taken(name)
    (tmp_path / "x%FF.jpg").write_bytes(b"")
    assert escaped_name_taken(name)
    assert not escaped_name_taken(str(tmp_path / "x%FF.jpg"))  # a UTF-8 name is never escaped
