"""The GPU MFU bench and its prepared sweep, smoke-run on CPU at toy widths (gloo, the same code
path as on GPUs but CUDA's): a GPU loan is short, and a script that fails there wastes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = "--size tiny --device cpu --seq-len 640 --steps 1 --warmup 1"


def _sweep(tmp_path: Path, runs: str) -> list[dict]:
    """The sweep's runs (``RUNS``) at toy widths on CPU: one JSON line each."""
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "OUT": str(tmp_path),
        "RUNS": runs,
        "CAP": "300",
        "SWEEP_EXTRA": SMOKE,
        "GEMM_EXTRA": "--device cpu --tokens 64 --hidden 64 --intermediate 128 --iters 2",
        "PYTHONPATH": str(REPO),
    }
    subprocess.run(
        ["bash", "bench/tuner_mfu_sweep.sh", "h100"], cwd=REPO, env=env, check=True, timeout=900
    )
    path = tmp_path / "tuner_mfu_sweep.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _check(rows: list[dict], n: int) -> None:
    assert len(rows) == n
    for row in rows:
        assert "rc" not in row, row.get("tail")  # a failed run is a line with its last output
        assert row["size"] == "tiny" and row["tokens_per_s_per_gpu"] > 0
        assert row["peak_gpu_memory_gib_per_device"][0] > 0


def test_gemm_calibration_runs_first(tmp_path: Path) -> None:
    """Run 0: what the card's GEMMs reach at the 13B layer shapes, the yardstick for MFU."""
    assert _sweep(tmp_path, "0") == []
    (row,) = [json.loads(x) for x in (tmp_path / "gemm_peak.jsonl").read_text().splitlines()]
    assert row["device"] == "cpu" and row["tflops"]["layer_mean"] > 0
    assert set(row["tflops"]) >= {"attn_fwd", "gate_up_dx", "down_dw"}


@pytest.mark.heavy
def test_sweep_runs_without_compile(tmp_path: Path) -> None:
    rows = _sweep(tmp_path, "1 2 3")
    _check(rows, 3)
    assert [r["loss"] for r in rows] == ["hf", "supervised", "supervised"]
    assert rows[2]["lora_dropout_recompute"] and rows[2]["batch_size"] == 4


@pytest.mark.slow
def test_sweep_runs_every_configuration(tmp_path: Path) -> None:
    rows = _sweep(tmp_path, "1 2 3 4 5 6")
    _check(rows, 6)
    assert [r["compile"] for r in rows] == [False, False, False, True, True, True]
    assert not rows[4]["activation_checkpointing"]  # the no-recompute run
