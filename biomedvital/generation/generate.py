"""``generate``: ask a chat model for instruction conversations about PMC figures (paper stage 1).

One request per figure; responses are journaled so an interrupted run resumes where it stopped
and a finished one reruns for free. Outputs are written at the end, atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from biomedvital.data.images import ImageRoot
from biomedvital.data.jsonio import check_unique, sha256_file, write_json, write_jsonl
from biomedvital.data.records import Candidate, SourceFigure, read_demonstrations, read_figures
from biomedvital.data.report import BadRecordError, RecordReport
from biomedvital.generation.client import (
    ChatRequest,
    ClientConfig,
    cost_of,
    estimate_tokens,
    request_key,
    run_requests,
)
from biomedvital.generation.parse import Rejected, pair_records, parse_conversation, parse_pairs
from biomedvital.generation.prompts import (
    build_messages,
    image_ref,
    printable_messages,
    prompt_version,
    select_demonstrations,
)
from biomedvital.tracking.mlflow import DEFAULT_STORE, PipelineRun
from biomedvital.tracking.provenance import git_state


def figure_image(fig: SourceFigure) -> str:
    """The figure's image file: its ``image`` field if present, else ``<pair_id>.jpg`` (LLaVA-Med)."""
    image = getattr(fig, "image", None)
    return str(image) if image else f"{fig.pair_id}.jpg"


def estimate_cost(requests: list[ChatRequest], prices: dict[str, float] | None) -> dict[str, float]:
    """Upper-bound cost: estimated input tokens plus ``max_tokens`` of output per request."""
    n_in = n_out = 0
    for r in requests:
        i, o = estimate_tokens(r.messages, int(r.params.get("max_tokens", 0)))
        n_in, n_out = n_in + i, n_out + o
    usage = {"prompt_tokens": n_in, "completion_tokens": n_out}
    return {
        "requests": len(requests),
        "input_tokens": n_in,
        "max_output_tokens": n_out,
        "cost_usd_upper_bound": round(cost_of(usage, prices), 4),
    }


def generate(
    figures: Path,
    image_root: Path,
    demonstrations: Path,
    out: Path,
    base_url: str,
    model: str,
    api_key_env: str = "OPENAI_API_KEY",
    n_demos: int = 5,
    vision: bool = True,
    answers: int = 1,
    temperature: float = 0.7,
    max_tokens: int = 1024,
    seed: int = 0,
    concurrency: int = 8,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    max_attempts: int = 5,
    timeout_s: float = 120,
    price_per_million: dict[str, float] | None = None,
    on_bad_record: Literal["raise", "skip"] = "raise",
    dry_run: bool = False,
    store: str = DEFAULT_STORE,
    min_exchanges: int = 4,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
    progress: bool = True,
) -> dict:
    """Generate candidate conversations (or answer pairs) for each figure with a chat model.

    Args:
        figures: PMC figures in LLaVA-Med's layout (JSONL, JSON array or domain-keyed dict).
        image_root: folder of the figure images (``<pair_id>.jpg``); paths cannot escape it.
        demonstrations: clinician-picked conversations (``doctor_few_shot_examples.json``).
        out: output folder: ``candidates.jsonl`` (``answers=1``) or ``pairs.jsonl``
            (``answers=2``), ``journal.jsonl``, ``failed.jsonl``, ``manifest.json``.
        base_url: OpenAI-compatible endpoint.
        model: model name (paper: ``gpt-4-vision-preview``).
        api_key_env: name of the environment variable holding the API key (never the key).
        n_demos: demonstrations per prompt, one per modality (paper: 5).
        vision: attach the image as a base64 data URL; ``false`` sends text only.
        answers: 1 = conversations; 2 = per question two answers, for clinician marking.
        temperature / max_tokens / seed: sampling parameters (part of the cache key).
        concurrency / requests_per_minute / tokens_per_minute: pacing.
        max_attempts / timeout_s / backoff_base_s / backoff_max_s: retry policy.
        price_per_million: ``{"input": $, "output": $}`` per 1M tokens for the cost ledger.
        on_bad_record: ``raise`` or ``skip`` (counted) for bad figures and missing images.
        dry_run: print the first full prompt and the estimated cost; send nothing, write nothing.
        store: MLflow store folder (experiment ``generation``).
        min_exchanges: conversations with fewer question-answer exchanges are rejected
            (``answers=2`` needs one complete question).
        progress: show the progress bar.
    """
    figures, demonstrations, out = Path(figures), Path(demonstrations), Path(out)
    if answers not in (1, 2):
        raise ValueError(f"answers must be 1 or 2, got {answers}")
    config = ClientConfig.from_knobs(locals())
    reports = {"figures": RecordReport(), "demonstrations": RecordReport()}
    figs: list[SourceFigure] = read_figures(figures, on_bad_record, reports["figures"])
    figs = check_unique(figs, "pair_id", figures, on_bad=on_bad_record, report=reports["figures"])
    demos = read_demonstrations(demonstrations, on_bad_record, reports["demonstrations"])
    root = ImageRoot(image_root) if vision else None
    params = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}

    requests: list[tuple[SourceFigure, ChatRequest, list[str]]] = []
    for i, fig in enumerate(figs, start=1):
        url = None
        if root is not None:
            try:
                url = image_ref(root.resolve(figure_image(fig)))
            except (OSError, ValueError) as exc:
                err = BadRecordError(
                    figures, i, str(exc), "pair_id", kind="record", category="missing_image"
                )
                if on_bad_record == "raise":
                    raise err from exc
                reports["figures"].skip(err)
                continue
        chosen = select_demonstrations(demos, n_demos, seed, str(fig.pair_id))
        msgs = build_messages(fig, chosen, url, answers)
        req = ChatRequest(msgs, dict(params), meta={"pair_id": fig.pair_id})
        req.key = request_key(model, msgs, req.params)
        requests.append((fig, req, [d.id for d in chosen]))

    estimate = estimate_cost([r for _, r, _ in requests], config.price_per_million)
    if dry_run:
        if requests:
            print(printable_messages(requests[0][1].messages))
        print(
            f"\n{estimate['requests']} requests, ~{estimate['input_tokens']} input tokens, "
            f"<= {estimate['max_output_tokens']} output tokens, "
            f"estimated cost <= ${estimate['cost_usd_upper_bound']:.4f}"
        )
        return {"dry_run": True, "estimate": estimate}

    out.mkdir(parents=True, exist_ok=True)
    public = {
        **config.public(),
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
        "min_exchanges": min_exchanges,
        "on_bad_record": on_bad_record,
    }
    version = prompt_version(answers)
    with PipelineRun("generation", "generate", store, {"model": model}) as run:
        run.log_params(public)
        outcomes, ledger, torn = run_requests(
            config, out / "journal.jsonl", [r for _, r, _ in requests], "generate", progress
        )
        records: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        rejected: dict[str, int] = {}
        for fig, req, demo_ids in requests:
            res = outcomes[req.key]
            if not res.ok:
                failed.append(
                    {
                        "pair_id": fig.pair_id,
                        "key": req.key,
                        "stage": "request",
                        "reason": res.error,
                        "attempts": res.attempts,
                    }
                )
                continue
            generator = {
                "model": model,
                "prompt_version": version,
                "request_key": req.key,
                "params": params,
                "demonstrations": demo_ids,
                "finish_reason": res.finish_reason,
            }
            try:
                if answers == 1:
                    turns = parse_conversation(res.content, min_exchanges, res.refusal)
                    cand = Candidate(
                        id=fig.pair_id,
                        image=figure_image(fig),
                        pair_id=fig.pair_id,
                        conversations=turns,
                        domain=fig.domain,
                        generator=generator,
                    )
                    records.append(cand.model_dump(mode="json", by_alias=True))
                else:
                    items = parse_pairs(res.content, 1, res.refusal)
                    base = {
                        "image": figure_image(fig),
                        "fig_caption": fig.fig_caption,
                        "in_text_mention": fig.mentions_text(),
                        "pair_id": fig.pair_id,
                        "generator": generator,
                    }
                    records.extend(pair_records(items, base, str(fig.pair_id)))
            except Rejected as rej:
                rejected[rej.reason] = rejected.get(rej.reason, 0) + 1
                failed.append(
                    {
                        "pair_id": fig.pair_id,
                        "key": req.key,
                        "stage": "parse",
                        "reason": rej.reason,
                        "detail": rej.detail,
                        "raw": res.content,
                    }
                )
        name = "candidates.jsonl" if answers == 1 else "pairs.jsonl"
        write_jsonl(out / name, records)
        write_jsonl(out / "failed.jsonl", failed)
        n_failed = sum(1 for f in failed if f["stage"] == "request")
        counts = {
            "figures": len(figs),
            "requested": len(requests),
            "done": len(requests) - n_failed,
            "failed": n_failed,
            "rejected": sum(rejected.values()),
            "rejected_by_reason": dict(sorted(rejected.items())),
            "written": len(records),
            "torn_journal_lines": torn,
        }
        manifest = {
            "output": str(out / name),
            "counts": counts,
            "ledger": ledger.as_dict(),
            "estimate": estimate,
            "prompt_version": version,
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
                "generate/written": counts["written"],
                "generate/requests_sent": ledger.requests_sent,
                "generate/cached": ledger.cached,
                "generate/cost_usd": ledger.cost_usd,
            }
        )
        run.log_dict(manifest, "generate.manifest.json")
    write_json(out / "manifest.json", manifest)
    return manifest
