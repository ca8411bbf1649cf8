"""Every figure README.md or docs/*.md quotes from a grid report or benchmark result equals the
number in the committed file it cites, and docs/performance.md quotes every figure it states
(experiments/quoted.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PERFORMANCE = REPO / "docs" / "performance.md"
# measured end to end by hand so far (bench/first_run.py, make demo's wall time): quoted once a
# committed result holds them; a name here whose figures are quoted must leave the list
PENDING_SECTIONS: tuple[str, ...] = ()  # sections whose figures are still measured by hand
PENDING_ROWS: tuple[str, ...] = ()
# quantities with a unit that are not measurements
NOT_MEASURED = (
    "80 GB",  # the H100's memory
    "40 GB",  # an A100's
)
_spec = importlib.util.spec_from_file_location("quoted", REPO / "experiments" / "quoted.py")
quoted = importlib.util.module_from_spec(_spec)
sys.modules["quoted"] = quoted  # its dataclass looks itself up there
_spec.loader.exec_module(quoted)


def test_quoted_figures_equal_their_committed_reports() -> None:
    found = [c for doc in quoted.documents(REPO) for c in quoted.citations(doc)]
    errors = [e for c in found if (e := quoted.check(c, quoted.git_tracked))]
    assert not errors, "\n".join(errors)


def test_the_performance_page_quotes_every_figure() -> None:
    """A figure with a unit on docs/performance.md is a link to the committed result it comes
    from (goals, code and the sections still measured by hand aside)."""
    lines = PERFORMANCE.read_text().splitlines()
    pending = {n for n, line in enumerate(lines, 1) if line.startswith(PENDING_ROWS, 2)}
    bare = [
        f
        for f in quoted.unquoted_figures(PERFORMANCE, PENDING_SECTIONS, NOT_MEASURED)
        if int(f.split(":")[1]) not in pending
    ]
    assert not bare, "figures with no committed result:\n" + "\n".join(bare)
    for section in PENDING_SECTIONS:
        assert f"## {section}\n" in PERFORMANCE.read_text(), f"no section {section!r} any more"


def test_every_row_of_the_performance_summary_cites_a_result() -> None:
    uncited = quoted.uncited_rows(PERFORMANCE)
    assert sorted(uncited) == sorted(PENDING_ROWS), (
        "summary rows citing no bench/results/published/ file: "
        f"{sorted(set(uncited) - set(PENDING_ROWS))}; quoted now, to leave PENDING_ROWS: "
        f"{sorted(set(PENDING_ROWS) - set(uncited))}"
    )


@pytest.mark.parametrize(
    ("line", "bare"),
    [
        ("The suite takes 5.7 s (16.7 cand/s), 4.75× faster.", ["5.7 s", "16.7 cand/s", "4.75×"]),
        (
            "Peak 1,126 MB; 47.5 % padding; 33.7 units; 38.5 %.",
            ["1,126 MB", "47.5 %", "33.7 units", "38.5 %"],
        ),  # fmt: skip
        ("Goal ≥ 3×, ≤ 1.5×, < 8 GB, padding ≤ 10 %, < 2 min.", []),
        ("1000 × 0.2 s / 32 and 8 × 40 GB.", ["0.2 s", "40 GB"]),
        ("Batch 16, seq 2048, LoRA r 128, 120 questions, 2 CPU cores, H100 80GB.", []),
        ("In code `27.2 s` and a [section](#scoring-2-s) link.", []),
        ("[27.2 s](../bench/results/published/b.json#s) against 5.7 s.", ["5.7 s"]),
        ("[27.2 s](https://example.org/b.json#s) is not a published result.", ["27.2 s"]),
    ],
)
def test_unquoted_figures_are_found(tmp_path: Path, line: str, bare: list[str]) -> None:
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text(f"# Page\n\n{line}\n")
    assert [f.rsplit(": ", 1)[1] for f in quoted.unquoted_figures(doc)] == bare


def test_unquoted_figures_skip_sections_and_allowed_phrases(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "# Page\n\n## Measured\n\nTook 3.0 s of 80 GB.\n\n## By hand\n\nTook 4.0 s.\n\n"
        "### Below it\n\n5.0 s.\n\n## After\n\n6.0 s.\n```\n7.0 s\n```\n"
    )
    found = quoted.unquoted_figures(doc, ("By hand",), ("80 GB",))
    assert [f.split(":", 1)[1] for f in found] == ["5: 3.0 s", "17: 6.0 s"]


def test_uncited_rows_are_the_summary_rows_without_a_result(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    pub = "../bench/results/published/b.json"
    doc.write_text(
        "# Page\n\n| bench | figure | goal |\n|---|---|---|\n"
        f"| a | [1.5×]({pub}#ratio) | ≤ 2× |\n| b | 2.0× | ≤ 2× |\n| c | | |\n\n"
        "| second table | x |\n|---|---|\n| d | 3 s |\n"
    )
    assert quoted.uncited_rows(doc) == ["b", "c"]


@pytest.fixture
def report(tmp_path: Path) -> Path:
    folder = tmp_path / "experiments" / "reports" / "published" / "g"
    folder.mkdir(parents=True)
    (folder / "summary.csv").write_text(
        "cell,n,val/align_rate,val/align_rate sd,pairs/val_clinician\n"
        "mixed,5,0.6442857142857142,0.13912,12-16\n"
        "model_only,5,0.7,0.0,14\n"
    )
    (folder / "w.json").write_text('{"ratio": 1.4967, "runs": [{"s": 3.04}], "mfu": 0.385}')
    return folder


@pytest.mark.parametrize(
    ("link", "error"),
    [
        ("[0.644 ± 0.139](R/summary.csv#mixed:val/align_rate)", None),
        ("[0.64 ± 0.14](R/summary.csv#mixed:val/align_rate)", None),  # fewer decimals
        ("[0.70](R/summary.csv#model_only:val/align_rate)", None),
        ("[12-16](R/summary.csv#mixed:pairs/val_clinician)", None),
        ("[14 pairs](R/summary.csv#model_only:pairs/val_clinician)", None),
        ("[1.50×](R/w.json#ratio)", None),
        ("[3.0 s](R/w.json#runs.0.s)", None),
        ("[38.5 %](R/w.json#mfu)", None),  # a fraction quoted as a percentage
        ("[0.385](R/w.json#mfu)", None),
        ("[38.5](R/w.json#mfu)", "the report says 0.385"),  # no % sign: the value itself
        ("[149.67 %](R/w.json#ratio)", None),
        ("[0.74 ± 0.08](R/summary.csv#mixed:val/align_rate)", "the report says 0.644"),
        ("[0.644 ± 0.12](R/summary.csv#mixed:val/align_rate)", "the report says"),
        ("[0.645](R/summary.csv#mixed:val/align_rate)", "the report says"),
        ("[0.6](R/summary.csv#clinician_only:val/align_rate)", "0 rows named 'clinician_only'"),
        ("[0.6](R/summary.csv#mixed:val/auroc)", "no column 'val/auroc'"),
        ("[0.6](R/summary.csv#val/align_rate)", "ROW:COLUMN"),
        ("[1.5×](R/w.json#speedup)", "no 'speedup'"),
        ("[1.5×](R/missing.json#ratio)", "does not exist"),
    ],
)
def test_a_citation_checks_its_figure(
    tmp_path: Path, report: Path, link: str, error: str | None
) -> None:
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text(f"Alignment {link} over 5 seeds.\n")
    rel = "../experiments/reports/published/g"
    doc.write_text(doc.read_text().replace("(R/", f"({rel}/"))
    (c,) = quoted.citations(doc)
    got = quoted.check(c, lambda _: True)
    if error is None:
        assert got is None
    else:
        assert got is not None and error in got, got


def test_an_uncommitted_report_does_not_count(tmp_path: Path, report: Path) -> None:
    doc = tmp_path / "README.md"
    doc.write_text(
        "[0.70](experiments/reports/published/g/summary.csv#model_only:val/align_rate) and "
        "[0.70](https://example.org/x.csv#a:b) (not a published report: not checked)\n"
    )
    (c,) = quoted.citations(doc)
    assert "is not committed" in quoted.check(c, quoted.git_tracked)


def test_links_in_code_are_examples_not_quotes(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    link = "[0.5](experiments/reports/published/g/summary.csv#a:b)"
    doc.write_text(f"```markdown\n{link}\n```\nInline `{link}`; quoted {link}.\n")
    assert [c.line for c in quoted.citations(doc)] == [4]
