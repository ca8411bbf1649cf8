"""The README stays a front page, and every relative link in it and in docs/ lands somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150
LINE_MAX = 100  # prose and code; table rows may run longer, up to TABLE_ROW_MAX
TABLE_ROW_MAX = 300

_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_TARGET = re.compile(r"\]\([^)\s]+\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown page (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """The relative links of a page whose file or heading anchor does not exist."""
    bad = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
            bad.append(f"{target}: no file {shown}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text("utf-8")):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
        elif anchor and dest.suffix not in (".md", ".csv", ".json"):
            # a quoted figure's row:column (CSV) or key path (JSON): tests/test_quoted_figures.py
            bad.append(f"{target}: an anchor into a file that is not Markdown")
    return bad


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    # it links into the manual, and the manual has an index
    assert "docs/README.md" in "\n".join(lines)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_line_lengths(page: Path) -> None:
    # a link's target is not read as text: a quoted figure links to its report file and row
    shown = [_TARGET.sub("]()", line) for line in page.read_text(encoding="utf-8").splitlines()]
    long = [
        f"{page.name}:{i}: {len(line)} characters"
        for i, line in enumerate(shown, 1)
        if len(line) > (TABLE_ROW_MAX if line.lstrip().startswith("|") else LINE_MAX)
    ]
    assert long == []


def test_every_docs_page_is_indexed() -> None:
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert {p for p in pages if f"]({p})" not in index} == set()


def test_checker_finds_broken_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The link check itself: a missing file, a missing anchor, and links that are fine."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Other page\n\n## The `client:` block\n\n## Other page\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n[ok](other.md) [ok](other.md#the-client-block) [ok](other.md#other-page-1)\n"
        "[ok](#top) [web](https://example.org/x#y) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[gone](missing.md) [no anchor](other.md#nothing) [self](#nothing-here)\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "missing.md: no file missing.md",
        "other.md#nothing: no heading #nothing in other.md",
        "#nothing-here: no heading #nothing-here in page.md",
    ]
