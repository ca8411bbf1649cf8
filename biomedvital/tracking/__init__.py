"""Tracking: the MLflow store, provenance tags and run records."""

from biomedvital.tracking.checkpoints import Checkpoints
from biomedvital.tracking.mlflow import MLflowLogger, PipelineRun, tracking_uri
from biomedvital.tracking.provenance import git_state

__all__ = ["Checkpoints", "MLflowLogger", "PipelineRun", "git_state", "tracking_uri"]
