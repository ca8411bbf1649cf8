"""The optional hooks the callbacks look for (``biomedvital.tracking.hooks``): the stages'
classes satisfy them, and an object without a hook is told apart."""

from __future__ import annotations

from biomedvital.selection.datamodule import SelectorDataModule
from biomedvital.selection.module import SelectorModule
from biomedvital.tracking.hooks import (
    CountsDroppedPairs,
    DescribesData,
    HasUpstreamRuns,
    PlansSupervisedTokens,
    ReportsResolved,
    ReportsResume,
    TracksRun,
    describe,
)
from biomedvital.tracking.logger import MLflowLogger
from biomedvital.tuning.datamodule import TunerDataModule


def test_stage_classes_satisfy_their_hooks() -> None:
    for cls in (SelectorDataModule, TunerDataModule):
        assert issubclass(cls, DescribesData) and issubclass(cls, HasUpstreamRuns)
    assert hasattr(TunerDataModule, "supervised_tokens")
    assert hasattr(SelectorModule, "dropped_pairs")
    assert hasattr(MLflowLogger, "run_id") and hasattr(MLflowLogger, "experiment")


def test_objects_without_a_hook_are_told_apart() -> None:
    class Bare:
        pass

    class Full:
        supervised_tokens = staticmethod(lambda *a: (0, 0))
        dropped_pairs = {"train": 1}
        resumed = None
        resolved = None
        run_id = "r"
        experiment = object()

        def describe(self) -> dict:
            return {"inputs": {"a": "h"}}

        def upstream_runs(self) -> dict:
            return {}

    bare, full = Bare(), Full()
    for hook in (
        DescribesData,
        HasUpstreamRuns,
        PlansSupervisedTokens,
        CountsDroppedPairs,
        ReportsResume,
        ReportsResolved,
        TracksRun,
    ):
        assert not isinstance(bare, hook) and isinstance(full, hook), hook.__name__
    assert describe(bare) == {} and describe(full) == {"inputs": {"a": "h"}}
