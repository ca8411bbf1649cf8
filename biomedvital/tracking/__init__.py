"""Tracking: the MLflow store, provenance tags and run records.

``Checkpoints`` and ``MLflowLogger`` (Lightning) are imported on first use, so that importing
the store helpers does not load torch.
"""

from typing import Any

from biomedvital.tracking.mlflow import PipelineRun, tracking_uri
from biomedvital.tracking.provenance import git_state

__all__ = ["Checkpoints", "MLflowLogger", "PipelineRun", "git_state", "tracking_uri"]


def __getattr__(name: str) -> Any:
    if name == "Checkpoints":
        from biomedvital.tracking.checkpoints import Checkpoints

        return Checkpoints
    if name == "MLflowLogger":
        from biomedvital.tracking.logger import MLflowLogger

        return MLflowLogger
    raise AttributeError(f"module 'biomedvital.tracking' has no attribute {name!r}")
