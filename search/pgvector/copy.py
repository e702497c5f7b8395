"""PostgreSQL's binary COPY format for the rows of the pgvector table, built from Arrow batches.

Binary COPY sends each value in the type's own wire format, so the server parses no text (a 6144-d
vector as text is ~70 KB of decimals; in binary it is 24 KB it copies). The formats used here:
- the stream: the 11-byte signature, flags and extension length, tuples, the trailer `-1` (int16);
- a tuple: its field count (int16), then each field as length (int32, -1 = NULL) + bytes;
- `text`: UTF-8; `int4`: big-endian; `jsonb`: version byte 1 + JSON text;
- a one-dimensional array (`text[]`, `real[]`): ndim 1, has-nulls 0, element type oid, length,
  lower bound 1, then each element as length + bytes (an empty array: ndim 0);
- pgvector's `vector` / `halfvec`: dimensions (int16), an unused int16 (0), then the values as
  big-endian float32 / float16.
"""

from __future__ import annotations

import struct

import numpy as np

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
NULL = struct.pack(">i", -1)
TEXT_OID = 25
FLOAT4_OID = 700
_EMPTY_ARRAY = {oid: struct.pack(">iii", 0, 0, oid) for oid in (TEXT_OID, FLOAT4_OID)}
_VALUE_TYPES = {"vector": ">f4", "halfvec": ">f2"}


def field(data: bytes | None) -> bytes:
    """One field: its length, then its bytes (NULL for None)."""
    return NULL if data is None else struct.pack(">i", len(data)) + data


def int4(value: int | None) -> bytes:
    return NULL if value is None else b"\x00\x00\x00\x04" + struct.pack(">i", value)


def text_array(values: list[str]) -> bytes:
    """A `text[]` field (no NULL elements)."""
    if not values:
        return field(_EMPTY_ARRAY[TEXT_OID])
    items = [v.encode() for v in values]
    head = struct.pack(">iiiii", 1, 0, TEXT_OID, len(items), 1)
    return field(head + b"".join(struct.pack(">i", len(b)) + b for b in items))


def real_array(values: np.ndarray) -> bytes:
    """A `real[]` field from float32 values (no NULL elements)."""
    n = len(values)
    if not n:
        return field(_EMPTY_ARRAY[FLOAT4_OID])
    items = np.empty(n, dtype=[("len", ">i4"), ("value", ">f4")])
    items["len"], items["value"] = 4, values
    return field(struct.pack(">iiiii", 1, 0, FLOAT4_OID, n, 1) + items.tobytes())


def jsonb(text: str | None) -> bytes:
    return NULL if text is None else field(b"\x01" + text.encode())


def vector_value(vector: np.ndarray, type_: str = "vector") -> bytes:
    """One vector in pgvector's binary format (a query parameter), without the field length."""
    values = np.asarray(vector).reshape(-1)
    return struct.pack(">hh", len(values), 0) + values.astype(_VALUE_TYPES[type_]).tobytes()


def tuples(columns: list[list[bytes]], vectors: list[tuple[np.ndarray, str]]) -> bytearray:
    """The tuples of a batch: per row its field count, the row's encoded field of each of
    `columns`, then a field per (matrix [rows, dim], `vector` or `halfvec`) of `vectors`. The
    vector values are written once, byte-swapped straight into the buffer (no per-row copies:
    at 24 KB a row they are nearly all of the data)."""
    rows = len(columns[0]) if columns else len(vectors[0][0])
    count = struct.pack(">h", len(columns) + len(vectors))
    scalars = [count + b"".join(row) for row in zip(*columns)] if columns else [count] * rows
    layout = []
    for matrix, type_ in vectors:
        dim = matrix.shape[1]
        width = dim * np.dtype(_VALUE_TYPES[type_]).itemsize
        head = struct.pack(">ihh", 4 + width, dim, 0)
        layout.append((matrix, np.dtype(_VALUE_TYPES[type_]), head, width))
    buffer = bytearray(sum(map(len, scalars)) + rows * sum(8 + w for _, _, _, w in layout))
    view, data = memoryview(buffer), np.frombuffer(buffer, np.uint8)
    pos = 0
    for i, scalar in enumerate(scalars):
        view[pos : pos + len(scalar)] = scalar
        pos += len(scalar)
        for matrix, dtype, head, width in layout:
            view[pos : pos + 8] = head
            data[pos + 8 : pos + 8 + width].view(dtype)[:] = matrix[i]
            pos += 8 + width
    return buffer
