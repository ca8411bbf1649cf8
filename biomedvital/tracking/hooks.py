"""The optional hooks the suite's callbacks look for on a data module, a model or a logger.

A stage opts in by having the member; the callbacks test for it with ``isinstance`` against
these protocols instead of probing names, so the contract between the stages and the run
records is written down in one place (and type checkers see it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DescribesData(Protocol):
    """A data module that says what it read: inputs with hashes, counts kept and skipped, and
    why (the run record's ``data``, the export's data manifest)."""

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class HasUpstreamRuns(Protocol):
    """A data module whose inputs were written by earlier runs: ``{tag: [run ids]}``, tagged on
    the run as its lineage."""

    def upstream_runs(self) -> dict[str, list[str]]: ...


@runtime_checkable
class PlansSupervisedTokens(Protocol):
    """A data module that knows each optimiser step's supervised tokens in advance (the tuner
    divides a micro-batch's summed loss by them)."""

    supervised_tokens: Callable[..., Any]


@runtime_checkable
class CountsDroppedPairs(Protocol):
    """A model that drops pairs it cannot read (``on_bad_record: skip``), counted per set."""

    dropped_pairs: dict[str, int]


@runtime_checkable
class ReportsResume(Protocol):
    """A model whose rerun took work over from a killed run (journaled answers)."""

    resumed: dict[str, Any] | None


@runtime_checkable
class ReportsResolved(Protocol):
    """A model whose unset settings were resolved from what its weights record (e.g. the image
    preprocessing an export was trained with): the run record's ``resolved``."""

    resolved: dict[str, Any] | None


@runtime_checkable
class TracksRun(Protocol):
    """A logger bound to one MLflow run (``MLflowLogger``)."""

    run_id: str
    experiment: Any


def describe(obj: Any) -> dict[str, Any]:
    """``obj.describe()`` where it has one, else ``{}``."""
    return obj.describe() if isinstance(obj, DescribesData) else {}
