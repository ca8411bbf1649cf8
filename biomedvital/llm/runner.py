"""One pass of a verb over its request stream, online (:mod:`.online`) or as Batch API jobs
(:mod:`.batch`), as ``config.mode`` says."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from biomedvital.llm.batch import BatchRunner
from biomedvital.llm.config import ClientConfig
from biomedvital.llm.journal import Journal
from biomedvital.llm.online import ChatClient
from biomedvital.llm.outcome import ChatRequest, FillResult, Ledger, Outcome


def fill_requests(
    config: ClientConfig,
    journal: Journal,
    requests: Iterable[ChatRequest],
    stage: str = "requests",
    progress: bool = True,
    total: int | None = None,
    batch_results: list[Path] | None = None,
) -> FillResult:
    """Answer every request of the stream into the journal, or record why it failed.

    In batch mode the job state lives in ``<journal folder>/batch/`` and
    :class:`~biomedvital.llm.batch.BatchPending` is raised when results are not there yet.
    """
    if config.mode == "batch":
        runner = BatchRunner(config, journal, journal.path.parent / "batch", batch_results)
        return runner.fill(requests, stage, progress)
    return ChatClient(config, journal).fill(requests, stage, progress, total)


def run_requests(
    config: ClientConfig,
    journal_path: str | Path,
    requests: Iterable[ChatRequest],
    desc: str = "requests",
    progress: bool = True,
) -> tuple[dict[str, Outcome], Ledger, int]:
    """Convenience for small batches: open the journal, run them, close; returns outcomes by
    key, the ledger and the number of torn journal lines dropped."""
    with Journal(journal_path) as journal:
        outcomes, ledger = ChatClient(config, journal).run(requests, desc, progress)
    return outcomes, ledger, journal.torn_lines
