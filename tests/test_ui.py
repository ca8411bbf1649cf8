"""``python -m biomedvital ui`` (``make ui``) serves MLflow's UI on a store the suite wrote: started
on a free loopback port, asked over HTTP for the experiments and a run's metrics, stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from biomedvital.tracking.mlflow import PipelineRun

pytest.importorskip("flask", reason="MLflow's UI server is the mlflow package (requirements.lock)")

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, body: dict | None = None, timeout: float = 10) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read().decode()
    return json.loads(raw) if raw.lstrip().startswith("{") else raw


def _wait_until_up(base: str, proc: subprocess.Popen, log: Path, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the UI exited ({proc.returncode}):\n{log.read_text()}"
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            if _request(f"{base}/health", timeout=2) is not None:
                return
        time.sleep(0.5)
    raise AssertionError(f"the UI did not answer within {limit_s:.0f}s:\n{log.read_text()}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: subprocess.Popen, limit_s: float = 60) -> bool:
    """Stop the UI and the server processes MLflow started (one process group), as Ctrl-C on
    ``make ui`` does; whether they all ended within ``limit_s`` (else they are killed)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + limit_s
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
        proc.poll()
    stopped = not _group_alive(proc.pid)
    if not stopped:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return stopped


@pytest.mark.heavy
def test_ui_lists_the_suites_experiments_and_a_runs_metrics(tmp_path: Path) -> None:
    store = tmp_path / "mlruns"
    with PipelineRun("generation", "demo-generate", store=store) as run:
        run.log_metrics({"generate/conversations": 6.0})
    with PipelineRun("selection", "demo-select", store=store) as run:
        run.log_metrics({"select/kept": 12.0, "select/dropped": 3.0})
        selected = run.run_id
    port = _free_port()
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "biomedvital", "ui", "--store", str(store), "--port", str(port)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base, proc, log)
        found = _request(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 100})
        names = {e["name"]: e["experiment_id"] for e in found["experiments"]}
        assert {"generation", "selection"} <= set(names), names
        runs = _request(
            f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [names["selection"]]}
        )["runs"]
        assert [r["info"]["run_id"] for r in runs] == [selected]
        metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
        assert metrics == {"select/kept": 12.0, "select/dropped": 3.0}
        page = _request(f"{base}/")
        assert "<html" in page.lower() and "mlflow" in page.lower()  # the web app, not only its API
    finally:
        stopped = _stop(proc)
    assert stopped, "a process of the UI outlived SIGTERM"
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
