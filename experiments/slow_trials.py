"""Run the long kill-and-resume matrix (``-m slow``) and record its outcome, test by test.

    python experiments/slow_trials.py                  # experiments/reports/reliability/
    python experiments/slow_trials.py --publish true   # experiments/reports/published/reliability/

The record (``slow_trials.json``) holds the command, the commit and whether the code had
uncommitted changes, the machine's cores and load average before and after, the wall time, the
counts and each test's outcome and seconds, so that docs/reliability.md's trial counts are a
committed result of a command. A failure's first line is kept with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ("tests/reliability/test_resume_shipped.py", "tests/reliability/test_resume_inference.py")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def outcomes(junit: Path) -> list[dict]:
    """Each test case of a JUnit XML file: its name, outcome, seconds and failure's first line."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        row = {"test": f"{module}::{case.get('name')}", "outcome": "passed"}
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                row["outcome"] = {"failure": "failed", "error": "error"}.get(kind, kind)
                message = (found.get("message") or found.text or "").strip().splitlines()
                row["message"] = message[0][:300] if message else ""
                break
        row["seconds"] = round(float(case.get("time", 0.0)), 1)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publish", choices=("true", "false"), default="false")
    args = parser.parse_args()
    folder = REPO / "experiments" / "reports" / ("published" if args.publish == "true" else "")
    out = folder / "reliability" / "slow_trials.json"
    command = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", *TESTS]
    load_before, started = os.getloadavg(), datetime.now(UTC)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, *command, f"--junitxml={junit}"], cwd=REPO, check=False)
        rows = outcomes(junit)
    record = {
        "command": "python " + " ".join(command).replace("-q -p no:cacheprovider ", ""),
        "made_by": "python experiments/slow_trials.py" + (" --publish true" * (args.publish == "true")),
        "commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "biomedvital", "tests")),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "started": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - t0, 1),
        "tests": len(rows),
        **{k: sum(r["outcome"] == v for r in rows) for k, v in
           (("passed", "passed"), ("failed", "failed"), ("errors", "error"))},
        "results": rows,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(record, indent=1) + "\n")
    tmp_out.replace(out)
    print(f"{record['passed']} passed, {record['failed']} failed, {record['errors']} errors "
          f"of {record['tests']} in {record['wall_s']} s -> {out}")  # fmt: skip


if __name__ == "__main__":
    main()
