"""``judge``: a judge model scores answers to LLaVA-Med-Bench (open-ended visual chat).

For each question the judge reads the figure's caption and in-text mentions, the question, the
reference answer (Assistant 1: the benchmark's ``gpt4_answer``) and the candidate's answer
(Assistant 2), and scores both from 1 to 10; the two scores go on the first line. By default
the judge is text-only, as LLaVA-Med's GPT-4 judge was; ``vision: true`` also shows it the
figure (a GPT-4V-class judge; the reference method's switch 6). Requests go through the project's OpenAI-compatible client (bounded concurrency,
retries with backoff, a request journal that makes reruns free, a cost ledger). A verdict whose
first line is not two scores in 1..10 gets one follow-up asking for them; if that fails too the
question is recorded in ``failed.jsonl`` and gets no review, never a default score.

A run that reviews fewer than all the benchmark's questions (``limit``, or failures) is marked
``partial`` in its manifest, ``scores.json`` and MLflow tags: its relative score is over the
reviewed questions only and is not the benchmark's figure. A killed run resumes from the journal:
rerun it with the same arguments and only the requests not yet answered are sent.

The review file is LLaVA-Med's layout (``question_id``, ``type``, ``domain``, ``pair_id``,
``question``, ``ans1``, ``ans2``, ``result``), read by ``score_chat``; failures show up there
as ``missing_question_ids`` when the question file is passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomedvital.data.jsonio import load_json, sha256_file, write_json, write_jsonl
from biomedvital.data.outputs import locks_output
from biomedvital.data.report import BadRecordError
from biomedvital.llm.config import ClientConfig
from biomedvital.llm.keys import request_key
from biomedvital.llm.outcome import ChatRequest
from biomedvital.llm.runner import run_requests
from biomedvital.tracking.mlflow import DEFAULT_STORE, PipelineRun
from biomedvital.tracking.provenance import git_state

from .chat import parse_scores, read_questions
from .figures import figure_ref, judge_request
from .score_vqa import read_predictions

JUDGE_SYSTEM = (
    "You review answers given by AI assistants to questions about a biomedical figure. You "
    "cannot see the figure; its caption and the article sentences that cite it tell you what it "
    "shows, and they are the ground truth for your review."
)
JUDGE_SYSTEM_VISION = (
    "You review answers given by AI assistants to questions about a biomedical figure, which "
    "you are shown. Its caption and the article sentences that cite it are the ground truth for "
    "your review; the figure lets you check what the answers say it shows."
)

JUDGE_TASK = """\
Two assistants answered the question above. Rate each answer from 1 (worst) to 10 (best) for \
how helpful, relevant and accurate it is, and for its level of detail, judged against the \
figure's caption and mentions. Judge content, not length, and do not let the order in which the \
answers are shown sway you.

Output format: the first line holds only the two scores, Assistant 1's then Assistant 2's, \
separated by a space (for example "7 4"). From the second line on, explain your scores."""

REASK_PROMPT = (
    "Your reply did not start with the two scores. Reply with the two scores only, integers "
    "from 1 to 10 separated by a space, Assistant 1's first, on the first line."
)


def judge_messages(
    question: str,
    caption: str,
    mentions: str,
    reference: str,
    candidate: str,
    image_url: str | None = None,
) -> list[dict[str, Any]]:
    """The judge's request for one question (reference = Assistant 1, candidate = 2), with the
    figure after the text when ``image_url`` is given."""
    body = (
        f"[Figure caption]\n{caption.strip() or '(none)'}\n\n"
        f"[Sentences citing the figure]\n{mentions.strip() or '(none)'}\n\n"
        f"[Question]\n{question.strip()}\n\n"
        f"[Assistant 1]\n{reference.strip()}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{candidate.strip()}\n[End of Assistant 2]\n\n"
        f"[Task]\n{JUDGE_TASK}"
    )
    return judge_request(JUDGE_SYSTEM, JUDGE_SYSTEM_VISION, body, image_url)


def parse_verdict(text: str | None) -> tuple[float, float] | None:
    """The two scores of a verdict's first line when both are in 1..10, else ``None``."""
    if not text:
        return None
    try:
        s1, s2 = parse_scores(text)
    except ValueError:
        return None
    return (s1, s2) if 1 <= s1 <= 10 and 1 <= s2 <= 10 else None


def _mentions(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(str(m.get("tokens", "")) if isinstance(m, dict) else str(m) for m in value)
    return ""


def _question_text(q: dict[str, Any]) -> str:
    return str(q.get("text", "")).replace("<image>", "").strip()


def _read_questions(path: Path) -> dict[str, dict[str, Any]]:
    questions = read_questions(path)
    for n, (qid, q) in enumerate(questions.items(), start=1):
        for key in ("text", "gpt4_answer"):
            if not isinstance(q.get(key), str):
                raise BadRecordError(path, n, "missing or not a string", key, kind="record")
        if qid == "":
            raise BadRecordError(path, n, "empty question_id", "question_id", kind="record")
    return questions


def _captions(path: Path | None) -> dict[str, dict[str, Any]]:
    """``pair_id -> figure`` from LLaVA-Med's caption file (a dict of domain -> figures)."""
    if path is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    data = load_json(path)
    if not isinstance(data, dict):
        raise BadRecordError(path, None, "expected a JSON object keyed by domain")
    for figs in data.values():
        for fig in figs if isinstance(figs, list) else []:
            if isinstance(fig, dict) and isinstance(fig.get("pair_id"), str):
                out.setdefault(fig["pair_id"], fig)
    return out


@locks_output("out")
def judge(
    questions: Path,
    answers: Path,
    out: Path,
    client: ClientConfig,
    captions: Path | None = None,
    vision: bool = False,
    image_root: Path | None = None,
    limit: int | None = None,
    temperature: float = 0.0,
    max_tokens: int = 512,
    seed: int = 0,
    extra_body: dict[str, Any] | None = None,
    store: str = DEFAULT_STORE,
    tags: dict[str, str] | None = None,
    progress: bool = True,
) -> dict:
    """Score the reference and a model's answers to LLaVA-Med-Bench with a judge model.

    Args:
        questions: LLaVA-Med-Bench questions (``llava_med_eval_qa50_qa.jsonl``: ``question_id``,
            ``text``, ``gpt4_answer``, ``fig_caption``, ``in_text_mention``, ``type``,
            ``domain``, ``pair_id``).
        answers: the model's answers, JSONL of ``question_id`` and ``text`` (``model_vqa``'s).
        out: output folder: ``reviews.jsonl`` (for ``score-chat``), ``failed.jsonl``,
            ``journal.jsonl`` (request cache), ``manifest.json`` and ``scores.json``.
        client: the judge endpoint and how to call it, as for ``generate``: ``base_url``,
            ``model``, ``api_key_env`` (the key only from that variable), pacing, retries and
            prices; online only (``mode: batch`` is refused).
        captions: LLaVA-Med's caption file: caption and mentions by ``pair_id`` when a question
            lacks them.
        vision: also show the judge the figure (a vision judge); the default is text only, as
            LLaVA-Med's GPT-4 judge.
        image_root: with ``vision``: the folder the questions' ``image`` names are under
            (escapes refused); every figure is checked before any request.
        limit: judge only the first ``limit`` questions (trial runs; recorded).
        temperature / max_tokens / seed: judge sampling (part of the cache key).
        extra_body: extra request fields for the endpoint, sent as given and part of the cache
            key: e.g. llama.cpp's ``grammar`` or vLLM's ``guided_choice`` to constrain a small
            local model's reply to the format asked for.
        store: MLflow store folder (experiment ``evaluation``).
        tags: extra MLflow run tags (a grid's ``grid``/``cell``/``stage``).
        progress: show the progress bar.

    Every question in scope needs exactly one answer; an answer whose id is not a question is
    refused (as ``score-vqa`` does).
    """
    from .chat import score_chat

    questions, answers, out = Path(questions), Path(answers), Path(out)
    client.require_online("judge")
    if vision and image_root is None:
        raise ValueError("vision=True needs image_root (the folder of the benchmark's figures)")
    qmap = _read_questions(questions)
    preds = read_predictions(answers)
    extra = [qid for qid in preds if qid not in qmap]
    if extra:
        raise BadRecordError(
            answers,
            None,
            f"{len(extra)} answers have ids that are not questions (e.g. {extra[:5]})",
            "question_id",
            category="unmatched:question_id",
        )
    scope = list(qmap)[:limit] if limit is not None else list(qmap)
    missing = [qid for qid in scope if qid not in preds]
    if missing:
        raise BadRecordError(
            answers,
            None,
            f"{len(missing)} of {len(scope)} questions have no answer (e.g. {missing[:5]})",
            "question_id",
            category="unmatched:question_id",
        )
    figs = _captions(Path(captions) if captions is not None else None)
    params = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
    params.update(extra_body or {})
    requests = []
    for qid in scope:
        q = qmap[qid]
        fig = figs.get(str(q.get("pair_id")), {})
        caption = q.get("fig_caption") or fig.get("fig_caption") or ""
        mentions = _mentions(q.get("in_text_mention") or fig.get("in_text_mention"))
        url = figure_ref(image_root, q.get("image"), questions, qid) if vision else None
        msgs = judge_messages(
            _question_text(q), caption, mentions, q["gpt4_answer"], preds[qid], url
        )
        req = ChatRequest(msgs, dict(params), meta={"question_id": qid})
        req.key = request_key(client.model, msgs, req.params)
        requests.append(req)

    out.mkdir(parents=True, exist_ok=True)
    journal = out / "journal.jsonl"
    public = {
        **client.public(),
        "questions": str(questions),
        "answers": str(answers),
        "captions": str(captions) if captions else None,
        "vision": vision,
        "image_root": str(image_root) if image_root else None,
        "limit": limit,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "seed": seed,
        "extra_body": extra_body,
    }
    with PipelineRun("evaluation", "judge", store, {**(tags or {}), "model": client.model}) as run:
        run.log_params(public)
        first, ledger1, torn = run_requests(client, journal, requests, "judge", progress)
        verdicts: dict[str, str] = {}
        failures: dict[str, str] = {}
        again: dict[str, ChatRequest] = {}
        for req in requests:
            qid, res = req.meta["question_id"], first[req.key]
            if not res.ok:
                failures[qid] = res.error or "unknown"
            elif parse_verdict(res.content) is not None:
                verdicts[qid] = res.content or ""
            else:
                msgs = [
                    *req.messages,
                    {"role": "assistant", "content": res.content or ""},
                    {"role": "user", "content": REASK_PROMPT},
                ]
                again[qid] = ChatRequest(msgs, dict(params), meta=req.meta)
                again[qid].key = request_key(client.model, msgs, again[qid].params)
        ledger2 = None
        by_qid = {r.meta["question_id"]: r for r in requests}
        if again:
            second, ledger2, _ = run_requests(
                client, journal, list(again.values()), "judge (re-ask)", progress
            )
            for qid, req in again.items():
                res = second[req.key]
                if res.ok and parse_verdict(res.content) is not None:
                    raw1 = first[by_qid[qid].key].content or ""
                    verdicts[qid] = f"{res.content}\n\n[re-asked; first reply]\n{raw1}"
                else:
                    failures[qid] = res.error if not res.ok else "unparsable: no two 1-10 scores"

        reviews, failed = [], []
        for qid in scope:
            q = qmap[qid]
            if qid in failures:
                failed.append({"question_id": q["question_id"], "reason": failures[qid]})
                continue
            reviews.append(
                {
                    "question_id": q["question_id"],
                    "pair_id": q.get("pair_id"),
                    "type": q.get("type"),
                    "domain": q.get("domain"),
                    "question": _question_text(q),
                    "ans1": q["gpt4_answer"],
                    "ans2": preds[qid],
                    "answer1_id": "reference",
                    "answer2_id": str(answers),
                    "result": verdicts[qid],
                }
            )
        write_jsonl(out / "reviews.jsonl", reviews)
        write_jsonl(out / "failed.jsonl", failed)
        summary = (
            score_chat(out / "reviews.jsonl", questions, out=out / "scores.json")
            if reviews
            else None
        )
        cost = ledger1.cost_usd + (ledger2.cost_usd if ledger2 else 0.0)
        counts = {
            "questions": len(scope),
            "reviewed": len(reviews),
            "failed": len(failed),
            "reasked": len(again),
            "unparsable_after_reask": sum(
                1 for f in failed if f["reason"].startswith("unparsable")
            ),
        }
        manifest = {
            "counts": counts,
            "ledger": {
                "first": ledger1.as_dict(),
                "reask": ledger2.as_dict() if ledger2 else None,
            },
            "cost_usd": round(cost, 6),
            "torn_journal_lines": torn,
            "inputs": {
                "questions": {"path": str(questions), "sha256": sha256_file(questions)},
                "answers": {"path": str(answers), "sha256": sha256_file(answers)},
            },
            "overall": summary["overall"] if summary else None,
            "partial": len(reviews) < len(qmap),
            "config": public,
            "mlflow_run_id": run.run_id,
            "git": git_state(),
        }
        metrics: dict[str, float] = {f"judge/{k}": v for k, v in counts.items()}
        metrics["judge/cost_usd"] = cost
        if summary:
            for key in ("relative_mean_of_ratios", "relative_ratio_of_means"):
                metrics[f"judge/{key}"] = summary["overall"][key]
        run.log_metrics(metrics)
        run.client.set_tag(run.run_id, "partial", str(manifest["partial"]).lower())
        run.log_dict(manifest, "judge.manifest.json")
        run.client.log_artifact(run.run_id, str(out / "reviews.jsonl"))
    write_json(out / "manifest.json", manifest)
    return manifest
