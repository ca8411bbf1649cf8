"""The MLflow store under concurrent use: ``make -j grid`` starts cells together."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest


def _log_a_run(store: str, cell: str, barrier: Any, errors: Any) -> None:
    """One grid cell's first MLflow use, released together with the others."""
    from biomedvital.tracking.mlflow import PipelineRun

    barrier.wait()
    try:
        with PipelineRun("selection", cell, store, {"cell": cell}) as run:
            run.log_metrics({"val/align_rate": 0.5})
    except Exception as e:  # noqa: BLE001 - reported to the test
        errors.put(f"{cell}: {type(e).__name__}: {e}"[:300])


@pytest.mark.heavy
def test_processes_starting_together_on_a_fresh_store_all_log(tmp_path: Path) -> None:
    """Four processes make their first run on a store that has no database yet, at once (as
    ``make -j4 grid`` after a clone): each run is logged, none fails creating the tables."""
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    ctx = multiprocessing.get_context("spawn")
    store = str(tmp_path / "mlruns")
    barrier, errors = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_log_a_run, args=(store, f"c{i}", barrier, errors)) for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert failures == [] and [p.exitcode for p in procs] == [0, 0, 0, 0]
    client = MlflowClient(tracking_uri=tracking_uri(store))
    runs = client.search_runs([client.get_experiment_by_name("selection").experiment_id])
    assert sorted(r.data.tags["cell"] for r in runs) == ["c0", "c1", "c2", "c3"]
    assert all(r.info.status == "FINISHED" for r in runs)
