"""tools/gen_options.py: docs/options.md is generated from the parsers and matches every command's
`--help`; every flag has a real help text."""

import re
import subprocess
import sys

import pytest

from tools import gen_options

HELP_COMMANDS = {
    "./run.sh --input ... --output ...": ["pipeline"],
    "./run.sh dataflow": ["pipeline.dataflow"],
    "./run.sh fit_pca": ["pipeline.fit_pca"],
    "./run.sh report": ["pipeline.report"],
    "./run.sh index": ["search", "index"],
    "./run.sh search": ["search", "search"],
    "./run.sh load": ["search.pgvector", "load"],
    "./run.sh serve": ["search", "serve"],
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*")


def sections(page: str) -> dict:
    """The page's text under each `## \\`usage\\`` heading."""
    parts = re.split(r"^## `(.+)`$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_page_is_current():
    assert gen_options.PAGE.read_text() == gen_options.render(), "run ./run.sh docs"


def test_the_page_documents_every_command():
    assert list(sections(gen_options.render())) == list(HELP_COMMANDS)


@pytest.mark.parametrize("usage", list(HELP_COMMANDS))
def test_every_flag_of_the_help_is_on_the_page(usage):
    """What `--help` of the command itself prints (a subprocess, as a user runs it)."""
    done = subprocess.run(
        [sys.executable, "-m", *HELP_COMMANDS[usage], "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    flags = set(FLAG.findall(done.stdout)) - {"--help"}
    table = sections(gen_options.PAGE.read_text())[usage]
    listed = set(re.findall(r"^\| `(--[\w]+)`", table, flags=re.M))
    assert flags <= listed | set(FLAG.findall(table)), sorted(flags - listed)
    assert {flag for flag in listed if flag not in done.stdout} == set()


@pytest.mark.parametrize(
    "usage, parser, action",
    [
        (usage, parser, action)
        for usage, parser, _ in gen_options.commands()
        for action in gen_options.documented(parser)
    ],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "dest", ""),
)
def test_every_flag_has_a_help_text(usage, parser, action):
    text = gen_options.help_text(parser, action)
    assert len(text.split()) >= 4, f"{usage} {action.option_strings or action.dest}: {text!r}"


def test_check_mode_finds_a_stale_page(tmp_path, monkeypatch, capsys):
    assert gen_options.main(["--check"]) == 0
    stale = tmp_path / "stale-page"
    stale.write_text(gen_options.render().replace("--top_k", "--top_n"))
    monkeypatch.setattr(gen_options, "PAGE", stale)
    monkeypatch.setattr(gen_options, "ROOT", tmp_path)
    assert gen_options.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
