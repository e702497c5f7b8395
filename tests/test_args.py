"""core/args.py: typed, ranged command-line values; one line and exit 2 when wrong; quiet pipes."""

import subprocess
import sys

import pytest

from core.args import OneLineParser, integer, number


def parser():
    p = OneLineParser(prog="run.sh search")
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


def test_a_reader_that_stops_reading_ends_the_writer_quietly():
    writer = (
        "from core.args import quiet_broken_pipe\n"
        "import sys\n"
        "def main():\n"
        "    for i in range(200000):\n"
        "        print('line', i)\n"
        "    return 0\n"
        "sys.exit(quiet_broken_pipe(main))\n"
    )
    done = subprocess.run(
        f'{sys.executable} -c "{writer}" | head -1; echo "status ${{PIPESTATUS[0]}}"',
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "line 0\nstatus 0\n"
    assert done.stderr == ""
