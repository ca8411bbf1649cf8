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

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from biomedvital.data.jsonio import load_json, write_jsonl
from biomedvital.data.report import BadRecordError
from biomedvital.llm.config import ClientConfig
from biomedvital.llm.outcome import ChatRequest
from biomedvital.llm.sampling import SamplingArgs
from biomedvital.llm.stage import Answer, ChatStage, Report
from biomedvital.tracking.mlflow import DEFAULT_STORE

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

SAMPLING = SamplingArgs(temperature=0.0, max_tokens=512)
"""``judge``'s default sampling: the most likely scores, room for the comparison."""

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


def judge(
    questions: Path,
    answers: Path,
    out: Path,
    client: ClientConfig,
    captions: Path | None = None,
    vision: bool = False,
    image_root: Path | None = None,
    limit: int | None = None,
    sampling: SamplingArgs = SAMPLING,
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
        sampling: the judge's temperature, top_p, seed and max_tokens (part of the cache key).
        extra_body: extra request fields for the endpoint, sent as given and part of the cache
            key: e.g. llama.cpp's ``grammar`` or vLLM's ``guided_choice`` to constrain a small
            local model's reply to the format asked for.
        store: MLflow store folder (experiment ``evaluation``).
        tags: extra MLflow run tags (a grid's ``grid``/``cell``/``stage``).
        progress: show the progress bar.

    Every question in scope needs exactly one answer; an answer whose id is not a question is
    refused (as ``score-vqa`` does).
    """
    client.require_online("judge")
    if vision and image_root is None:
        raise ValueError("vision=True needs image_root (the folder of the benchmark's figures)")
    stage = Judge(
        Path(questions),
        Path(answers),
        Path(captions) if captions is not None else None,
        vision,
        image_root,
        limit,
        out=out,
        client=client,
        sampling=sampling,
        extra_body=extra_body,
        store=store,
        tags=tags,
        progress=progress,
    )
    return stage.run()


class Judge(ChatStage):
    """``judge`` on the chat-stage skeleton: one review per question, a verdict without two
    scores re-asked once."""

    name = "judge"
    experiment = "evaluation"
    reask_prompt = REASK_PROMPT

    def __init__(
        self,
        questions: Path,
        answers: Path,
        captions: Path | None,
        vision: bool,
        image_root: Path | None,
        limit: int | None,
        **stage: Any,
    ) -> None:
        super().__init__(**stage)
        self.questions, self.answers, self.captions = questions, answers, captions
        self.vision, self.image_root, self.limit = vision, image_root, limit
        self.qmap = _read_questions(questions)
        self.preds = read_predictions(answers)
        self.scope = list(self.qmap)[:limit] if limit is not None else list(self.qmap)
        self._match_answers()

    def _match_answers(self) -> None:
        extra = [qid for qid in self.preds if qid not in self.qmap]
        if extra:
            raise BadRecordError(
                self.answers,
                None,
                f"{len(extra)} answers have ids that are not questions (e.g. {extra[:5]})",
                "question_id",
                category="unmatched:question_id",
            )
        missing = [qid for qid in self.scope if qid not in self.preds]
        if missing:
            raise BadRecordError(
                self.answers,
                None,
                f"{len(missing)} of {len(self.scope)} questions have no answer "
                f"(e.g. {missing[:5]})",
                "question_id",
                category="unmatched:question_id",
            )

    def check(self) -> None:
        if self.vision:  # every figure is checked before any request
            for qid in self.scope:
                figure_ref(self.image_root, self.qmap[qid].get("image"), self.questions, qid)

    def inputs(self) -> dict[str, Path | None]:
        return {"questions": self.questions, "answers": self.answers}

    def public(self) -> dict[str, Any]:
        return {
            "questions": str(self.questions),
            "answers": str(self.answers),
            "captions": str(self.captions) if self.captions else None,
            "vision": self.vision,
            "image_root": str(self.image_root) if self.image_root else None,
            "limit": self.limit,
        }

    def requests(self) -> Iterator[tuple[ChatRequest, dict[str, Any]]]:
        figs = _captions(self.captions)
        for qid in self.scope:
            q = self.qmap[qid]
            fig = figs.get(str(q.get("pair_id")), {})
            caption = q.get("fig_caption") or fig.get("fig_caption") or ""
            mentions = _mentions(q.get("in_text_mention") or fig.get("in_text_mention"))
            url = (
                figure_ref(self.image_root, q.get("image"), self.questions, qid)
                if self.vision
                else None
            )
            msgs = judge_messages(
                _question_text(q), caption, mentions, q["gpt4_answer"], self.preds[qid], url
            )
            req = ChatRequest(msgs, dict(self.params), meta={"question_id": qid})
            yield req, {"messages": msgs}

    def parses(self, reply: str | None) -> bool:
        return parse_verdict(reply) is not None

    def assemble(self, answers: Iterator[Answer]) -> Report:
        """``reviews.jsonl`` in LLaVA-Med's layout, ``failed.jsonl``, and ``scores.json``."""
        reviews, failed, reasked = [], [], 0
        for a in answers:
            qid = a.plan["meta"]["question_id"]
            q = self.qmap[qid]
            reasked += a.reasked
            if a.reply is None:
                reason = a.error or "unparsable: no two 1-10 scores"
                failed.append({"question_id": q["question_id"], "reason": reason})
                continue
            verdict = a.reply
            if a.reasked:
                verdict = f"{a.reply}\n\n[re-asked; first reply]\n{a.first.content or ''}"
            reviews.append(self._review(qid, q, verdict))
        write_jsonl(self.out / "reviews.jsonl", reviews)
        write_jsonl(self.out / "failed.jsonl", failed)
        return self._summary(reviews, failed, reasked)

    def _review(self, qid: str, q: dict[str, Any], verdict: str) -> dict[str, Any]:
        return {
            "question_id": q["question_id"],
            "pair_id": q.get("pair_id"),
            "type": q.get("type"),
            "domain": q.get("domain"),
            "question": _question_text(q),
            "ans1": q["gpt4_answer"],
            "ans2": self.preds[qid],
            "answer1_id": "reference",
            "answer2_id": str(self.answers),
            "result": verdict,
        }

    def _summary(self, reviews: list[dict], failed: list[dict], reasked: int) -> Report:
        """The relative scores (``scores.json``) of what was reviewed, and the counts."""
        from .chat import score_chat

        reviews_path = self.out / "reviews.jsonl"
        summary = (
            score_chat(reviews_path, self.questions, out=self.out / "scores.json")
            if reviews
            else None
        )
        counts = {
            "questions": len(self.scope),
            "reviewed": len(reviews),
            "failed": len(failed),
            "reasked": reasked,
            "unparsable_after_reask": sum(
                1 for f in failed if f["reason"].startswith("unparsable")
            ),
        }
        partial = len(reviews) < len(self.qmap)
        metrics = {}
        if summary:
            for key in ("relative_mean_of_ratios", "relative_ratio_of_means"):
                metrics[f"judge/{key}"] = summary["overall"][key]
        return Report(
            counts,
            manifest={"overall": summary["overall"] if summary else None, "partial": partial},
            metrics=metrics,
            tags={"partial": str(partial).lower()},
            artifacts=[reviews_path],
        )
