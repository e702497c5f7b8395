"""core/text.py: user data shown on a terminal has its control characters escaped."""

from core.text import printable


def test_control_characters_are_escaped_and_everything_else_kept():
    key = "photos/\x1b[2J\x1b]0;owned\x07cat\rdog\n\u202egpj.exe\x7f\x9b.jpg"
    shown = printable(key)
    assert shown == "photos/\\x1b[2J\\x1b]0;owned\\x07cat\\rdog\\n\\u202egpj.exe\\x7f\\x9b.jpg"
    assert printable("Zürich/写真 1.jpg") == "Zürich/写真 1.jpg"
    assert printable(3) == "3"


def test_line_breaks_can_be_kept_for_multi_line_messages():
    assert printable("a\x1b[31m\nb\tc", keep_newlines=True) == "a\\x1b[31m\nb\\tc"
