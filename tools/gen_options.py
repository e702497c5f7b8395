"""Writes docs/options.md from the option definitions: `JobOptions` and the argparse parser of
every command (`python -m tools.gen_options`, `./run.sh docs`; `--check` only compares).

The page is a pure function of the parsers (declaration order, no dates, no machine-dependent
defaults) and of the table of environment variables below, so regenerating it after any flag
change gives a reviewable diff, and
tests/test_gen_options.py fails when the page and `--help` drift apart.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs/options.md"
_UNTITLED = ("positional arguments", "options", "optional arguments")
INTRO = """\
# Options

Every flag of every command, generated from the parsers themselves by `./run.sh docs`
(`python -m tools.gen_options`); `tests/test_gen_options.py` fails when this page and `--help`
differ. A bad flag or value is one line on stderr and exit 2; the exit codes of every command are
in [outputs.md](outputs.md#7-exit-codes). What the job reads and how to run it:
[running.md](running.md); the environment variables: [at the end](#environment-variables).
"""
# Settings that are not flags, (variable, default, what): a table below the generated ones.
ENVIRONMENT = (
    (
        "BIT_CACHE_DIR",
        "`~/.cache/bit_tagger`",
        "the checkpoint cache (as `--model_cache_dir`), and where the index of a `gs://` OUTPUT "
        "lives (`index/gs/BUCKET/PATH`)",
    ),
    (
        "BIT_TAGGER_KERNEL_DIR",
        "`~/.cache/bit_tagger/kernels`",
        "where the fused CPU GroupNorm kernel is built and cached",
    ),
    (
        "BIT_TAGGER_FUSED_KERNELS",
        "on",
        "`0`: GroupNorm in TensorFlow ops on the CPU instead of the fused kernel",
    ),
    ("CXX", "`g++`", "the C++ compiler that builds that kernel"),
    (
        "BIT_TAGGER_VENV",
        "`.venv/` next to `run.sh`",
        "where `run.sh` keeps its virtual environment",
    ),
    (
        "STORAGE_EMULATOR_HOST",
        "unset",
        "a Cloud Storage emulator for every `gs://` path (what the tests use)",
    ),
)


def commands() -> list[tuple[str, argparse.ArgumentParser, tuple[str, ...]]]:
    """(how a user runs it, its parser, flags required though argparse does not enforce them) of
    every command, in the order of the page."""
    from pipeline import dataflow, fit_pca, main, report
    from search import cli
    from search.pgvector import cli as pgvector_cli

    search_commands = _subcommands(cli.parser())
    return [
        ("./run.sh --input ... --output ...", main.parser(), main.REQUIRED_FLAGS),
        ("./run.sh dataflow", dataflow._parser(), ()),
        ("./run.sh fit_pca", fit_pca._parser(), ()),
        ("./run.sh report", report._parser(), ()),
        ("./run.sh index", search_commands["index"], ()),
        ("./run.sh search", search_commands["search"], ()),
        ("./run.sh load", _subcommands(pgvector_cli.parser())["load"], ()),
        ("./run.sh serve", search_commands["serve"], ()),
    ]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return parser._subparsers._group_actions[0].choices


def documented(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions a user sets: every flag and positional argument but `--help`."""
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help string as `--help` prints it (`%(default)s` and the like expanded)."""
    return parser._get_formatter()._expand_help(action) if action.help else ""


def _cell(text: str) -> str:
    """One line of Markdown: table pipes and glob stars escaped (`*` would start emphasis)."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("*", "\\*")


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`"
    return ", ".join(f"`{flag}`" for flag in action.option_strings)


def _default(action: argparse.Action, required: tuple[str, ...]) -> str:
    if not action.option_strings or action.required or action.dest in required:
        return "(required)"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if action.default is False else "on"
    if action.default is None or action.default == argparse.SUPPRESS:
        return ""
    return f"`{action.default}`"


def _description(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = help_text(parser, action)
    if action.choices:
        text += " One of: " + ", ".join(f"`{c}`" for c in action.choices) + "."
    return _cell(text)


def _table(parser: argparse.ArgumentParser, actions: list, required: tuple) -> list[str]:
    lines = ["| flag | default | description |", "| --- | --- | --- |"]
    for action in actions:
        lines.append(
            f"| {_name(action)} | {_default(action, required)} | {_description(parser, action)} |"
        )
    return lines


def _sections(parser: argparse.ArgumentParser) -> list[tuple[str | None, list]]:
    """(title or None, actions) in parser order; argparse's own untitled groups (positional
    arguments, options) make one section."""
    actions = set(documented(parser))
    sections: list[tuple[str | None, list]] = []
    for group in parser._action_groups:
        mine = [a for a in group._group_actions if a in actions]
        title = None if group.title in _UNTITLED else group.title
        if not mine:
            continue
        if title is None and sections and sections[-1][0] is None:
            sections[-1][1].extend(mine)
        else:
            sections.append((title, mine))
    return sections


def render() -> str:
    """The whole page."""
    out = [INTRO]
    for usage, parser, required in commands():
        out += [f"## `{usage}`", ""]
        if parser.description:
            out += [_cell(parser.description), ""]
        for title, actions in _sections(parser):
            if title:
                out += [f"### {title}", ""]
            out += _table(parser, actions, required) + [""]
        if parser.epilog:
            out += [_cell(parser.epilog), ""]
    out += ["## Environment variables", "", "| variable | default | what |", "| --- | --- | --- |"]
    out += [f"| `{name}` | {default} | {_cell(what)} |" for name, default, what in ENVIRONMENT]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gen_options", description=__doc__)
    ap.add_argument("--check", action="store_true", help="only say whether the page is current")
    args = ap.parse_args(argv)
    page = render()
    if args.check:
        current = PAGE.read_text() if PAGE.exists() else ""
        if current != page:
            print(f"{PAGE.relative_to(ROOT)} is stale: run ./run.sh docs", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
