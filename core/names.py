"""File and tar member names as keys: any name a filesystem holds becomes valid UTF-8, losslessly.

POSIX file names are bytes. Python hands a name that is not valid UTF-8 over as a str holding lone
surrogates (`os.fsdecode`, PEP 383 "surrogateescape": byte 0xFF -> U+DCFF), and so do `os.walk`,
Beam's local `FileSystems.match` and `tarfile`. Such a str cannot be written to Parquet, printed
strictly or encoded by Beam's coders. `key_text` turns it into the key and source text
(docs/bad-input.md, "Names that are not UTF-8"):

- a name that is valid UTF-8 is its own text, unchanged (every key of such a name stays as it was);
- in a name that is not, every byte that is not part of a valid UTF-8 sequence is written `%XX`
  (two upper-case hex digits), and every `%` of that name is written `%25`. `b"caf\\xe9 50%.jpg"`
  (Latin-1) -> `caf%E9 50%25.jpg`.

The text is stable (a function of the bytes alone), valid UTF-8, and reversible: `name_bytes` gives
the bytes back. It is unique except where a name that is valid UTF-8 is literally the escaped text
of another one in the same input (`caf%E9.jpg` beside `caf\\xe9.jpg`): the reader then makes the
non-UTF-8 one a `DuplicateKey` failure (`escaped_name_taken`), as for any key read twice.

Beam's coders encode str as UTF-8, so a path with surrogates travels through a PCollection as its
bytes (`to_element` / `from_element`); gs:// object names are always valid UTF-8 and stay str.
"""

from __future__ import annotations

import os
import re

_SURROGATES = re.compile("[\ud800-\udfff]")
_ESCAPED = re.compile(rb"%([0-9A-F]{2})")


def is_text(name: str) -> bool:
    """True when `name` is valid Unicode text (no lone surrogates), so it encodes as UTF-8."""
    return _SURROGATES.search(name) is None


def key_text(name: str) -> str:
    """The name as valid UTF-8 text (see the module docstring); unchanged when it already is."""
    if is_text(name):
        return name
    out = []
    for char in name:
        if char == "%":
            out.append("%25")
        elif "\udc80" <= char <= "\udcff":  # an undecodable byte, as surrogateescape holds it
            out.append(f"%{ord(char) - 0xDC00:02X}")
        elif is_text(char):
            out.append(char)
        else:  # another lone surrogate (not from a file name): its UTF-8-style bytes
            out.extend(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))
    return "".join(out)


def name_bytes(text: str) -> bytes:
    """The bytes of the name `key_text` made `text` from, for a text that was escaped (a name that
    was not UTF-8): every `%XX` back to byte XX."""
    return _ESCAPED.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))


def escaped_name_taken(path: str) -> bool:
    """True when `path` is a local name that is not UTF-8 and its key text is the name of another
    file that exists (the one case where two files would get one key)."""
    if is_text(path) or "://" in path:
        return False
    return os.path.lexists(key_text(path))


def to_element(path: str) -> str | bytes:
    """A path as a PCollection element: itself, or its bytes when it is not valid UTF-8."""
    return path if is_text(path) else os.fsencode(path)


def from_element(element: str | bytes) -> str:
    """The path of a PCollection element made by `to_element`."""
    return os.fsdecode(element) if isinstance(element, bytes) else element
