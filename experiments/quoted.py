"""Check that every figure the docs quote from a report equals the number in that report.

A quoted figure is a Markdown link whose text is the figure and whose target is a committed
report or benchmark result, with a fragment naming the number::

    [0.644 ± 0.139](../experiments/reports/published/preference_source/summary.csv#mixed:val/align_rate)
    [14](../experiments/reports/published/preference_source/summary.csv#mixed:pairs/val_clinician)
    [1.50×](../bench/results/published/w_grid-open_clip_ViT-B-16-copies6.json#ratio)

For a CSV file the fragment is ``ROW:COLUMN``, ROW the value of the file's first column (the
cell); ``mean ± sd`` is checked against COLUMN and ``COLUMN sd``. For a JSON file it is a key
path separated by dots. A number matches when the file's value, rounded to the decimals quoted,
is the quoted text (a figure quoted with ``%`` may also be the value as a fraction: ``38.5 %`` for
0.385); a value that is not a number (a count range ``12-16``) must be equal as text.

A page can also be held to quoting every figure (:func:`unquoted_figures`: a number with a unit
of time, memory, rate, share or ratio outside a quoted link) and a summary table to citing a
result in every row (:func:`uncited_rows`); ``tests/test_quoted_figures.py`` holds
``docs/performance.md`` to both.

    python experiments/quoted.py            # README.md and docs/*.md; exit 1 on a mismatch
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITED = ("experiments/reports/published/", "bench/results/published/")
_LINK = re.compile(r"\[([^\]\n]+)\]\(([^)\s#]+)#([^)\s]+)\)")
_CODE = re.compile(r"`[^`]*`")  # inline code
_NUMBER = re.compile(r"[-+−]?\d[\d,]*(?:\.\d+)?")
# a measured-looking figure: a number and a unit of time, memory, rate, share or ratio (``4.75×``;
# ``8 × 40`` is a product); a number after a comparison is a goal, not a measurement
_FIGURE = re.compile(
    r"(?<![\w.,])(?<![≤≥<>] )(?<![≤≥<>])\d[\d,]*(?:\.\d+)?"
    r"(?:×|\s?%|\s(?:s|ms|min|MB|GB|GiB|q/s|cand/s|tokens/s|units?)(?![\w/]))"
)
_ANY_LINK = re.compile(r"\[([^\]\n]*)\]\([^)\s]*\)")


@dataclass
class Citation:
    doc: Path
    line: int
    text: str  # the figure as quoted
    target: Path  # the report file, resolved
    fragment: str

    def where(self) -> str:
        return f"{self.doc}:{self.line}: [{self.text}]"


def citations(doc: Path) -> list[Citation]:
    """The links in ``doc`` that cite a published report or benchmark result (outside code)."""
    out = []
    fenced = False
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if fenced:  # examples of the syntax, not quotes
            continue
        for m in _LINK.finditer(_CODE.sub("", line)):
            text, href, fragment = m.groups()
            target = (doc.parent / href).resolve()
            if any(part in target.as_posix() for part in CITED):
                out.append(Citation(doc, n, text, target, fragment))
    return out


def _numbers(text: str) -> list[str]:
    return [n.replace("−", "-").replace(",", "") for n in _NUMBER.findall(text)]


def _matches(quoted: str, value: object) -> bool:
    """The quoted number is ``value`` rounded to the decimals it shows."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return f"{number:.{decimals}f}" == f"{float(quoted):.{decimals}f}"


def _csv_values(c: Citation) -> list[object]:
    row_key, sep, column = c.fragment.partition(":")
    if not sep:
        raise ValueError(f"{c.where()}: a CSV fragment is ROW:COLUMN, got {c.fragment!r}")
    with open(c.target, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        first = reader.fieldnames[0] if reader.fieldnames else None
        rows = [r for r in reader if first and r[first] == row_key]
    if len(rows) != 1:
        raise ValueError(f"{c.where()}: {len(rows)} rows named {row_key!r} in {c.target}")
    (row,) = rows
    if column not in row:
        raise ValueError(f"{c.where()}: no column {column!r} in {c.target}")
    return [row[column], row.get(f"{column} sd")]


def _json_values(c: Citation) -> list[object]:
    node: object = json.loads(c.target.read_text(encoding="utf-8"))
    for key in c.fragment.split("."):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            raise ValueError(f"{c.where()}: no {c.fragment!r} in {c.target}")
    return [node, None]


def check(c: Citation, tracked: Callable[[Path], bool]) -> str | None:
    """Why the citation fails, or ``None`` when its figure is the file's number."""
    if not c.target.is_file():
        return f"{c.where()}: {c.target} does not exist"
    if not tracked(c.target):
        return f"{c.where()}: {c.target} is not committed"
    try:
        value, sd = _csv_values(c) if c.target.suffix == ".csv" else _json_values(c)
    except ValueError as err:
        return str(err)
    numbers = _numbers(c.text)
    if "%" in c.text and isinstance(value, int | float) and not isinstance(value, bool):
        value = value if any(_matches(n, value) for n in numbers) else value * 100
    if "±" in c.text:
        if len(numbers) != 2 or not (_matches(numbers[0], value) and _matches(numbers[1], sd)):
            return f"{c.where()}: the report says {value} ± {sd}"
        return None
    if len(numbers) == 1 and _matches(numbers[0], value):
        return None
    if c.text.strip() == str(value):
        return None
    return f"{c.where()}: the report says {value}"


def _prose_lines(doc: Path, skip_sections: tuple[str, ...] = ()):
    """(line number, line) outside fenced code, headings and the sections named (a heading's
    text, that section up to the next heading of its level or above)."""
    fenced, skipping_level = False, 0
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if fenced:
            continue
        if heading := re.match(r"(#+)\s+(.*)", line):
            level = len(heading.group(1))
            if skipping_level and level <= skipping_level:
                skipping_level = 0
            if not skipping_level and heading.group(2).strip() in skip_sections:
                skipping_level = level
            continue
        if not skipping_level:
            yield n, line


def unquoted_figures(
    doc: Path, skip_sections: tuple[str, ...] = (), allowed: tuple[str, ...] = ()
) -> list[str]:
    """Figures with a unit (``27.2 s``, ``1,126 MB``, ``4.75×``, ``38.5 %``) in ``doc`` that no
    quoted link carries: outside code, goals (``≥ 3×``), the sections ``skip_sections`` names
    and the phrases in ``allowed`` (quantities that are not measurements, e.g. a card's
    memory). Each as ``doc:line: figure``."""
    found = []
    for n, line in _prose_lines(doc, skip_sections):
        text = _CODE.sub("", line)
        for phrase in allowed:
            text = text.replace(phrase, "")
        text = _LINK.sub(lambda m: "" if _is_cited(doc, m.group(2)) else m.group(0), text)
        text = _ANY_LINK.sub(lambda m: m.group(1), text)  # other links: their text is prose
        found += [f"{doc}:{n}: {m.group(0)}" for m in _FIGURE.finditer(text)]
    return found


def _is_cited(doc: Path, href: str) -> bool:
    return any(part in (doc.parent / href).resolve().as_posix() for part in CITED)


def uncited_rows(doc: Path) -> list[str]:
    """The first cells of the rows of ``doc``'s first table that cite no published result."""
    rows, started = [], False
    for _, line in _prose_lines(doc):
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue  # the rule under the header
        rows.append((cells[0], line))
    body = rows[1:]  # the header is the first
    return [
        first
        for first, line in body
        if not any(_is_cited(doc, m.group(2)) for m in _LINK.finditer(_CODE.sub("", line)))
    ]


def git_tracked(path: Path) -> bool:
    """Whether git tracks the file (in the index: committed or staged for the next commit)."""
    proc = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "--", str(path)],
        cwd=path.parent, capture_output=True, check=False,
    )  # fmt: skip
    return proc.returncode == 0


def documents(repo: Path = REPO) -> list[Path]:
    return [p for p in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))] if p.is_file()]


def main() -> None:
    found = [c for doc in documents() for c in citations(doc)]
    errors = [e for c in found if (e := check(c, git_tracked))]
    print(f"{len(found)} quoted figure(s) checked, {len(errors)} mismatch(es)")
    for e in errors:
        print(e)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
