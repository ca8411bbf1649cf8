"""`make demo` runs every stage of the chain (a dry run of the Makefile, nothing executed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_demo_runs_every_stage_once_in_order() -> None:
    plan = subprocess.run(
        ["make", "-n", "-B", "demo"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    stages = re.findall(r"-m biomedvital ([a-z-]+)(?: --config (\S+))?", plan)
    wanted = [
        ("generate", "conf/demo/generate.yaml"),
        ("rate", "conf/demo/rate.yaml"),
        ("fit", "conf/demo/selector.yaml"),
        ("predict", "conf/demo/selector.yaml"),
        ("fit", "conf/demo/tuner.yaml"),
        ("test", "conf/eval/demo_vqa.yaml"),  # the VQA scores
        ("answer", "conf/eval/demo_vqa.yaml"),  # the same export served: its scores beside
        ("test", "conf/eval/demo_chat.yaml"),  # the chat answers the judge scores
        ("judge", "conf/demo/judge.yaml"),
    ]
    for stage in wanted:
        assert stages.count(stage) == 1, stage
    assert stages.index(("test", "conf/eval/demo_chat.yaml")) < stages.index(wanted[-1])
    assert stages.index(("fit", "conf/demo/tuner.yaml")) < stages.index(wanted[5])
    assert stages.index(("fit", "conf/demo/tuner.yaml")) < stages.index(wanted[6])


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("grid_text", [None, "cells: {a: [x\n"])
def test_grid_with_a_missing_or_broken_grid_file_fails(
    tmp_path: Path, grid_text: str | None
) -> None:
    """``make grid`` with a misspelt GRID or a grid file that does not parse stops with the
    grid's error and a failing status (it used to print the help and exit 0, having run
    nothing). The venv is a stand-in whose python is this one, so nothing is installed."""
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: make does not reinstall
    grid = tmp_path / "g.yaml"
    if grid_text is not None:
        grid.write_text(grid_text)
    proc = subprocess.run(
        ["make", "--no-print-directory", "grid", f"VENV={venv}", f"GRID_FILE={grid}"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout
    assert "biomedvital: error:" in proc.stderr and str(grid) in proc.stderr
    assert "list the targets" not in proc.stdout  # not the help of an empty sub-make


def test_ci_runs_the_checks_make_test_leaves_out() -> None:
    """A marker that `make test` deselects, other than the opt-in slow and gpu, has a make target
    that CI runs, so moving a check out of the budgeted suite never drops it from CI."""
    root = Path(__file__).resolve().parents[1]
    addopts = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
        "addopts"
    ]
    left_out = set(re.findall(r"not (\w+)", addopts)) - {"slow", "gpu"}
    assert left_out, addopts
    makefile = (root / "Makefile").read_text()
    ci = (root / ".ci" / "run").read_text()
    for marker in left_out:
        assert re.search(rf"^test-{marker}:.*\n\t.*pytest -m {marker}\b", makefile, re.M), marker
        assert re.search(rf"^make test-{marker}\b", ci, re.M), marker
