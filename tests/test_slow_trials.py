"""``experiments/slow_trials.py`` reads pytest's JUnit XML into the record docs/reliability.md
quotes: every test case with its outcome, seconds and a failure's first line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("slow_trials", REPO / "experiments/slow_trials.py")
slow_trials = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slow_trials)

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="0" tests="3">
<testcase classname="tests.reliability.test_resume_shipped" name="test_a[x]" time="12.34"/>
<testcase classname="tests.reliability.test_resume_shipped" name="test_b[y]" time="3.0">
<failure message="AssertionError: run.fit.json&#10;assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.reliability.test_resume_inference" name="test_c" time="0.5">
<error message="">fixture 'nope' not found</error></testcase>
</testsuite></testsuites>
"""


def test_outcomes_of_a_junit_file(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    assert slow_trials.outcomes(junit) == [
        {"test": "test_resume_shipped::test_a[x]", "outcome": "passed", "seconds": 12.3},
        {
            "test": "test_resume_shipped::test_b[y]",
            "outcome": "failed",
            "message": "AssertionError: run.fit.json",
            "seconds": 3.0,
        },
        {
            "test": "test_resume_inference::test_c",
            "outcome": "error",
            "message": "fixture 'nope' not found",
            "seconds": 0.5,
        },
    ]
