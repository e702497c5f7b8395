"""The documentation holds together: README.md is a short front door that links every page of
docs/, and every relative link of README.md, ARCHITECTURE.md and docs/*.md (and its #anchor, for
a Markdown target) resolves to a file in the repository, as GitHub renders it."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README_MAX_LINES = 300
# Pages linked before they are written: a link to one may point at nothing until the page lands;
# test_pending_pages_are_still_missing says when to take its name off.
PENDING_PAGES: set = set()

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def pages() -> list[pathlib.Path]:
    return [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Every inline link and image target, in order."""
    return LINK.findall(prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link syntax and punctuation dropped, lower case, spaces to
    hyphens (hyphens and underscores kept)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """The anchors of a Markdown file's headings; repeated ones get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def problems_of(page: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """What is wrong with each relative link of `page` (a file under `root`)."""
    problems = []
    for target in links(page.read_text()):
        if SCHEME.match(target):
            continue  # http(s), mailto: not this test's business
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        try:
            name = resolved.relative_to(root).as_posix()
        except ValueError:
            problems.append(f"{target}: outside the repository")
            continue
        if path.startswith("/"):
            problems.append(f"{target}: an absolute path (GitHub resolves it from the site root)")
        elif not resolved.exists():
            if name not in PENDING_PAGES:
                problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with the anchor #{anchor} in {name}")
    return problems


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    problems = problems_of(page)
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines: move a topic to docs/"
    )


def test_the_readme_links_every_page_of_docs():
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for target in links((ROOT / "README.md").read_text())
        if not SCHEME.match(target)
    }
    pages_of_docs = {p.resolve() for p in (ROOT / "docs").glob("*.md")}
    pages_of_docs |= {(ROOT / name).resolve() for name in PENDING_PAGES}
    missing = sorted(p.relative_to(ROOT).as_posix() for p in pages_of_docs - linked)
    assert not missing, f"README.md's 'Where to go next' does not link {missing}"


def test_pending_pages_are_still_missing():
    """Once a pending page exists, its links are checked like any other: take it off the list."""
    written = sorted(name for name in PENDING_PAGES if (ROOT / name).exists())
    assert not written, f"{written} exist now: remove them from PENDING_PAGES in {__file__}"


# The checks themselves, on small examples.


def test_links_skip_code():
    text = '[a](a.md) `[b](b.md)` ![c](c.png)\n```\n[d](d.md)\n```\n[e](e.md#x "title")\n'
    assert links(text) == ["a.md", "c.png", "e.md#x"]


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("7. Exit codes", "7-exit-codes"),
        ("`./run.sh dataflow`", "runsh-dataflow"),
        (
            "At scale: `bench/scale.py`, `bench/skip_memory.py`",
            "at-scale-benchscalepy-benchskip_memorypy",
        ),
        ("failures-*.parquet", "failures-parquet"),
        ("Categories: the WordNet roll-up", "categories-the-wordnet-roll-up"),
    ],
)
def test_slug_is_githubs(heading, anchor):
    assert slug(heading) == anchor


def test_a_broken_link_and_anchor_are_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Title\n## Part one\n## Part one\n")
    page.write_text(
        "[ok](other.md#part-one-1) [gone](missing.md) [bad](other.md#part-two) [up](../x.md)\n"
    )
    problems = problems_of(page, root=tmp_path)
    assert [p.split(": ")[0] for p in problems] == ["missing.md", "other.md#part-two", "../x.md"]
