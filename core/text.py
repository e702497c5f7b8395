"""Text shown on a terminal: user data (keys, paths, tags) with its control characters escaped.

A key is whatever a file name, a TFRecord feature or a tar member said; printed raw, an ESC
sequence in it could rewrite the screen, a carriage return hide what came before it, a newline
fake another line. `printable` escapes them, as Python writes them in a string literal (`\\x1b`,
`\\r`, `\\u202e`); JSON output is never passed through it (JSON escapes exactly, by itself).
"""

from __future__ import annotations

import logging
import re

# C0 and C1 control characters and DEL, and the Unicode bidirectional formatting characters
# (which reorder what follows them on screen).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group(0)
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, keep_newlines: bool = False) -> str:
    """`text` (any object, as str) with every control character escaped; `keep_newlines` leaves
    line breaks alone (multi-line log messages and tracebacks)."""
    text = str(text)
    if keep_newlines:
        return "\n".join(_CONTROL.sub(_escape, line) for line in text.split("\n"))
    return _CONTROL.sub(_escape, text)


class PrintableFormatter(logging.Formatter):
    """A log formatter that escapes control characters in messages (line breaks kept)."""

    def formatMessage(self, record):
        record.message = printable(record.message, keep_newlines=True)
        return super().formatMessage(record)
