"""``generate``: ask a chat model for instruction conversations about PMC figures (paper stage 1).

One request per figure; responses are journaled so an interrupted run resumes where it stopped
and a finished one reruns for free. Figures are streamed: each one's request is built when the
client has room for it, and a small plan line (key, ids, demonstrations) is spooled to disk so
the outputs are assembled afterwards, in figure order, from the plan and the journal. Memory
therefore stays flat in the number of figures (the journal's key index and the set of seen
``pair_id`` values are all that grow). Outputs are written at the end, atomically.

``client.mode: batch`` sends the same requests as Batch API jobs (or writes them for vLLM's
offline batch runner), see :mod:`biomedvital.llm.batch`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from biomedvital.data.images import ImageRoot
from biomedvital.data.jsonio import (
    atomic_write,
    detect_format,
    handle_bad,
    iter_objects,
    parse_record,
    sha256_file,
    write_json,
)
from biomedvital.data.outputs import output_lock
from biomedvital.data.records import (
    Candidate,
    Demonstration,
    SourceFigure,
    read_figures,
    strip_image_token,
)
from biomedvital.data.report import BadRecordError, OnBad, PositionKind, RecordReport
from biomedvital.generation.parse import (
    DroppedExchange,
    FlaggedAnswers,
    Rejected,
    pair_records,
    parse_conversation,
    parse_pairs,
)
from biomedvital.generation.prompts import (
    MODALITIES,
    build_messages,
    printable_messages,
    prompt_version,
    select_demonstrations,
)
from biomedvital.llm.batch import BatchPending
from biomedvital.llm.config import ClientConfig
from biomedvital.llm.images import image_ref
from biomedvital.llm.journal import Journal
from biomedvital.llm.keys import cost_of, estimate_tokens, request_key
from biomedvital.llm.outcome import ChatRequest, Outcome
from biomedvital.llm.runner import fill_requests
from biomedvital.tracking.mlflow import DEFAULT_STORE, PipelineRun
from biomedvital.tracking.provenance import git_state

log = logging.getLogger(__name__)


def figure_image(fig: SourceFigure) -> str:
    """The figure's image file: its ``image`` field if present, else ``<pair_id>.jpg`` (LLaVA-Med)."""
    image = getattr(fig, "image", None)
    return str(image) if image else f"{fig.pair_id}.jpg"


# ----------------------------------------------------------------------------- reading input


def _streamable(path: Path) -> bool:
    """Whether ``path`` can be read one figure at a time: a JSON array, or JSONL whose first
    line is one figure (not LLaVA-Med's ``{domain: [figures]}`` document)."""
    fmt = detect_format(path)
    if fmt == "array":
        return True
    if fmt != "jsonl":
        return False
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    head = json.loads(raw.removeprefix(b"\xef\xbb\xbf"))
                except ValueError:
                    return False  # pretty-printed JSON, or broken: read_figures sorts it out
                return isinstance(head, dict) and (
                    "pair_id" in head or not all(isinstance(v, list) for v in head.values())
                )
    return False


def iter_figures(
    path: Path, on_bad: OnBad, report: RecordReport
) -> Iterator[tuple[int, PositionKind, SourceFigure]]:
    """``(position, kind, figure)`` one at a time; bad records raised or skipped (counted).

    JSONL is streamed line by line and a JSON array element by element (positions: 1-based
    record index); LLaVA-Med's ``{domain: [figures]}`` file is read whole. Kept records are not
    counted here: the caller counts them once its own checks pass.
    """
    if _streamable(path):
        for pos, kind, obj in iter_objects(path, on_bad=on_bad, report=report):
            try:
                fig = parse_record(obj, SourceFigure, path, pos, kind)
            except BadRecordError as err:
                handle_bad(err, on_bad, report)
                continue
            yield pos, kind, fig
        return
    scratch = RecordReport()
    figs = read_figures(path, on_bad, scratch)
    scratch.n_kept = 0
    report.merge(scratch)
    for pos, fig in enumerate(figs, start=1):
        yield pos, "record", fig


def _check_domain(domain: dict[str, bool], path: Path, pos: int, kind: PositionKind) -> None:
    unknown = sorted(set(domain) - set(MODALITIES))
    if unknown:
        raise BadRecordError(
            path,
            pos,
            f"unknown domain flag(s) {unknown}; known flags: {', '.join(MODALITIES)}",
            "domain",
            kind=kind,
            category="unknown_domain",
        )


def check_figure(fig: SourceFigure, path: Path, pos: int, kind: PositionKind) -> None:
    """Refuse a figure that cannot make a useful prompt: blank caption, unknown domain flags."""
    if not fig.fig_caption.strip():
        raise BadRecordError(
            path, pos, "empty caption", "fig_caption", kind=kind, category="empty_caption"
        )
    _check_domain(fig.domain, path, pos, kind)


def _check_demo(demo: Demonstration, path: Path, pos: int, kind: PositionKind) -> str | None:
    """Raise for a demonstration that cannot serve as an example; return a note for one that
    can but departs from strict question/answer alternation (the released file has two)."""
    if not demo.fig_caption.strip():
        raise BadRecordError(
            path, pos, "empty caption", "fig_caption", kind=kind, category="empty_caption"
        )
    _check_domain(demo.domain, path, pos, kind)
    turns = demo.conversations
    problem = None
    roles = {t.from_ for t in turns}
    if roles != {"human", "gpt"}:
        problem = "needs at least one question and one answer"
    else:
        for i, t in enumerate(turns):
            if not strip_image_token(t.value):
                problem = f"turn {i + 1} is empty"
                break
    if problem:
        raise BadRecordError(
            path,
            pos,
            f"malformed conversation: {problem}",
            "conversations",
            kind=kind,
            category="malformed_conversation",
        )
    for i, t in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if t.from_ != expected:
            return f"{path}: {kind} {pos}: turn {i + 1} is from {t.from_!r}, expected {expected!r}"
    return None


def load_demonstrations(path: Path, on_bad: OnBad, report: RecordReport) -> list[Demonstration]:
    """Demonstrations that can serve as examples; bad ones raised or skipped (counted), with
    their file and record: invalid fields, blank caption, unknown domain flags, a conversation
    without a question and an answer or with an empty turn, duplicate ids. Turns that do not
    alternate are kept as released and counted under ``repaired``."""
    demos: list[Demonstration] = []
    ids: dict[str, int] = {}
    for pos, kind, obj in iter_objects(path, on_bad=on_bad, report=report):
        try:
            demo = parse_record(obj, Demonstration, path, pos, kind)
            note = _check_demo(demo, path, pos, kind)
            if demo.id in ids:
                raise BadRecordError(
                    path,
                    pos,
                    f"duplicate id {demo.id!r} (also at {ids[demo.id]})",
                    "id",
                    kind=kind,
                    category="duplicate:id",
                )
        except BadRecordError as err:
            handle_bad(err, on_bad, report)
            continue
        ids[demo.id] = pos
        if note is not None:  # kept as released, and counted
            report.repair("non_alternating_turns", example=note)
        report.kept()
        demos.append(demo)
    return demos


# ----------------------------------------------------------------------------- estimate


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


def estimate_cost(requests: list[ChatRequest], prices: dict[str, float] | None) -> dict[str, float]:
    """Upper-bound cost of ``requests``: estimated input tokens plus ``max_tokens`` of output."""
    est = Estimate(prices)
    for r in requests:
        est.add(r)
    return est.as_dict()


def pending_result(exc: BatchPending, run: PipelineRun | None) -> dict[str, Any]:
    """What a verb returns when batch results are not there yet (the message is printed)."""
    print(str(exc))
    if run is not None:
        run.client.set_tag(run.run_id, "batch_pending", "true")
    return {
        "batch_pending": True,
        "message": str(exc),
        **exc.info,
        "mlflow_run_id": run.run_id if run else None,
    }


# ----------------------------------------------------------------------------- the verb


def generate(
    figures: Path,
    image_root: Path,
    demonstrations: Path,
    out: Path,
    client: ClientConfig,
    n_demos: int = 5,
    vision: bool = True,
    answers: int = 1,
    temperature: float = 0.7,
    max_tokens: int = 1024,
    seed: int = 0,
    extra_body: dict[str, Any] | None = None,
    on_bad_record: Literal["raise", "skip"] = "raise",
    dry_run: bool = False,
    store: str = DEFAULT_STORE,
    tags: dict[str, str] | None = None,
    min_exchanges: int = 4,
    flagged_answers: FlaggedAnswers = "drop_exchange",
    progress: bool = True,
    batch_results: list[Path] | Path | None = None,
) -> dict:
    """Generate candidate conversations (or answer pairs) for each figure with a chat model.

    Args:
        figures: PMC figures in LLaVA-Med's layout (JSONL, JSON array or domain-keyed dict).
        image_root: folder of the figure images (``<pair_id>.jpg``); paths cannot escape it.
        demonstrations: clinician-picked conversations (``doctor_few_shot_examples.json``).
        out: output folder: ``candidates.jsonl`` (``answers=1``) or ``pairs.jsonl``
            (``answers=2``), ``journal.jsonl``, ``failed.jsonl``, ``dropped_exchanges.jsonl``,
            ``manifest.json``
            (``batch/`` in batch mode).
        client: the endpoint and how to call it, shared with ``rate``, ``judge`` and
            ``pairwise``: ``base_url``, ``model`` (paper: ``gpt-4-vision-preview``),
            ``api_key_env`` (the variable's name, never the key), pacing, retries, prices and
            ``mode: batch`` (Batch API jobs at about half the price, 24 h window).
        n_demos: demonstrations per prompt, one per modality (paper: 5).
        vision: attach the image as a base64 data URL; ``false`` sends text only.
        answers: 1 = conversations; 2 = per question two answers, for clinician marking.
        temperature / max_tokens / seed: sampling parameters (part of the cache key).
        extra_body: extra request fields for the endpoint, sent as given and part of the cache
            key: e.g. llama.cpp's ``grammar`` or vLLM's ``guided_choice`` to constrain a small
            local model's reply to the format asked for.
        on_bad_record: ``raise`` (before any request is sent: an error naming the file and the
            record) or ``skip`` (counted in the manifest) for figures without a caption, with
            unknown domain flags or a missing image, and for malformed demonstrations.
        dry_run: print the first full prompt and the estimated cost; send nothing, write nothing.
        store: MLflow store folder (experiment ``generation``).
        tags: extra MLflow run tags (a grid's ``grid``/``cell``/``stage``).
        min_exchanges: conversations with fewer question-answer exchanges are rejected
            (``answers=2`` needs one complete question).
        flagged_answers: what an answer that refuses or gives away the caption or context
            costs: ``drop_exchange`` (LLaVA-Med's post-processing removes such answers) takes
            out its question-answer exchange, written to ``dropped_exchanges.jsonl`` and
            counted, and rejects the reply only when fewer than ``min_exchanges`` are left;
            ``reject`` rejects the whole reply. Applied when replies are parsed, so a rerun
            with the other value re-parses the journal and sends nothing.
        progress: show the progress bar.
        batch_results: results file(s) of the offline runner to import (``client.batch_runner:
            file``).
    """
    figures, demonstrations, out = Path(figures), Path(demonstrations), Path(out)
    if answers not in (1, 2):
        raise ValueError(f"answers must be 1 or 2, got {answers}")
    if isinstance(batch_results, str | Path):
        batch_results = [Path(batch_results)]
    reports = {"figures": RecordReport(), "demonstrations": RecordReport()}
    demos = load_demonstrations(demonstrations, on_bad_record, reports["demonstrations"])
    if n_demos > 0 and not demos:
        raise ValueError(f"{demonstrations}: no usable demonstrations (n_demos={n_demos})")
    root = ImageRoot(image_root) if vision else None
    params = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
    params.update(extra_body or {})
    estimate = Estimate(client.price_per_million, client.mode == "batch")
    seen_ids: set[str] = set()

    def checked(report: RecordReport, on_bad: OnBad) -> Iterator[tuple[SourceFigure, Any]]:
        """Figures that pass every check, with their image path (``None`` without vision)."""
        seen_ids.clear()
        for pos, kind, fig in iter_figures(figures, on_bad, report):
            try:
                check_figure(fig, figures, pos, kind)
                pid = str(fig.pair_id)
                if pid in seen_ids:
                    raise BadRecordError(
                        figures,
                        pos,
                        f"duplicate pair_id {pid!r}",
                        "pair_id",
                        kind=kind,
                        category="duplicate:pair_id",
                    )
                path = None
                if root is not None:
                    try:
                        path = root.resolve(figure_image(fig))
                    except (OSError, ValueError) as exc:
                        raise BadRecordError(
                            figures, pos, str(exc), "image", kind=kind, category="missing_image"
                        ) from exc
            except BadRecordError as err:
                handle_bad(err, on_bad, report)
                continue
            seen_ids.add(pid)
            yield fig, (path, pos, kind)

    def requests(plan: IO[str] | None) -> Iterator[ChatRequest]:
        """One request per usable figure, built lazily; its plan line spooled to ``plan``."""
        report = reports["figures"]
        for fig, (path, pos, kind) in checked(report, on_bad_record):
            url = None
            if path is not None:
                try:
                    url = image_ref(path)
                except (OSError, ValueError) as exc:  # unreadable DICOM and the like
                    err = BadRecordError(
                        figures, pos, str(exc), "image", kind=kind, category="missing_image"
                    )
                    handle_bad(err, on_bad_record, report)
                    continue
            report.kept()
            chosen = select_demonstrations(demos, n_demos, seed, str(fig.pair_id))
            msgs = build_messages(fig, chosen, url, answers)
            req = ChatRequest(msgs, dict(params), meta={"pair_id": fig.pair_id})
            req.key = request_key(client.model, msgs, req.params)
            estimate.add(req)
            if plan is not None:
                line = {
                    "pair_id": fig.pair_id,
                    "image": figure_image(fig),
                    "domain": fig.domain,
                    "fig_caption": fig.fig_caption,
                    "mentions": fig.mentions_text(),
                    "key": req.key,
                    "demos": [d.id for d in chosen],
                }
                plan.write(json.dumps(line, ensure_ascii=False) + "\n")
            yield req

    if on_bad_record == "raise" and not dry_run:
        for _ in checked(RecordReport(), "raise"):  # fail on a bad record before paying for any
            pass

    if dry_run:
        first = None
        for req in requests(None):
            first = first or req
        if first is not None:
            print(printable_messages(first.messages))
        est = estimate.as_dict()
        print(
            f"\n{est['requests']} requests, ~{est['input_tokens']} input tokens, "
            f"<= {est['max_output_tokens']} output tokens, "
            f"estimated cost <= ${est['cost_usd_upper_bound']:.4f}"
            + (" (batch price)" if client.mode == "batch" else "")
        )
        return {"dry_run": True, "estimate": est}

    # one run per output folder; taking the lock removes temporaries of a killed run
    with output_lock(out):
        public = {
            **client.public(),
            "figures": str(figures),
            "image_root": str(image_root),
            "demonstrations": str(demonstrations),
            "out": str(out),
            "n_demos": n_demos,
            "vision": vision,
            "answers": answers,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "seed": seed,
            "extra_body": extra_body,
            "min_exchanges": min_exchanges,
            "flagged_answers": flagged_answers,
            "on_bad_record": on_bad_record,
            "batch_results": [str(p) for p in batch_results] if batch_results else None,
        }
        version = prompt_version(answers)
        plan_path = out / ".generate.plan.jsonl"
        name = "candidates.jsonl" if answers == 1 else "pairs.jsonl"
        with PipelineRun(
            "generation", "generate", store, {**(tags or {}), "model": client.model}
        ) as run:
            run.log_params(public)
            with Journal(out / "journal.jsonl") as journal:
                try:
                    with open(plan_path, "w", encoding="utf-8") as plan:
                        result = fill_requests(
                            client,
                            journal,
                            requests(plan),
                            "generate",
                            progress,
                            batch_results=batch_results,
                        )
                except BatchPending as exc:
                    plan_path.unlink(missing_ok=True)
                    return pending_result(exc, run)
                ledger = result.ledger
                counts = _assemble(
                    plan_path,
                    journal,
                    result.failures,
                    client,
                    out / name,
                    out / "failed.jsonl",
                    out / "dropped_exchanges.jsonl",
                    answers,
                    min_exchanges,
                    flagged_answers,
                    {"model": client.model, "prompt_version": version, "params": params},
                )
                torn = journal.torn_lines
            plan_path.unlink(missing_ok=True)
            counts = {
                "figures": reports["figures"].n_kept + reports["figures"].n_skipped,
                "requested": counts.pop("requested"),
                **counts,
                "torn_journal_lines": torn,
            }
            manifest = {
                "output": str(out / name),
                "counts": counts,
                "ledger": ledger.as_dict(),
                "estimate": estimate.as_dict(),
                "prompt_version": version,
                "batch": result.batch,
                "inputs": {
                    "figures": {"path": str(figures), "sha256": sha256_file(figures)},
                    "demonstrations": {
                        "path": str(demonstrations),
                        "sha256": sha256_file(demonstrations),
                    },
                },
                "records": {k: r.as_dict() for k, r in reports.items()},
                "config": public,
                "mlflow_run_id": run.run_id,
                "git": git_state(),
            }
            run.log_metrics(
                {
                    "generate/done": counts["done"],
                    "generate/failed": counts["failed"],
                    "generate/rejected": counts["rejected"],
                    "generate/dropped_exchanges": counts["dropped_exchanges"],
                    "generate/written": counts["written"],
                    "generate/requests_sent": ledger.requests_sent,
                    "generate/cached": ledger.cached,
                    "generate/cost_usd": ledger.cost_usd,
                }
            )
            run.log_dict(manifest, "generate.manifest.json")
        write_json(out / "manifest.json", manifest)
        return manifest


def _assemble(
    plan_path: Path,
    journal: Journal,
    failures: dict[str, Outcome],
    config: ClientConfig,
    out_path: Path,
    failed_path: Path,
    dropped_path: Path,
    answers: int,
    min_exchanges: int,
    flagged: FlaggedAnswers,
    generator_base: dict[str, Any],
) -> dict[str, Any]:
    """Write the outputs in figure order from the plan and the journal; return the counts."""
    requested = failed = written = 0
    rejected: dict[str, int] = {}
    dropped_by_reason: dict[str, int] = {}
    prices = config.price_per_million
    with (
        open(plan_path, encoding="utf-8") as plan,
        atomic_write(out_path) as fo,
        atomic_write(failed_path) as ff,
        atomic_write(dropped_path) as fd,
    ):

        def emit(fh: IO[str], rec: dict[str, Any]) -> None:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

        for raw in plan:
            p = json.loads(raw)
            requested += 1
            key = p["key"]
            entry = journal.get(key)
            res = (
                Outcome.from_entry(entry, prices)
                if entry is not None
                else failures.get(key) or Outcome(key=key, ok=False, error="not run")
            )
            if not res.ok:
                failed += 1
                emit(
                    ff,
                    {
                        "pair_id": p["pair_id"],
                        "key": key,
                        "stage": "request",
                        "reason": res.error,
                        "attempts": res.attempts,
                    },
                )
                continue
            generator = {
                "model": generator_base["model"],
                "prompt_version": generator_base["prompt_version"],
                "request_key": key,
                "params": generator_base["params"],
                "demonstrations": p["demos"],
                "finish_reason": res.finish_reason,
            }
            dropped: list[DroppedExchange] = []
            try:
                if res.finish_reason == "length":
                    # cut off by max_tokens: the last answer is half-written, yet it parses
                    raise Rejected(
                        "truncated",
                        "the reply hit max_tokens (finish_reason 'length'); raise max_tokens",
                    )
                if answers == 1:
                    turns = parse_conversation(
                        res.content, min_exchanges, res.refusal, flagged, dropped
                    )
                    cand = Candidate(
                        id=p["pair_id"],
                        image=p["image"],
                        pair_id=p["pair_id"],
                        conversations=turns,
                        domain=p["domain"],
                        generator=generator,
                    )
                    emit(fo, cand.model_dump(mode="json", by_alias=True))
                    written += 1
                else:
                    items = parse_pairs(res.content, 1, res.refusal, flagged, dropped)
                    base = {
                        "image": p["image"],
                        "fig_caption": p["fig_caption"],
                        "in_text_mention": p["mentions"],
                        "pair_id": p["pair_id"],
                        "generator": generator,
                    }
                    for rec in pair_records(items, base, str(p["pair_id"])):
                        emit(fo, rec)
                        written += 1
            except Rejected as rej:
                rejected[rej.reason] = rejected.get(rej.reason, 0) + 1
                emit(
                    ff,
                    {
                        "pair_id": p["pair_id"],
                        "key": key,
                        "stage": "parse",
                        "reason": rej.reason,
                        "detail": rej.detail,
                        "raw": res.content,
                    },
                )
                continue
            for d in dropped:  # taken out of a kept reply: reported, never silently lost
                dropped_by_reason[d.reason] = dropped_by_reason.get(d.reason, 0) + 1
                emit(
                    fd,
                    {
                        "pair_id": p["pair_id"],
                        "key": key,
                        "reason": d.reason,
                        "question": d.question,
                        "answer": d.answer,
                    },
                )
    return {
        "requested": requested,
        "done": requested - failed,
        "failed": failed,
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "dropped_exchanges": sum(dropped_by_reason.values()),
        "dropped_exchanges_by_reason": dict(sorted(dropped_by_reason.items())),
        "written": written,
    }
