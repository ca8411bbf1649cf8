"""Every figure README.md or docs/*.md quotes from a grid report or benchmark result equals the
number in the committed file it cites (experiments/quoted.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quoted", REPO / "experiments" / "quoted.py")
quoted = importlib.util.module_from_spec(_spec)
sys.modules["quoted"] = quoted  # its dataclass looks itself up there
_spec.loader.exec_module(quoted)


def test_quoted_figures_equal_their_committed_reports() -> None:
    found = [c for doc in quoted.documents(REPO) for c in quoted.citations(doc)]
    errors = [e for c in found if (e := quoted.check(c, quoted.git_tracked))]
    assert not errors, "\n".join(errors)


@pytest.fixture
def report(tmp_path: Path) -> Path:
    folder = tmp_path / "experiments" / "reports" / "published" / "g"
    folder.mkdir(parents=True)
    (folder / "summary.csv").write_text(
        "cell,n,val/align_rate,val/align_rate sd,pairs/val_clinician\n"
        "mixed,5,0.6442857142857142,0.13912,12-16\n"
        "model_only,5,0.7,0.0,14\n"
    )
    (folder / "w.json").write_text('{"ratio": 1.4967, "runs": [{"s": 3.04}]}')
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
