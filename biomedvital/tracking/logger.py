"""Lightning's MLflow logger bound to the project's store (imports Lightning: kept apart from
:mod:`biomedvital.tracking.mlflow`, which pipeline verbs import)."""

from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger

from biomedvital.tracking.mlflow import DEFAULT_STORE, artifact_location, run_tags, tracking_uri


class MLflowLogger(MLFlowLogger):
    """Lightning's MLflow logger bound to the project's sqlite store, with provenance tags.

    Args:
        experiment: the stage the run belongs to (``selection``, ``tuning``, ``evaluation``...).
        run_name: a readable name shown in the MLflow UI.
        store: folder holding ``mlflow.db`` and the artifacts.
        tags: extra tags, e.g. ``upstream_run`` (the run whose outputs this one consumed),
            ``grid`` and ``cell`` for ablation grids.
        run_id: continue this run instead of starting one (``fit --ckpt_path`` sets it to the
            run that wrote the checkpoint, so a resumed training stays one run); a run this
            store does not hold is not continued (a warning says so).
    """

    def __init__(
        self,
        experiment: str = "selection",
        run_name: str | None = None,
        store: str = DEFAULT_STORE,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ) -> None:
        uri = tracking_uri(store)
        if run_id is not None:
            run_id = _resumable(uri, run_id)
        super().__init__(
            experiment_name=experiment,
            run_name=run_name,
            tracking_uri=uri,
            tags=run_tags(tags),
            save_dir=None,
            artifact_location=artifact_location(store, experiment),
            log_model=False,
            run_id=run_id,
        )
        self.store = store

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as an artifact of this run (configs, reports, manifests)."""
        self.experiment.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        """Store a JSON-serialisable dict as an artifact of this run."""
        self.experiment.log_dict(self.run_id, obj, artifact_file)


def _resumable(uri: str, run_id: str) -> str | None:
    """``run_id`` set back to RUNNING if this store holds it, else ``None`` (a new run)."""
    from lightning.pytorch.utilities import rank_zero_warn
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        rank_zero_warn(f"MLflow run {run_id} is not in {uri}: the resumed fit starts a new run")
        return None
    if run.info.lifecycle_stage == "deleted":
        rank_zero_warn(f"MLflow run {run_id} was deleted: the resumed fit starts a new run")
        return None
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "resumed", "true")
    return run_id
