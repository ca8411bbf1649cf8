"""A grid runs its cells into their own folders, tagged in MLflow; the report collects them."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import yaml

from biomedvital.cli import main

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "selection"))
from test_selector_cli import _config  # noqa: E402


def test_grid_cells_and_report(tmp_path: Path, pool: dict[str, Path], capsys) -> None:
    base = _config(tmp_path, pool)
    grid = tmp_path / "wtiny.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "verb": "fit",
                "base": [str(base)],
                "cells": {
                    c: [str(REPO / "conf" / "ablation" / f"{c}.yaml")] for c in ("w0", "w10")
                },
            }
        )
    )
    main(["grid", "--grid", str(grid)])
    assert capsys.readouterr().out.split() == ["w0", "w10"]
    for cell in ("w0", "w10"):
        main(["grid", "--grid", str(grid), "--cell", cell, "--out_root", str(tmp_path / "grids")])
        folder = tmp_path / "grids" / "wtiny" / cell
        assert (folder / "run.fit.json").is_file() and (
            folder / "checkpoints" / "last.ckpt"
        ).is_file()
        assert yaml.safe_load((folder / "config.fit.yaml").read_text())["model"]["init_args"][
            "w"
        ] == float(cell[1:])

    out = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "report.py"), "--grid", "wtiny",
         "--store", str(tmp_path / "mlruns"), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "wtiny" / "table.csv").open()))
    assert [r["cell"] for r in rows] == ["w0", "w10"]
    assert all(0.0 <= float(r["val/align_rate"]) <= 1.0 for r in rows)
    png = (out / "wtiny" / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
