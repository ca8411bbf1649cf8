"""``pairwise``: a judge compares two models' answers to a VQA benchmark, in both orders.

For each question the judge reads the question, the benchmark's ground-truth answer and the two
models' answers (text only by default; ``vision: true`` also shows it the image, as
BioMed-VITAL's GPT-4V judge saw it) and says which answer is better: ``[[A]]``, ``[[B]]``
or ``[[C]]`` for a tie. Every question is judged twice with the positions swapped: order ``ab``
shows model A's answer as Assistant A, order ``ba`` shows model B's answer as Assistant A. The
calls go through the project's OpenAI-compatible client (bounded concurrency, retries, a request
journal that makes reruns free, a cost ledger), as for ``judge``.

``verdicts.jsonl`` holds one record per call (``question_id``, ``order``, ``category`` = the
question's answer type, ``verdict`` plus ``error`` when the call failed, whose verdict is then
empty), the layout ``win_rate`` reads (with rates per category too); a
failed call or a reply without a marker makes the question a counted failure there, never a tie.
The result is model A's win rate over model B. A run that counts fewer than all the split's
questions (``limit``, or failed verdicts) is marked ``partial`` in its manifest and MLflow tags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomedvital.data.jsonio import sha256_file, write_json, write_jsonl
from biomedvital.data.outputs import locks_output
from biomedvital.llm.config import ClientConfig
from biomedvital.llm.keys import request_key
from biomedvital.llm.outcome import ChatRequest
from biomedvital.llm.runner import run_requests
from biomedvital.tracking.mlflow import DEFAULT_STORE, PipelineRun
from biomedvital.tracking.provenance import git_state

from .benchmarks import Benchmark, load_benchmark
from .figures import figure_ref, judge_request
from .score_vqa import join_predictions, read_predictions
from .winrate import CombineRule, win_rate

PAIRWISE_SYSTEM = (
    "You compare two AI assistants' answers to a question about a medical image. You cannot see "
    "the image; the reference answer from the benchmark is correct and is what you judge against."
)
PAIRWISE_SYSTEM_VISION = (
    "You compare two AI assistants' answers to a question about a medical image, which you are "
    "shown. The reference answer from the benchmark is correct and is what you judge against."
)

PAIRWISE_TASK = """\
Decide which assistant answered the question better. What matters first is agreement with the \
reference answer in meaning (synonyms and extra correct detail are fine; a wrong or \
contradicting statement is not), then clarity. Length is not a merit, and the order in which the \
answers are shown must not sway you. Explain briefly, then end with your verdict on its own \
line: the letter of the better assistant in double square brackets, or C in double square \
brackets when the two are equally good or equally bad."""


def pairwise_messages(
    question: str, reference: str, first: str, second: str, image_url: str | None = None
) -> list[dict[str, Any]]:
    """The judge's request: ``first`` is shown as Assistant A, ``second`` as Assistant B; the
    image after the text when ``image_url`` is given."""
    body = (
        f"[Question]\n{question.strip()}\n\n"
        f"[Reference answer]\n{reference.strip()}\n\n"
        f"[Assistant A]\n{first.strip()}\n[End of Assistant A]\n\n"
        f"[Assistant B]\n{second.strip()}\n[End of Assistant B]\n\n"
        f"[Task]\n{PAIRWISE_TASK}"
    )
    return judge_request(PAIRWISE_SYSTEM, PAIRWISE_SYSTEM_VISION, body, image_url)


@locks_output("out")
def pairwise(
    questions: Path,
    answers_a: Path,
    answers_b: Path,
    out: Path,
    client: ClientConfig,
    benchmark: Benchmark = "vqa_rad",
    split: str = "test",
    image_cache: Path | None = None,
    vision: bool = False,
    image_root: Path | None = None,
    limit: int | None = None,
    rule: CombineRule = "sum",
    n_boot: int = 1000,
    temperature: float = 0.0,
    max_tokens: int = 512,
    seed: int = 0,
    extra_body: dict[str, Any] | None = None,
    store: str = DEFAULT_STORE,
    progress: bool = True,
    tags: dict[str, str] | None = None,
) -> dict:
    """Win rate of model A over model B on a VQA benchmark, judged pairwise with position swap.

    Args:
        questions: the benchmark's file or folder (as for ``score-vqa``).
        answers_a / answers_b: each model's answers, JSONL of ``question_id`` and ``text``; every
            question needs exactly one answer in each file, and an id that is not a question is
            refused (as ``score-vqa`` does).
        out: output folder: ``verdicts.jsonl`` (for ``win-rate``), ``journal.jsonl`` (request
            cache), ``win_rate.json`` and ``manifest.json``.
        client: the judge endpoint and how to call it, as for ``generate``: ``base_url``,
            ``model``, ``api_key_env`` (the key only from that variable), pacing, retries and
            prices; online only (``mode: batch`` is refused).
        benchmark / split / image_cache: which questions (``image_cache``: PathVQA parquet only).
        vision: also show the judge the question's image (a vision judge, as the paper's
            GPT-4V); the default is text only.
        image_root: with ``vision``: the folder the benchmark's image paths are under (PathVQA
            parquet: defaults to ``image_cache``); every image is checked before any request.
        limit: judge only the first ``limit`` questions (trial runs; recorded).
        rule / n_boot: how the two orders combine and the bootstrap size (see ``win_rate``).
        temperature / max_tokens / seed: judge sampling (part of the cache key).
        extra_body: extra request fields for the endpoint, sent as given and part of the cache
            key: e.g. llama.cpp's ``grammar`` or vLLM's ``guided_choice`` to constrain a small
            local model's reply to the format asked for.
        store: MLflow store folder (experiment ``evaluation``, run ``pairwise``).
        progress: show the progress bar.
        tags: extra MLflow run tags (a grid's ``grid``/``cell``).

    Returns the manifest; its ``win_rate`` is ``win_rate``'s result (model A's side).
    """
    questions, answers_a, answers_b, out = (
        Path(questions),
        Path(answers_a),
        Path(answers_b),
        Path(out),
    )
    client.require_online("pairwise")
    image_root = image_root if image_root is not None else image_cache
    if vision and image_root is None:
        raise ValueError("vision=True needs image_root (the folder of the benchmark's images)")
    items = load_benchmark(benchmark, questions, split, image_cache)
    if not items:
        raise ValueError(f"{questions}: no {benchmark} questions in split {split!r}")
    what = f"{benchmark} {split}"
    pairs_a = join_predictions(items, read_predictions(answers_a), answers_a, what)
    pairs_b = join_predictions(items, read_predictions(answers_b), answers_b, what)
    scope = range(len(items) if limit is None else min(limit, len(items)))

    params = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
    params.update(extra_body or {})
    requests = []
    identical: list[dict[str, Any]] = []  # a tie by construction: no judge call
    for i in scope:
        item, text_a, text_b = pairs_a[i][0], pairs_a[i][1], pairs_b[i][1]
        if text_a.strip() == text_b.strip():
            # both orders would be one prompt (one journal key, one verdict read twice), and
            # any verdict but a tie would be the judge's noise counted as position bias
            identical += [
                {
                    "question_id": item.question_id,
                    "order": o,
                    "category": item.answer_type,
                    "verdict": "[[C]]",
                    "identical": True,
                }
                for o in ("ab", "ba")
            ]
            continue
        url = figure_ref(image_root, item.image, questions, item.question_id) if vision else None
        for order, first, second in (("ab", text_a, text_b), ("ba", text_b, text_a)):
            msgs = pairwise_messages(item.question, item.answer, first, second, url)
            req = ChatRequest(msgs, dict(params), meta={"question_id": item.question_id})
            req.meta["order"] = order
            req.meta["category"] = item.answer_type  # open / closed: win rates per category
            req.key = request_key(client.model, msgs, req.params)
            requests.append(req)

    out.mkdir(parents=True, exist_ok=True)
    public = {
        **client.public(),
        "benchmark": benchmark,
        "split": split,
        "questions": str(questions),
        "answers_a": str(answers_a),
        "answers_b": str(answers_b),
        "vision": vision,
        "image_root": str(image_root) if image_root else None,
        "limit": limit,
        "rule": rule,
        "n_boot": n_boot,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "seed": seed,
        "extra_body": extra_body,
    }
    with PipelineRun(
        "evaluation", "pairwise", store, {**(tags or {}), "model": client.model}
    ) as run:
        run.log_params(public)
        outcomes, ledger, torn = run_requests(
            client, out / "journal.jsonl", requests, "pairwise", progress
        )
        records = []
        for req in requests:
            res = outcomes[req.key]
            rec: dict[str, Any] = {**req.meta, "verdict": (res.content or "") if res.ok else ""}
            if not res.ok:
                rec["error"] = res.error or "unknown"
            records.append(rec)
        place = {items[i].question_id: i for i in scope}
        records = sorted(records + identical, key=lambda r: place[r["question_id"]])  # stable
        write_jsonl(out / "verdicts.jsonl", records)
        result = win_rate(
            out / "verdicts.jsonl", out / "win_rate.json", n_boot=n_boot, seed=seed, rule=rule
        )
        counts = {
            "questions": len(scope),
            "calls": len(requests),
            "identical_answers": len(identical) // 2,
            "failed_calls": sum(1 for r in records if "error" in r),
        }
        manifest = {
            "counts": counts,
            "win_rate": result,
            "partial": len(scope) < len(items) or result["n_failed"] > 0,
            "ledger": ledger.as_dict(),
            "cost_usd": round(ledger.cost_usd, 6),
            "torn_journal_lines": torn,
            "inputs": {
                "questions": {"path": str(questions)},
                "answers_a": {"path": str(answers_a), "sha256": sha256_file(answers_a)},
                "answers_b": {"path": str(answers_b), "sha256": sha256_file(answers_b)},
            },
            "config": public,
            "mlflow_run_id": run.run_id,
            "git": git_state(),
        }
        metrics: dict[str, float] = {f"pairwise/{k}": v for k, v in counts.items()}
        metrics["pairwise/cost_usd"] = ledger.cost_usd
        tallies = ("n", "wins", "ties", "losses", "n_failed", "n_identical", "position_consistency")
        for key in tallies:
            if result.get(key) is not None:
                metrics[f"pairwise/{key}"] = result[key]
        for key in ("win_rate_half_ties", "win_rate_excl_ties"):
            if result.get(key) is not None:
                metrics[f"pairwise/{key}"] = result[key]
                if result.get(f"{key}_ci") is not None:
                    low, high = result[f"{key}_ci"]
                    metrics[f"pairwise/{key}_ci_low"] = low
                    metrics[f"pairwise/{key}_ci_high"] = high
        run.log_metrics(metrics)
        run.client.set_tag(run.run_id, "partial", str(manifest["partial"]).lower())
        run.log_dict(manifest, "pairwise.manifest.json")
        run.client.log_artifact(run.run_id, str(out / "verdicts.jsonl"))
    write_json(out / "manifest.json", manifest)
    return manifest
