"""What requests become: one :class:`Outcome` per request, a :class:`Ledger` of counts and money
per pass, and the :class:`FillResult` a pass over a request stream leaves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from biomedvital.llm.journal import Journal
from biomedvital.llm.keys import cost_of, request_key


@dataclass
class ChatRequest:
    """One chat-completions call: ``params`` (temperature, max_tokens, seed…) are part of the key."""

    messages: list[dict[str, Any]]
    params: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def key_for(self, model: str) -> str:
        """The request's cache key for ``model`` (computed once, then kept in ``key``)."""
        if not self.key:
            self.key = request_key(model, self.messages, self.params)
        return self.key


@dataclass
class Outcome:
    """What became of one request: a response (fresh or from the journal) or a failure reason."""

    key: str
    ok: bool
    content: str | None = None
    refusal: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    attempts: int = 0
    cached: bool = False
    error: str | None = None
    cost: float = 0.0

    @classmethod
    def from_entry(
        cls, entry: dict[str, Any], prices: dict[str, float] | None, cached: bool = True
    ) -> Outcome:
        """The outcome a journal entry stands for."""
        resp = entry["response"]
        return cls(
            key=entry["key"],
            ok=True,
            content=resp.get("content"),
            refusal=resp.get("refusal"),
            finish_reason=resp.get("finish_reason"),
            usage=resp.get("usage"),
            attempts=int(entry.get("attempts") or 0),
            cached=cached,
            cost=cost_of(resp.get("usage"), prices, entry.get("via") == "batch"),
        )


@dataclass
class Ledger:
    """Counts and money for one batch (fresh requests and journal hits kept apart)."""

    requests_sent: int = 0
    done: int = 0
    cached: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached_cost_usd: float = 0.0
    failed_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests_sent": self.requests_sent,
            "done": self.done,
            "cached": self.cached,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "cached_cost_usd": round(self.cached_cost_usd, 6),
            "failed_by_reason": dict(sorted(self.failed_by_reason.items())),
        }

    def add_done(self, usage: dict[str, Any] | None, cost: float) -> None:
        """Count one fresh answer."""
        self.done += 1
        self.cost_usd += cost
        usage = usage or {}
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)

    def add_failed(self, error: str | None) -> None:
        """Count one item that ended failed, by the reason's kind (text before ``:``)."""
        self.failed += 1
        kind = (error or "unknown").split(":")[0]
        self.failed_by_reason[kind] = self.failed_by_reason.get(kind, 0) + 1


@dataclass
class FillResult:
    """What a pass over a request stream left: the ledger and the items that ended failed.

    Answers are in the journal (``journal.get(key)``); ``failures`` maps a key to its outcome.
    ``batch`` describes Batch API jobs (ids, rounds, a retry file) in batch mode.
    """

    ledger: Ledger
    failures: dict[str, Outcome] = field(default_factory=dict)
    batch: dict[str, Any] | None = None

    def outcome(self, key: str, journal: Journal, prices: dict[str, float] | None) -> Outcome:
        """The outcome of ``key``: its journaled answer, its failure, or ``not run``."""
        entry = journal.get(key)
        if entry is not None:
            return Outcome.from_entry(entry, prices)
        return self.failures.get(key) or Outcome(key=key, ok=False, error="not run")
