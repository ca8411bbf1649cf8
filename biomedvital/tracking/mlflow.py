"""The project's MLflow store: one sqlite database under ``mlruns/``, one experiment per stage.

Free of Lightning (and torch), so pipeline verbs (``generate``, ``rate``, ``select``…) start fast
and small; the Trainer's logger is :class:`biomedvital.tracking.logger.MLflowLogger`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from biomedvital.tracking.provenance import git_state, library_hash

DEFAULT_STORE = "mlruns"


_READY: set[Path] = set()  # stores whose tables this process has seen created


def tracking_uri(store: str | Path = DEFAULT_STORE) -> str:
    """The sqlite URI of the store folder (folder and tables created if missing)."""
    root = Path(store).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    if root not in _READY:
        _create_tables(root, uri)
        _READY.add(root)
    return uri


def _create_tables(root: Path, uri: str) -> None:
    """Create (or migrate) the store's tables, one process at a time.

    MLflow creates them on a process's first use of a new database; processes starting together
    on a fresh store (``make -j grid`` after a clone or a ``rm -rf mlruns``) each run that
    creation and all but one fail (``table ... already exists``). An exclusive lock on a file
    beside the database makes the others wait and then find the tables made.
    """
    import fcntl

    from mlflow.tracking import MlflowClient

    with open(root / ".tables.lock", "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        finally:
            fcntl.lockf(lock, fcntl.LOCK_UN)


def artifact_location(store: str | Path, experiment: str) -> str:
    """Artifacts of ``experiment`` live beside the database, never in the working directory."""
    return (Path(store).resolve() / "artifacts" / experiment).as_uri()


def upstream_run_of(path: str | Path) -> str | None:
    """The MLflow run that wrote ``path``: ``mlflow_run_id`` of the ``manifest.json`` beside it
    (what ``generate``, ``rate`` and ``select`` write), when there is one."""
    manifest = Path(path).parent / "manifest.json"
    try:
        run_id = json.loads(manifest.read_text(encoding="utf-8")).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return str(run_id) if run_id else None


def run_tags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Lineage tags every run carries: git SHA, dirty flag, the library's content hash, plus the
    caller's (upstream runs...)."""
    tags = {**git_state(), "library_hash": library_hash()}
    for key, value in (extra or {}).items():
        if value is not None:
            tags[key] = str(value)
    return tags


class PipelineRun:
    """An MLflow run for a pipeline verb that is not a Trainer method (``select``, ``generate``…).

    Used as a context manager; the run ends FINISHED, or FAILED when the body raises.
    """

    def __init__(
        self,
        experiment: str,
        run_name: str,
        store: str | Path = DEFAULT_STORE,
        tags: dict[str, Any] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri(store))
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(
                experiment, artifact_location=artifact_location(store, experiment)
            )
        )
        all_tags = run_tags(tags)
        all_tags["mlflow.runName"] = run_name
        self.run_id = self.client.create_run(exp_id, tags=all_tags).info.run_id

    def __enter__(self) -> PipelineRun:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if exc_type else "FINISHED")

    def log_params(self, params: dict[str, Any]) -> None:
        for key, value in params.items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)


def __getattr__(name: str):  # ``biomedvital.tracking.mlflow.MLflowLogger``, imported on use
    if name == "MLflowLogger":
        from biomedvital.tracking.logger import MLflowLogger

        return MLflowLogger
    raise AttributeError(name)
