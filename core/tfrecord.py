"""TFRecord framing and tf.train.Example parsing without TensorFlow (Beam-free, no TF import).

A TFRecord file is a sequence of records, each framed as

    u64 length | u32 masked CRC-32C of those 8 bytes | data[length] | u32 masked CRC of data

(all little-endian). `check_header` / `check_data` check one record's framing and say what is
wrong, in the words of the job's failure rows; the job's reader (`transforms.read`) and the search
server's image reader (`search.originals`, which reads one record at a recorded offset) share them.

`example_features` reads the two feature kinds a key or an image can be held in (bytes and int64
lists) from a serialized tf.train.Example, straight from the protobuf wire format, so that reading
one record does not import TensorFlow (seconds, and hundreds of MB). The job itself parses with
TensorFlow's protobuf classes; this parser is only for records the job already read.
"""

from __future__ import annotations

import struct
from typing import Iterator, Optional

HEADER_BYTES = 12  # length + its CRC
FOOTER_BYTES = 4  # the data's CRC
MAX_RECORD_LENGTH = 1 << 31  # longer is damage, not a record
# The features a record's key is read from, in order (as the job reads them).
KEY_FEATURES = ("image/key", "image/source_id", "image/filename")


def _crc32c_function():
    """Fastest CRC-32C at hand as `extend(crc, data)`: google-crc32c (a Beam[gcp] dependency),
    crc32c, or pure Python."""
    try:
        import google_crc32c

        return google_crc32c.extend
    except ImportError:
        pass
    try:
        import crc32c

        return lambda crc, data: crc32c.crc32c(data, crc)
    except ImportError:
        return _crc32c_python


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = None


def _crc32c_python(crc: int, data: bytes) -> int:
    global _TABLE
    if _TABLE is None:
        _TABLE = _crc32c_table()
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


crc32c_extend = _crc32c_function()


def mask(crc: int) -> int:
    """TFRecord's mask of a CRC-32C."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    return mask(crc32c_extend(0, data))


def check_header(header: bytes) -> tuple[Optional[str], int]:
    """(problem or None, data length) of a record's 12-byte header."""
    if len(header) < HEADER_BYTES:
        return f"truncated record header ({len(header)} of 12 bytes)", 0
    length, length_crc = struct.unpack("<QI", header[:HEADER_BYTES])
    if masked_crc32c(header[:8]) != length_crc:
        return "length CRC mismatch", 0
    if length > MAX_RECORD_LENGTH:
        return f"record length {length} is implausible", 0
    return None, length


def check_data(data: bytes, length: int, footer: bytes) -> Optional[str]:
    """The problem of a record's data and its 4-byte CRC footer, or None."""
    if len(data) < length:
        return f"truncated record ({len(data)} of {length} data bytes)"
    if len(footer) < FOOTER_BYTES:
        return "truncated record (data CRC missing)"
    if masked_crc32c(data) != struct.unpack("<I", footer[:FOOTER_BYTES])[0]:
        return "data CRC mismatch"
    return None


# ------------------------------------------------------------------------------ tf.train.Example


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint over 10 bytes")


def _fields(buf) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message: an int for varints, a memoryview
    for length-delimited fields, None for fixed-width ones."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            pos, value = pos + (8 if wire == 1 else 4), None
        else:
            raise ValueError(f"wire type {wire} is not used by tf.train.Example")
        if pos > end:
            raise ValueError("truncated field")
        yield number, wire, value


def _feature(buf) -> list:
    """The values of one tf.train.Feature: bytes for a bytes_list, ints for an int64_list, [] for
    a float_list (the last kind given wins, as in protobuf's oneof)."""
    values: list = []
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:  # bytes_list
            values = [bytes(v) for n, w, v in _fields(value) if n == 1 and w == 2]
        elif number == 3 and wire == 2:  # int64_list, packed or not
            values = []
            for n, w, v in _fields(value):
                if n == 1 and w == 0:
                    values.append(v)
                elif n == 1 and w == 2:
                    pos = 0
                    while pos < len(v):
                        item, pos = _varint(v, pos)
                        values.append(item)
            values = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
        elif number == 2:  # float_list: not a key or an image
            values = []
    return values


def example_features(data: bytes) -> dict[str, list]:
    """name -> values (bytes or int) of the bytes and int64 features of a serialized
    tf.train.Example; ValueError when the bytes are not one."""
    features: dict[str, list] = {}
    for number, wire, value in _fields(memoryview(data)):
        if number != 1 or wire != 2:  # Example.features
            continue
        for n, w, entry in _fields(value):  # Features.feature: map<string, Feature> entries
            if n != 1 or w != 2:
                continue
            name, feature = "", b""
            for n2, w2, item in _fields(entry):
                if n2 == 1 and w2 == 2:
                    name = bytes(item).decode("utf-8")
                elif n2 == 2 and w2 == 2:
                    feature = item
            features[name] = _feature(feature)
    return features


def example_key(features: dict[str, list]) -> Optional[str]:
    """The key the job gives a record with these features (`KEY_FEATURES`), or None (the key is
    then `<shard>:<index>`)."""
    for name in KEY_FEATURES:
        values = features.get(name)
        if not values:
            continue
        if isinstance(values[0], bytes):
            if values[0]:
                return values[0].decode("utf-8", "backslashreplace")
        else:
            return str(values[0])
    return None
