"""ARCHITECTURE.md matches the code, and the repository stands alone.

Every `from X import a, b` statement in ARCHITECTURE.md's Python blocks must import; no tracked
file may point at a Markdown file that is not in the repository, or at a path outside it. (The
links of the Markdown pages themselves, anchors included: tests/test_docs.py.)
"""

import ast
import pathlib
import re
import subprocess

import pytest

from tests.test_docs import PENDING_PAGES

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A path out of the checkout, or a note that never was part of it.
OUTSIDE = re.compile(
    r"\.\./shared|/work/|\b(?:DESIGN|BIT_FORMAT|PERF_NOTES|DATAFLOW_NOTES|"
    r"SEARCH_NOTES)\.md\b|docs/SCALE\.md"
)
MARKDOWN_REF = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".sh", ".cfg", ".toml", ".cc", ".yml", ".yaml", ""}


def listed_imports():
    """(module, name) of every `from X import ...` statement (one or more lines) in the blocks."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found = []
    for node in ast.walk(ast.parse("\n".join(blocks))):
        if isinstance(node, ast.ImportFrom):
            found += [(node.module, alias.name) for alias in node.names]
    return found


def tracked_text_files():
    try:
        names = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        names = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not {".git", ".venv"} & set(p.relative_to(ROOT).parts)
        ]
    paths = [ROOT / n for n in names]
    return [
        p
        for p in paths
        if p.is_file()
        and (p.suffix in TEXT_SUFFIXES or p.name == "Dockerfile")
        and p.stat().st_size < 1_000_000
        and "data" not in p.relative_to(ROOT).parts[:2]
    ]


def test_architecture_lists_enough_names():
    modules = {module for module, _ in listed_imports()}
    assert len(modules) >= 20
    assert {"core.storage", "model.resnet", "transforms.read", "pipeline.graph"} <= modules


@pytest.mark.parametrize("module, name", listed_imports())
def test_every_listed_name_is_importable(module, name):
    namespace = {}
    exec(f"from {module} import {name}", namespace)  # noqa: S102 - submodules too, as a user would
    assert name in namespace


def test_every_module_table_entry_exists():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for path in re.findall(
        r"^\| `((?:core|model|transforms|pipeline|search)/[\w/]*(?:\.py|/))`", text, re.M
    ):
        assert (ROOT / path).exists(), path


def test_no_file_refers_outside_the_repository():
    problems = []
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        if path.name in ("test_architecture.py", "test_docs.py"):
            continue  # the patterns and the examples themselves
        for match in OUTSIDE.finditer(text):
            problems.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
        for ref in MARKDOWN_REF.findall(text):
            # from the root, the file's folder, or docs/ (a page's name alone: "outputs.md")
            places = [ROOT / ref, path.parent / ref, ROOT / "docs" / ref]
            if not any(place.exists() for place in places) and not any(
                place.resolve().relative_to(ROOT).as_posix() in PENDING_PAGES
                for place in places
                if place.resolve().is_relative_to(ROOT)
            ):
                problems.append(f"{path.relative_to(ROOT)}: {ref} does not exist")
    assert not problems, "\n".join(problems)
