"""Command-line values checked where they are parsed: every command's numbers have a type and a
range, and a bad one is one line on stderr and exit code 2, never a traceback or a silent default.

The `argparse` type functions below raise `argparse.ArgumentTypeError`, whose text argparse
prints as "argument --k: must be an integer between 1 and 10000, got '1e20'";
`core.errors.ArgumentParser` prints that one line (not argparse's usage block) and exits 2.
"""

from __future__ import annotations

import argparse
import math


def integer(low: int | None = None, high: int | None = None):
    """An argparse type: an integer within [low, high] (either bound may be None)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except (TypeError, ValueError):
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high)}, got {text!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high)}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None):
    """An argparse type: a finite number within [low, high] (either bound may be None)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or (
            (low is not None and value < low) or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(
                f"must be a number {_bounds_text(low, high)}, got {text!r}"
            )
        return value

    parse.__name__ = "number"
    return parse


def _range_text(low, high) -> str:
    if low is not None and high is not None:
        return f"an integer between {low} and {high}"
    return f"an integer {_bounds_text(low, high)}".rstrip()


def _bounds_text(low, high) -> str:
    if low is not None and high is not None:
        return f"between {low:g} and {high:g}"
    if low is not None:
        return f">= {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return ""
