"""The skeleton of a chat verb (``generate``, ``rate``, ``judge``, ``pairwise``): everything but
the verb's own part, in the order it runs.

1. **dry run** (when asked): the first prompt and the cost estimate are printed; nothing is sent
   or written;
2. **check**: the verb's inputs are checked; a bad record fails before anything is paid for;
3. **lock** the output folder: one run per folder, and a killed run's temporaries removed;
4. **open** the MLflow run (its parameters: the public config, never the key) and the request
   journal (:mod:`.journal`), which makes a rerun pay only for what is missing;
5. **send** every request, online or as batch jobs (:mod:`.runner`). Requests are built as the
   client has room for them and a small plan line per item is spooled to disk, so outputs are
   assembled afterwards, in input order, from the plan and the journal: memory stays flat;
6. **re-ask once**: a reply that does not parse gets one follow-up (the conversation, the reply
   and a prompt asking again; a batch of its own in batch mode); if that fails too the item
   fails, never with a default value;
7. **assemble**: the verb writes its outputs from the answers, in input order;
8. **record**: one manifest (counts, ledgers, cost, estimate, input hashes, record reports,
   config, git state) in ``manifest.json`` and MLflow, and the metrics ``<verb>/<count>``.

A verb subclasses :class:`ChatStage` and says only what is its own: its inputs (:meth:`check`,
:meth:`inputs`, :meth:`records`), its requests (:meth:`requests`), how a reply parses
(:meth:`parses`, with :attr:`reask_prompt`) and what it writes (:meth:`assemble`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import write_json
from biomedvital.data.outputs import output_lock
from biomedvital.data.report import RecordReport
from biomedvital.llm.batch import BatchPending
from biomedvital.llm.config import ClientConfig
from biomedvital.llm.journal import Journal
from biomedvital.llm.keys import cost_of, estimate_tokens
from biomedvital.llm.outcome import ChatRequest, FillResult, Outcome
from biomedvital.llm.runner import fill_requests
from biomedvital.llm.sampling import SamplingArgs
from biomedvital.tracking.mlflow import PipelineRun
from biomedvital.tracking.provenance import git_state


class Estimate:
    """Running upper bound of the cost: estimated input tokens plus ``max_tokens`` of output."""

    def __init__(self, prices: dict[str, float] | None, batch: bool = False) -> None:
        self.prices, self.batch = prices, batch
        self.requests = self.input_tokens = self.output_tokens = 0

    def add(self, req: ChatRequest) -> None:
        i, o = estimate_tokens(req.messages, int(req.params.get("max_tokens", 0)))
        self.requests += 1
        self.input_tokens += i
        self.output_tokens += o

    def as_dict(self) -> dict[str, Any]:
        usage = {"prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens}
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "max_output_tokens": self.output_tokens,
            "cost_usd_upper_bound": round(cost_of(usage, self.prices, self.batch), 4),
        }


def printable_messages(messages: list[dict[str, Any]], max_url: int = 60) -> str:
    """The messages as readable text (data URLs shortened) for ``--dry_run``."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            body = content
        else:
            pieces = []
            for part in content:
                if part["type"] == "text":
                    pieces.append(part["text"])
                else:
                    url = part["image_url"]["url"]
                    short = url if len(url) <= max_url else url[:max_url] + f"… ({len(url)} chars)"
                    pieces.append(f"[image {short}]")
            body = "\n".join(pieces)
        out.append(f"--- {m['role']} ---\n{body}")
    return "\n".join(out)


def follow_up(messages: list[dict[str, Any]], reply: str | None, prompt: str) -> list[dict]:
    """The re-ask of a reply that did not parse: the conversation, the reply, the prompt."""
    return [
        *messages,
        {"role": "assistant", "content": reply or ""},
        {"role": "user", "content": prompt},
    ]


@dataclass
class Answer:
    """One item after its request and at most one re-ask.

    ``reply`` is the reply that parsed (the follow-up's when re-asked), ``None`` when none did;
    then ``error`` says which request failed and why, or ``unparsable`` that every reply came but
    none parsed.
    """

    plan: dict[str, Any]
    first: Outcome
    followup: Outcome | None = None
    reply: str | None = None

    @property
    def reasked(self) -> bool:
        return self.followup is not None

    @property
    def error(self) -> str | None:
        for out in (self.first, self.followup):
            if out is not None and not out.ok:
                return out.error or "unknown"
        return None

    @property
    def unparsable(self) -> bool:
        return self.reply is None and self.error is None


@dataclass
class Report:
    """What a verb's :meth:`ChatStage.assemble` wrote: its counts (each number also a metric
    ``<verb>/<name>``) and its own manifest entries, metrics, MLflow tags and artifacts."""

    counts: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)


@dataclass
class Passes:
    """The request passes of a run: the first, and the re-asks (``None`` without re-asks)."""

    first: FillResult
    reask: FillResult | None

    @property
    def results(self) -> list[FillResult]:
        return [r for r in (self.first, self.reask) if r is not None]


class ChatStage:
    """The skeleton of a chat verb; a subclass says what is its own (module docstring).

    Args:
        out: the output folder (``journal.jsonl``, ``manifest.json`` and the verb's files).
        client: the endpoint and how to call it.
        sampling: temperature, top_p, seed and max_tokens of every request.
        extra_body: extra request fields for the endpoint (part of the cache key).
        store / tags: the MLflow store and extra run tags.
        progress: show progress bars.
        dry_run: print the first prompt and the estimated cost; send and write nothing.
        batch_results: results file(s) of the offline batch runner to import.
    """

    name: ClassVar[str]
    """The verb: MLflow run name, metric prefix, progress label, plan file name."""
    experiment: ClassVar[str]
    """The MLflow experiment."""
    reask_prompt: ClassVar[str | None] = None
    """The follow-up to a reply that does not :meth:`parse <parses>` (``None``: no re-ask)."""

    def __init__(
        self,
        out: Path,
        client: ClientConfig,
        sampling: SamplingArgs,
        extra_body: dict[str, Any] | None,
        store: str,
        tags: dict[str, str] | None,
        progress: bool,
        dry_run: bool = False,
        batch_results: list[Path] | Path | None = None,
    ) -> None:
        self.out = Path(out)
        self.client = client
        self.sampling = sampling
        self.extra_body = extra_body
        self.params = sampling.params(extra_body)
        self.store, self.tags, self.progress, self.dry_run = store, tags, progress, dry_run
        if isinstance(batch_results, str | Path):
            batch_results = [batch_results]
        self.batch_results = [Path(p) for p in batch_results] if batch_results else None
        self.estimate = Estimate(client.price_per_million, client.mode == "batch")
        self.plan_path = self.out / f".{self.name}.plan.jsonl"
        self.torn_lines = 0  # torn journal lines cut when the journal opened (before assembly)

    # ------------------------------------------------------------------ the verb's own part

    def check(self) -> None:
        """Fail on a bad input record before anything is paid for (default: nothing to do)."""

    def requests(self) -> Iterator[tuple[ChatRequest, dict[str, Any]]]:
        """The first pass's requests, built lazily, each with its plan line (what
        :meth:`assemble` needs of the item, JSON)."""
        raise NotImplementedError

    def requests_done(self) -> None:
        """Called once the first pass's request stream is consumed (dry run included)."""

    def parses(self, reply: str | None) -> bool:
        """Whether a reply is usable; one that is not is re-asked once (:attr:`reask_prompt`)."""
        return True

    def first_messages(self, plan: dict[str, Any]) -> list[dict[str, Any]]:
        """The first request's messages, rebuilt from its plan line (for the re-ask)."""
        return plan["messages"]

    def assemble(self, answers: Iterator[Answer]) -> Report:
        """Write the outputs from the answers (in input order); return the counts."""
        raise NotImplementedError

    def public(self) -> dict[str, Any]:
        """The verb's own arguments, as recorded (paths as strings, never a secret)."""
        return {}

    def inputs(self) -> dict[str, Path | None]:
        """The input files whose hashes the manifest records (a folder: its path only)."""
        return {}

    def records(self) -> dict[str, RecordReport]:
        """Kept / skipped / repaired counts per input file."""
        return {}

    # ------------------------------------------------------------------ the skeleton

    def run(self) -> dict[str, Any]:
        """The verb, start to end: the dry run, or check, send, re-ask, assemble, record."""
        if self.dry_run:
            return self._dry_run()
        self.check()
        with output_lock(self.out):  # one run per folder; a killed run's temporaries removed
            return self._run_locked()

    def _dry_run(self) -> dict[str, Any]:
        first = None
        for req in self._first_requests(None):
            first = first or req
        self.requests_done()
        if first is not None:
            print(printable_messages(first.messages))
        est = self.estimate.as_dict()
        print(
            f"\n{est['requests']} requests" + (" (+ re-asks)" if self.reask_prompt else "")
            + f", ~{est['input_tokens']} input tokens, <= {est['max_output_tokens']} output "
            f"tokens, estimated cost <= ${est['cost_usd_upper_bound']:.4f}"
            + (" (batch price)" if self.client.mode == "batch" else "")
        )  # fmt: skip
        return {"dry_run": True, "estimate": est}

    def _run_locked(self) -> dict[str, Any]:
        public = self._public()
        tags = {**(self.tags or {}), "model": self.client.model}
        with PipelineRun(self.experiment, self.name, self.store, tags) as run:
            run.log_params(public)
            with Journal(self.out / "journal.jsonl") as journal:
                try:
                    passes = self._send(journal)
                except BatchPending as exc:
                    self.plan_path.unlink(missing_ok=True)
                    return _pending(exc, run)
                self.torn_lines = journal.torn_lines
                report = self.assemble(self._answers(journal, passes))
            self.plan_path.unlink(missing_ok=True)
            manifest = self._manifest(report, passes, public, run.run_id)
            self._record(run, report, passes, manifest)
        write_json(self.out / "manifest.json", manifest)
        return manifest

    # -- send and re-ask

    def _first_requests(self, plan: Any) -> Iterator[ChatRequest]:
        """The verb's requests, keyed and estimated, their plan lines spooled to ``plan``."""
        for req, line in self.requests():
            req.key_for(self.client.model)
            self.estimate.add(req)
            if plan is not None:
                line = {**line, "key": req.key, "meta": req.meta}
                plan.write(json.dumps(line, ensure_ascii=False) + "\n")
            yield req

    def _send(self, journal: Journal) -> Passes:
        with open(self.plan_path, "w", encoding="utf-8") as plan:
            first = self._fill(journal, self._first_requests(plan), self.name)
        self.requests_done()
        if self.reask_prompt is None:
            return Passes(first, None)
        reask = self._fill(journal, self._reask_requests(journal), f"{self.name}-reask")
        return Passes(first, reask)

    def _fill(self, journal: Journal, requests: Iterable[ChatRequest], stage: str) -> FillResult:
        return fill_requests(
            self.client, journal, requests, stage, self.progress, batch_results=self.batch_results
        )

    def _plan_lines(self) -> Iterator[dict[str, Any]]:
        with open(self.plan_path, encoding="utf-8") as f:
            for raw in f:
                yield json.loads(raw)

    def _follow_up(self, plan: dict[str, Any], reply: str | None) -> ChatRequest:
        assert self.reask_prompt is not None
        msgs = follow_up(self.first_messages(plan), reply, self.reask_prompt)
        req = ChatRequest(msgs, dict(self.params), meta=plan.get("meta", {}))
        req.key_for(self.client.model)
        return req

    def _reask_requests(self, journal: Journal) -> Iterator[ChatRequest]:
        """The follow-up of every answered item whose reply does not parse."""
        for plan in self._plan_lines():
            entry = journal.get(plan["key"])
            if entry is None:
                continue
            reply = entry["response"].get("content")
            if not self.parses(reply):
                yield self._follow_up(plan, reply)

    def _answers(self, journal: Journal, passes: Passes) -> Iterator[Answer]:
        """Every item of the plan, in input order, with its outcome after the re-ask."""
        prices = self.client.price_per_million
        for plan in self._plan_lines():
            first = passes.first.outcome(plan["key"], journal, prices)
            answer = Answer(plan, first)
            if not first.ok:
                yield answer
                continue
            if self.parses(first.content):
                answer.reply = first.content
            elif passes.reask is not None:
                key = self._follow_up(plan, first.content).key
                answer.followup = passes.reask.outcome(key, journal, prices)
                if answer.followup.ok and self.parses(answer.followup.content):
                    answer.reply = answer.followup.content
            yield answer

    # -- the record

    def _public(self) -> dict[str, Any]:
        return {
            **self.client.public(),
            **self.public(),
            **self.sampling.public(),
            "extra_body": self.extra_body,
            "batch_results": [str(p) for p in self.batch_results] if self.batch_results else None,
        }

    def _manifest(
        self, report: Report, passes: Passes, public: dict[str, Any], run_id: str
    ) -> dict[str, Any]:
        first, reask = passes.first, passes.reask
        if reask is None:
            ledger: dict[str, Any] = first.ledger.as_dict()
            batch = first.batch
        else:
            ledger = {"first": first.ledger.as_dict(), "reask": reask.ledger.as_dict()}
            batch = {"first": first.batch, "reask": reask.batch}
        inputs = {}
        for name, path in self.inputs().items():
            if path is not None:
                path = Path(path)
                inputs[name] = {"path": str(path)}
                if path.is_file():
                    inputs[name]["sha256"] = sha256_file(path)
        return {
            "counts": report.counts,
            **report.manifest,
            "ledger": ledger,
            "cost_usd": round(sum(r.ledger.cost_usd for r in passes.results), 6),
            "torn_journal_lines": self.torn_lines,
            "estimate": self.estimate.as_dict(),
            "batch": batch if self.client.mode == "batch" else None,
            "inputs": inputs,
            "records": {k: r.as_dict() for k, r in self.records().items()},
            "config": public,
            "mlflow_run_id": run_id,
            "git": git_state(),
        }

    def _record(self, run: PipelineRun, report: Report, passes: Passes, manifest: dict) -> None:
        prefix = f"{self.name}/"
        metrics = {
            prefix + k: v
            for k, v in report.counts.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        metrics[prefix + "cost_usd"] = sum(r.ledger.cost_usd for r in passes.results)
        metrics[prefix + "requests_sent"] = sum(r.ledger.requests_sent for r in passes.results)
        metrics[prefix + "cached"] = sum(r.ledger.cached for r in passes.results)
        metrics.update(report.metrics)
        run.log_metrics(metrics)
        for key, value in report.tags.items():
            run.client.set_tag(run.run_id, key, value)
        run.log_dict(manifest, f"{self.name}.manifest.json")
        for path in report.artifacts:
            run.client.log_artifact(run.run_id, str(path))


def _pending(exc: BatchPending, run: PipelineRun) -> dict[str, Any]:
    """What a verb returns when batch results are not there yet (the message is printed)."""
    print(str(exc))
    run.client.set_tag(run.run_id, "batch_pending", "true")
    return {"batch_pending": True, "message": str(exc), **exc.info, "mlflow_run_id": run.run_id}
