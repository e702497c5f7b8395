"""core/args.py: typed, ranged command-line values; one line and exit 2 when wrong."""

import pytest

from core.args import integer, number
from core.errors import ArgumentParser


def parser():
    p = ArgumentParser(prog="run.sh search")
    p.add_argument("--k", type=integer(1, 10_000), default=10)
    p.add_argument("--secs", type=number(0.0), default=1.0)
    return p


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--k", "1000000000"],
            "argument --k: must be an integer between 1 and 10000, got '1000000000'",
        ),
        (["--k", "1e20"], "argument --k: must be an integer between 1 and 10000, got '1e20'"),
        (["--k", "0"], "argument --k: must be an integer between 1 and 10000, got '0'"),
        (["--k", "ten"], "argument --k: must be an integer between 1 and 10000, got 'ten'"),
        (["--secs", "nan"], "argument --secs: must be a number >= 0, got 'nan'"),
        (["--secs", "-1"], "argument --secs: must be a number >= 0, got '-1'"),
        (["--secs", "inf"], "argument --secs: must be a number >= 0, got 'inf'"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"run.sh search: error: {message}\n"


def test_good_values_are_typed():
    args = parser().parse_args(["--k", "10000", "--secs", "0.5"])
    assert (args.k, args.secs) == (10_000, 0.5)
