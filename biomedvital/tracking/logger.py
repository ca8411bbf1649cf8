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
    """

    def __init__(
        self,
        experiment: str = "selection",
        run_name: str | None = None,
        store: str = DEFAULT_STORE,
        tags: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            experiment_name=experiment,
            run_name=run_name,
            tracking_uri=tracking_uri(store),
            tags=run_tags(tags),
            save_dir=None,
            artifact_location=artifact_location(store, experiment),
            log_model=False,
        )
        self.store = store

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as an artifact of this run (configs, reports, manifests)."""
        self.experiment.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        """Store a JSON-serialisable dict as an artifact of this run."""
        self.experiment.log_dict(self.run_id, obj, artifact_file)
