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

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from biomedvital.data.jsonio import write_jsonl
from biomedvital.llm.config import ClientConfig
from biomedvital.llm.outcome import ChatRequest
from biomedvital.llm.sampling import SamplingArgs
from biomedvital.llm.stage import Answer, ChatStage, Report
from biomedvital.tracking.mlflow import DEFAULT_STORE

from .benchmarks import Benchmark, load_benchmark
from .figures import figure_ref, judge_request
from .score_vqa import join_predictions, read_predictions
from .winrate import CombineRule, win_rate

SAMPLING = SamplingArgs(temperature=0.0, max_tokens=512)
"""``pairwise``'s default sampling: the most likely verdict, room for its reason."""

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
line: the letter of the better assistant, A or B, in double square brackets. A tie is the last \
resort: give C in double square brackets only if, having compared both answers with the \
reference, you can find no difference at all in their quality."""


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
    sampling: SamplingArgs = SAMPLING,
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
        sampling: the judge's temperature, top_p, seed and max_tokens (part of the cache key);
            the seed also seeds the bootstrap.
        extra_body: extra request fields for the endpoint, sent as given and part of the cache
            key: e.g. llama.cpp's ``grammar`` or vLLM's ``guided_choice`` to constrain a small
            local model's reply to the format asked for.
        store: MLflow store folder (experiment ``evaluation``, run ``pairwise``).
        progress: show the progress bar.
        tags: extra MLflow run tags (a grid's ``grid``/``cell``).

    Returns the manifest; its ``win_rate`` is ``win_rate``'s result (model A's side).
    """
    client.require_online("pairwise")
    image_root = image_root if image_root is not None else image_cache
    if vision and image_root is None:
        raise ValueError("vision=True needs image_root (the folder of the benchmark's images)")
    stage = Pairwise(
        Path(questions),
        Path(answers_a),
        Path(answers_b),
        benchmark,
        split,
        image_cache,
        vision,
        image_root,
        limit,
        rule,
        n_boot,
        out=out,
        client=client,
        sampling=sampling,
        extra_body=extra_body,
        store=store,
        tags=tags,
        progress=progress,
    )
    return stage.run()


class Pairwise(ChatStage):
    """``pairwise`` on the chat-stage skeleton: two judge requests per question (both orders),
    none where the two answers are the same text (a tie by construction)."""

    name = "pairwise"
    experiment = "evaluation"

    def __init__(
        self,
        questions: Path,
        answers_a: Path,
        answers_b: Path,
        benchmark: Benchmark,
        split: str,
        image_cache: Path | None,
        vision: bool,
        image_root: Path | None,
        limit: int | None,
        rule: CombineRule,
        n_boot: int,
        **stage: Any,
    ) -> None:
        super().__init__(**stage)
        self.questions, self.answers_a, self.answers_b = questions, answers_a, answers_b
        self.benchmark, self.split, self.vision, self.image_root = (
            benchmark,
            split,
            vision,
            image_root,
        )
        self.limit, self.rule, self.n_boot = limit, rule, n_boot
        self.items = load_benchmark(benchmark, questions, split, image_cache)
        if not self.items:
            raise ValueError(f"{questions}: no {benchmark} questions in split {split!r}")
        what = f"{benchmark} {split}"
        self.pairs_a = join_predictions(self.items, read_predictions(answers_a), answers_a, what)
        self.pairs_b = join_predictions(self.items, read_predictions(answers_b), answers_b, what)
        n = len(self.items) if limit is None else min(limit, len(self.items))
        self.scope = range(n)
        self.calls = 0
        self.identical: list[dict[str, Any]] = []  # a tie by construction: no judge call

    def check(self) -> None:
        if self.vision:  # every image is checked before any request
            for i in self.scope:
                item = self.items[i]
                figure_ref(self.image_root, item.image, self.questions, item.question_id)

    def inputs(self) -> dict[str, Path | None]:
        return {
            "questions": self.questions,
            "answers_a": self.answers_a,
            "answers_b": self.answers_b,
        }

    def public(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "split": self.split,
            "questions": str(self.questions),
            "answers_a": str(self.answers_a),
            "answers_b": str(self.answers_b),
            "vision": self.vision,
            "image_root": str(self.image_root) if self.image_root else None,
            "limit": self.limit,
            "rule": self.rule,
            "n_boot": self.n_boot,
        }

    def requests(self) -> Iterator[tuple[ChatRequest, dict[str, Any]]]:
        """Both orders of every question whose two answers differ: ``ab`` shows model A's as
        Assistant A, ``ba`` model B's."""
        self.identical = []
        for i in self.scope:
            item, text_a, text_b = self.pairs_a[i][0], self.pairs_a[i][1], self.pairs_b[i][1]
            if text_a.strip() == text_b.strip():
                # both orders would be one prompt (one journal key, one verdict read twice), and
                # any verdict but a tie would be the judge's noise counted as position bias
                self.identical += [_tie(item, order) for order in ("ab", "ba")]
                continue
            url = (
                figure_ref(self.image_root, item.image, self.questions, item.question_id)
                if self.vision
                else None
            )
            for order, first, second in (("ab", text_a, text_b), ("ba", text_b, text_a)):
                msgs = pairwise_messages(item.question, item.answer, first, second, url)
                # category: the answer type (open / closed), for win rates per category
                meta = {
                    "question_id": item.question_id,
                    "order": order,
                    "category": item.answer_type,
                }
                yield ChatRequest(msgs, dict(self.params), meta=meta), {}

    def assemble(self, answers: Iterator[Answer]) -> Report:
        """``verdicts.jsonl`` (one record per call, identical answers as ties) and the win rate."""
        records = []
        for a in answers:
            rec: dict[str, Any] = {
                **a.plan["meta"],
                "verdict": (a.first.content or "") if a.first.ok else "",
            }
            if not a.first.ok:
                rec["error"] = a.first.error or "unknown"
            records.append(rec)
        calls = len(records)
        place = {self.items[i].question_id: i for i in self.scope}
        records = sorted(records + self.identical, key=lambda r: place[r["question_id"]])  # stable
        verdicts = self.out / "verdicts.jsonl"
        write_jsonl(verdicts, records)
        result = win_rate(
            verdicts,
            self.out / "win_rate.json",
            n_boot=self.n_boot,
            seed=self.sampling.seed,
            rule=self.rule,
        )
        counts = {
            "questions": len(self.scope),
            "calls": calls,
            "identical_answers": len(self.identical) // 2,
            "failed_calls": sum(1 for r in records if "error" in r),
        }
        partial = len(self.scope) < len(self.items) or result["n_failed"] > 0
        return Report(
            counts,
            manifest={"win_rate": result, "partial": partial},
            metrics=_win_rate_metrics(result),
            tags={"partial": str(partial).lower()},
            artifacts=[verdicts],
        )


def _tie(item: Any, order: str) -> dict[str, Any]:
    return {
        "question_id": item.question_id,
        "order": order,
        "category": item.answer_type,
        "verdict": "[[C]]",
        "identical": True,
    }


def _win_rate_metrics(result: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
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
    return metrics
