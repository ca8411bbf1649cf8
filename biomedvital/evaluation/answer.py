"""``answer``: a benchmark's questions asked to any OpenAI-compatible endpoint, scored as ``test``.

``python -m biomedvital answer --config conf/eval/vqa_rad.yaml --client.base_url URL
--client.model NAME`` reads the benchmark configs of ``test`` and asks a served model (a
checkpoint under ``vllm serve``, ``transformers serve``, an API model such as GPT-4o) instead of
running Hugging Face ``generate`` in the Trainer:

* the same questions: the config's ``data`` block (benchmark, file, image root, split, limit),
  overridden by the same flags (``--data.init_args.data``, ``--data.init_args.image_root``);
  the output folder is ``trainer.default_root_dir`` for both verbs;
* the same prompt: the system prompt and the question's text with its suffixes
  (:mod:`.prompting`), the system prompt read from the export's ``run.json`` when the served
  model is one of ours; the image goes as a data URL of the file (:mod:`biomedvital.llm.images`),
  and the served model preprocesses it itself: an export of the tuner pads or crops as it was
  trained (its ``processor_config.json``: ``do_pad``, which ``vllm serve`` and ``transformers
  serve`` follow), so the config's ``image_aspect_ratio`` is not applied; ``run.answer.json``
  records the export's value;
* the same decoding where the endpoint takes it: the config's ``model.init_args.decoding``
  (:class:`~.decoding.Decoding`): greedy as temperature 0, sampling with each question's own
  seed, ``max_new_tokens`` sent as ``max_tokens``;
* the same files and figures: ``predictions.jsonl`` (LLaVA-Med's ``question_id``, ``prompt``,
  ``text``, ``model_id``, and ``hit_max_new_tokens``: the reply's ``finish_reason`` was
  ``length``), ``scores.json`` from the same metrics in the same order, MLflow
  metrics ``test/<name>/<metric>`` tagged with the endpoint, the model and the export's upstream
  run.

Keys of the config an endpoint cannot honour (the trainer's, the model's weights and dtype) are
ignored with one notice. Requests go through the project's client (:mod:`biomedvital.llm`):
journaled in the output folder (a killed run resumes and pays for nothing twice), retried with
backoff, paced, batch mode for the Batch API's price. A question that gets no answer is counted
with its reason in ``failed.jsonl``, never scored as an empty answer, and the run is then
``partial``, as it is when questions are skipped for a missing image (``missing_image: skip``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from biomedvital.config_keys import ConfigError
from biomedvital.data.hashing import sha256_file
from biomedvital.data.images import ImageRoot, UnsafePathError
from biomedvital.data.jsonio import write_json, write_jsonl
from biomedvital.data.outputs import output_lock
from biomedvital.data.report import BadRecordError
from biomedvital.llm.config import ClientConfig, ClientConfigError
from biomedvital.llm.images import image_ref
from biomedvital.llm.keys import cost_of, estimate_tokens, request_key
from biomedvital.llm.outcome import ChatRequest, FillResult
from biomedvital.llm.redact import safe_url
from biomedvital.tracking.mlflow import DEFAULT_STORE
from biomedvital.tracking.provenance import git_state

from . import prompting
from .benchmarks import BENCHMARKS, VQAItem
from .decoding import Decoding
from .metrics import CLOSED_RULES, ClosedRule
from .vqa_scores import n_hit_max_new_tokens, score_answers

RECORD_FILE = "run.answer.json"
PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"
FAILED_FILE = "failed.jsonl"
JOURNAL_FILE = "journal.jsonl"
MissingImage = Literal["error", "skip"]

IGNORED_MODEL_KEYS = (
    "model",
    "checkpoint",
    "base_model",
    "dtype",
    "seed",
    "resume",
    "image_aspect_ratio",
)
"""``model.init_args`` keys about local weights and their preprocessing: the served model is
``client.model``, and it preprocesses the images it is sent."""
HONOURED_TRAINER_KEYS = ("default_root_dir", "logger")


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Prompting:
    """How ``test`` asks: the ``model.init_args`` prompt settings of a benchmark config."""

    system_prompt: str | None = None
    prompt_suffix: str = ""
    closed_prompt_suffix: str = ""
    closed_rule: ClosedRule = "llava_med"


@dataclass(frozen=True)
class Tracking:
    """Where the run is logged: the config's ``trainer.logger`` (an ``MLflowLogger``)."""

    experiment: str = "evaluation"
    run_name: str | None = None
    store: str = DEFAULT_STORE
    tags: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- phases


@dataclass
class Plan:
    """The questions asked (in the split's order) with their images, and those skipped."""

    asked: list[tuple[VQAItem, Path]]
    skipped: list[dict[str, str]]
    n_benchmark: int


def plan_questions(data: Any, missing_image: MissingImage) -> Plan:
    """The data module's questions with their image files; a missing or unsafe image is an
    error naming the question (``error``) or the question is skipped and counted (``skip``)."""
    if missing_image not in ("error", "skip"):
        raise ConfigError(f"missing_image must be 'error' or 'skip', got {missing_image!r}")
    items = data.load_items()
    root = ImageRoot(data.image_root)
    asked, skipped = [], []
    for item in items:
        try:
            asked.append((item, root.resolve(item.image)))
        except (UnsafePathError, FileNotFoundError) as err:
            if missing_image == "error":
                raise BadRecordError(
                    data.data,
                    None,
                    f"question_id {item.question_id!r}: {err} (missing_image: skip leaves it out)",
                    "image",
                    category="bad_image",
                ) from None
            skipped.append({"question_id": item.question_id, "reason": f"missing_image: {err}"})
    return Plan(asked, skipped, data.n_benchmark or len(items))


def served_export(client: ClientConfig, export: Path | None) -> Path | None:
    """The export folder of the served model when it is one of ours: ``export`` as given, the
    ``local-hf:`` folder, or ``client.model`` when it names a folder (``vllm serve DIR`` serves
    under its path); ``None`` for other models (an API model, a hub checkpoint)."""
    from biomedvital.llm.hf_server import is_local_hf, model_folder

    if export is not None:
        folder = Path(export)
        if not folder.is_dir():
            raise FileNotFoundError(f"export: no such folder {folder}")
        return folder
    if is_local_hf(client.base_url):
        return model_folder(client.base_url)
    named = Path(client.model).expanduser()
    return named if named.is_dir() and prompting.export_record(named) else None


def build_requests(
    plan: Plan, system: str, prompts: Prompting, decoding: Decoding, model: str
) -> list[ChatRequest]:
    """One chat request per question asked: system prompt, image (a reference inlined as a data
    URL when sent; its hash in the cache key), question text; the question's decoding fields as
    parameters."""
    refs: dict[Path, str] = {}  # an image shared by many questions is hashed once
    requests = []
    for item, path in plan.asked:
        if path not in refs:
            refs[path] = image_ref(path)
        text = prompting.question_text(
            item.question, item.answer_type, prompts.prompt_suffix, prompts.closed_prompt_suffix
        )
        messages = prompting.chat_messages(system, text, refs[path])
        meta = {"question_id": item.question_id, "prompt": text}
        req = ChatRequest(messages, decoding.request_params(item.question_id), meta=meta)
        req.key = request_key(model, messages, req.params)
        requests.append(req)
    return requests


def dry_run_report(requests: list[ChatRequest], plan: Plan, client: ClientConfig) -> dict:
    """Print the first request and the cost's upper bound (estimated input tokens, every answer
    at its length limit); send nothing, write nothing."""
    batch = client.mode == "batch"
    n_in = n_out = 0
    for req in requests:
        i, o = estimate_tokens(req.messages, int(req.params.get("max_tokens") or 0))
        n_in, n_out = n_in + i, n_out + o
    usage = {"prompt_tokens": n_in, "completion_tokens": n_out}
    estimate = {
        "requests": len(requests),
        "input_tokens": n_in,
        "max_output_tokens": n_out,
        "cost_usd_upper_bound": round(cost_of(usage, client.price_per_million, batch), 4),
    }
    if requests:
        print(_printable(requests[0].messages))
    print(
        f"\n{len(requests)} questions to {client.model} at {safe_url(client.base_url)} "
        f"({len(plan.skipped)} skipped), ~{n_in} input tokens, <= {n_out} output tokens, "
        f"estimated cost <= ${estimate['cost_usd_upper_bound']:.4f}"
        + (" (batch price)" if batch else "")
    )
    return {"dry_run": True, "estimate": estimate, "skipped": len(plan.skipped)}


def _printable(messages: list[dict[str, Any]]) -> str:
    lines = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "\n".join(
                p["text"] if p["type"] == "text" else f"[image {p['image_url']['url'][:90]}]"
                for p in content
            )
        lines.append(f"--- {m['role']} ---\n{content}")
    return "\n".join(lines)


@dataclass
class Answers:
    """What the endpoint's replies leave: the rows to write and score, and what failed."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    truth: list[list[str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def collect(
    plan: Plan, requests: list[ChatRequest], result: FillResult, journal: Any, client: ClientConfig
) -> Answers:
    """Each question's answer from the journal, in the split's order; a question without one is
    recorded with its reason (never given an empty answer). Answers are stripped, as ``test``
    strips its decoded text."""
    out = Answers()
    for (item, _), req in zip(plan.asked, requests, strict=True):
        res = result.outcome(req.key, journal, client.price_per_million)
        if not res.ok:
            out.failed.append({"question_id": item.question_id, "reason": res.error or "unknown"})
            out.counts["failed:" + (res.error or "unknown").split(":")[0]] += 1
            continue
        text = res.content if res.content is not None else (res.refusal or "")
        out.counts["refusals"] += res.content is None
        out.counts["truncated"] += res.finish_reason == "length"
        out.rows.append(
            {
                "question_id": item.question_id,
                "prompt": req.meta["prompt"],
                "text": text.strip(),
                "model_id": client.model,
                "hit_max_new_tokens": res.finish_reason == "length",
            }
        )
        out.truth.append([item.answer_type, item.answer])
    return out


# ----------------------------------------------------------------------------- the verb


def answer(
    data: Any,
    client: ClientConfig,
    out: Path,
    prompts: Prompting | None = None,
    decoding: Decoding | None = None,
    export: Path | None = None,
    missing_image: MissingImage = "error",
    dry_run: bool = False,
    batch_results: list[Path] | Path | None = None,
    tracking: Tracking | None = None,
    progress: bool = True,
    notice: list[str] | None = None,
) -> dict:
    """Ask a served model a benchmark's questions and score its answers as ``test`` does.

    Args:
        data: the benchmark split (a ``VQADataModule``: the ``data`` block of the config).
        client: the endpoint and how to call it (``--client.base_url``, ``--client.model``;
            ``local-hf:DIR`` serves an export with ``transformers serve`` for the run).
        out: the output folder (``trainer.default_root_dir``): ``predictions.jsonl``,
            ``scores.json``, ``failed.jsonl``, ``run.answer.json``, ``journal.jsonl``.
        prompts: the config's prompt settings (system prompt, suffixes, closed rule).
        decoding: the config's ``model.init_args.decoding`` (default: greedy, 64 tokens).
        export: the export folder of the served model (``run.json``: system prompt, upstream
            run) when the model name is not its path; found by itself for ``local-hf:`` and for
            a model served under its folder's path.
        missing_image: ``error`` (default: one error naming the question, nothing sent) or
            ``skip`` (the question is left out and counted; the run is ``partial``).
        dry_run: print the first request and the estimated cost; send and write nothing.
        batch_results: results file(s) of vLLM's offline batch runner (``client.mode: batch``
            with ``client.batch_runner: file``).
        tracking: the MLflow experiment, run name and store (``None``: not logged).
        progress: show the progress bar.
        notice: config keys ignored (recorded in ``run.answer.json``).
    """
    from biomedvital.llm.batch import BatchPending

    prompts, decoding, out = prompts or Prompting(), Decoding.of(decoding), Path(out)
    if isinstance(batch_results, str | Path):
        batch_results = [Path(batch_results)]
    if prompts.closed_rule not in CLOSED_RULES:
        raise ConfigError(f"closed_rule must be one of {CLOSED_RULES}, got {prompts.closed_rule!r}")
    _check_client(client, dry_run)
    plan = plan_questions(data, missing_image)
    folder = served_export(client, export)
    record = prompting.export_record(folder) if folder is not None else {}
    system = prompting.system_prompt(prompts.system_prompt, record.get("system_prompt"))
    requests = build_requests(plan, system, prompts, decoding, client.model)
    if dry_run:
        _notice(notice)
        return dry_run_report(requests, plan, client)
    _check_out(out)
    try:
        answers, result, torn = ask(client, plan, requests, out, progress, batch_results, notice)
    except BatchPending as exc:
        print(str(exc))
        return {"batch_pending": True, "message": str(exc), **exc.info}
    texts = [r["text"] for r in answers.rows]
    scores = score_answers(answers.truth, texts, data.batch_size, prompts.closed_rule)
    scores["n_hit_max_new_tokens"] = n_hit_max_new_tokens(answers.rows)
    context = {
        "system_prompt": system,
        "prompts": asdict(prompts),
        "decoding": decoding.public(),
        "export": {"folder": str(folder), "record": _lineage(record)} if folder else None,
        "ledger": result.ledger.as_dict(),
        "batch": result.batch,
        "torn_journal_lines": torn,
        "notice": notice or [],
    }
    with output_lock(out):
        return _write(out, data, client, plan, answers, scores, context, tracking)


def ask(
    client: ClientConfig,
    plan: Plan,
    requests: list[ChatRequest],
    out: Path,
    progress: bool,
    batch_results: list[Path] | None,
    notice: list[str] | None,
) -> tuple[Answers, FillResult, int]:
    """Send what the journal lacks and collect every question's answer: a ``local-hf:`` /
    ``local:`` server is started for this and stopped after; an endpoint that does not answer
    or does not list the model stops the run before the output folder is touched. Returns the
    answers, the pass's result and the torn journal lines dropped."""
    from biomedvital.llm.journal import Journal
    from biomedvital.llm.local_server import hosted_endpoint
    from biomedvital.llm.runner import fill_requests
    from biomedvital.llm.served import check_served

    endpoint = (
        contextlib.nullcontext(None)  # vLLM's offline runner: a request file, no server
        if _offline(client)
        else hosted_endpoint(
            client.base_url, client.api_key_env, client.model, client.local_threads
        )
    )
    with endpoint as served:
        if served is not None:
            check_served(served.base_url, served.api_key, client.model)
        _notice(notice)
        with output_lock(out), Journal(out / JOURNAL_FILE) as journal:
            result = fill_requests(
                client, journal, requests, "answer", progress, len(requests), batch_results
            )
            return collect(plan, requests, result, journal, client), result, journal.torn_lines


def _offline(client: ClientConfig) -> bool:
    return client.mode == "batch" and client.batch_runner == "file"


def _notice(ignored: list[str] | None) -> None:
    """One line on the config keys ignored, once the input is known to be good (so that an
    error stays the one line printed)."""
    if ignored:
        print(
            "answer: ignored (a served model cannot take them): " + ", ".join(ignored),
            file=sys.stderr,
        )


def _check_client(client: ClientConfig, dry_run: bool) -> None:
    """Refuse before anything starts: batch mode on a local server, an unset API key (a dry
    run needs none)."""
    from biomedvital.llm.config import read_api_key
    from biomedvital.llm.hf_server import is_local_hf
    from biomedvital.llm.local_server import is_local

    local = is_local_hf(client.base_url) or is_local(client.base_url)
    if client.mode == "batch" and local:
        raise ClientConfigError(
            "client.mode batch sends Batch API jobs to a remote endpoint; a local server "
            "answers online (client.mode online)"
        )
    if not (local or _offline(client) or dry_run):
        try:
            read_api_key(client.api_key_env)
        except RuntimeError as err:
            raise ClientConfigError(f"client.api_key_env: {err}") from None


def _check_out(out: Path) -> None:
    """Refuse to write over the results of a ``test`` run (they would be lost silently)."""
    if (out / "run.test.json").is_file():
        raise ConfigError(
            f"trainer.default_root_dir {out} holds the results of a `test` run (run.test.json); "
            "give answer its own folder: --trainer.default_root_dir DIR"
        )


def _lineage(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("mlflow_run_id", "model", "mode", "global_step", "git", "image_aspect_ratio")
    return {k: record.get(k) for k in keys}


def _write(
    out: Path,
    data: Any,
    client: ClientConfig,
    plan: Plan,
    answers: Answers,
    scores: dict[str, Any],
    context: dict[str, Any],
    tracking: Tracking | None,
) -> dict:
    """``predictions.jsonl``, ``failed.jsonl``, ``scores.json`` (``test``'s layout) and the run
    record, each written atomically; then the MLflow run."""
    preds = out / PREDICTIONS_FILE
    write_jsonl(preds, answers.rows)
    write_jsonl(out / FAILED_FILE, answers.failed + plan.skipped)
    described = data.describe()
    partial = len(answers.rows) < plan.n_benchmark
    result = {
        "name": data.name,
        "closed_rule": context["prompts"]["closed_rule"],
        "model": client.model,
        **scores,
        "answered": len(answers.rows),
        "partial": partial,
        "data": described,
        "predictions": {"path": str(preds), "sha256": sha256_file(preds)},
    }
    write_json(out / SCORES_FILE, result)
    counts = {
        "questions": len(plan.asked) + len(plan.skipped),
        "benchmark_questions": plan.n_benchmark,
        "asked": len(plan.asked),
        "answered": len(answers.rows),
        "failed": len(answers.failed),
        "skipped_missing_image": len(plan.skipped),
        "refusals": answers.counts["refusals"],
        "truncated": answers.counts["truncated"],
        "failed_by_reason": {
            k.removeprefix("failed:"): v
            for k, v in sorted(answers.counts.items())
            if k.startswith("failed:")
        },
    }
    record = {
        "stage": "answer",
        "endpoint": safe_url(client.base_url),
        "client": client.public(),
        "counts": counts,
        "partial": partial,
        **{k: context[k] for k in ("system_prompt", "prompts", "decoding", "export", "notice")},
        "ledger": context["ledger"],
        "batch": context["batch"],
        "torn_journal_lines": context["torn_journal_lines"],
        "data": described,
        "git": git_state(),
        "mlflow_run_id": None,
    }
    if tracking is not None:
        record["mlflow_run_id"] = _log(out, data.name, client, scores, record, tracking)
    write_json(out / RECORD_FILE, record)
    return {"scores": scores, **record}


def _log(
    out: Path,
    name: str,
    client: ClientConfig,
    scores: dict[str, Any],
    record: dict[str, Any],
    tracking: Tracking,
) -> str:
    """The MLflow run: ``test``'s metric names, the endpoint, model and upstream run as tags."""
    from biomedvital.tracking.mlflow import PipelineRun

    export = record["export"] or {}
    tags = {
        **tracking.tags,
        "verb": "answer",
        "endpoint": record["endpoint"],
        "model": client.model,
        "upstream_run": (export.get("record") or {}).get("mlflow_run_id"),
        "partial": str(record["partial"]).lower(),
    }
    run_name = tracking.run_name or name
    with PipelineRun(tracking.experiment, f"{run_name} (answer)", tracking.store, tags) as run:
        from mlflow.entities import Metric, Param

        params = {**client.public(), **record["decoding"], **record["prompts"], "benchmark": name}
        # as test logs them: every score but those of a kind the split does not have
        metrics = {f"test/{name}/{k}": float(v) for k, v in scores.items() if v is not None}
        counts = record["counts"]
        for key in ("answered", "failed", "skipped_missing_image", "refusals", "truncated"):
            metrics[f"answer/{name}/{key}"] = float(counts[key])
        metrics[f"answer/{name}/cost_usd"] = float(record["ledger"]["cost_usd"])
        metrics[f"answer/{name}/requests_sent"] = float(record["ledger"]["requests_sent"])
        now = int(time.time() * 1000)
        run.client.log_batch(  # one write, not one per key
            run.run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)[:500]) for k, v in params.items()],
        )
        record["mlflow_run_id"] = run.run_id
        run.log_dict(record, RECORD_FILE)
        for file in (PREDICTIONS_FILE, SCORES_FILE):
            run.client.log_artifact(run.run_id, str(out / file), f"eval/{name}")
        return run.run_id


# ----------------------------------------------------------------------------- command line


def build_parser() -> Any:
    """The verb's parser: a benchmark config of ``test`` (``model``, ``data``, ``trainer``
    blocks, parsed with the classes ``test`` uses) plus the client and the verb's own options."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning.pytorch import Trainer

    from .vqa_eval import VQADataModule, VQAEvaluator

    parser = ArgumentParser(
        prog="python -m biomedvital answer",
        description=__doc__.splitlines()[0],
        exit_on_error=False,
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a benchmark config")
    parser.add_argument(
        "--seed_everything",
        type=bool | int,
        default=0,
        help="test's seed (model.init_args.decoding.seed seeds the requests)",
    )
    parser.add_subclass_arguments(VQADataModule, "data", required=True, instantiate=False)
    parser.add_subclass_arguments(VQAEvaluator, "model", required=False, instantiate=False)
    parser.add_class_arguments(Trainer, "trainer", instantiate=False, fail_untyped=False)
    parser.add_function_arguments(
        answer,
        skip={"data", "out", "prompts", "decoding", "tracking", "notice"},
        fail_untyped=False,
    )
    return parser


def main(argv: list[str]) -> dict:
    """``python -m biomedvital answer ARGS``: parse a benchmark config and run :func:`answer`."""
    refuse_verb_decoding(argv)
    parser = build_parser()
    cfg = parser.parse_args(argv)
    data = _instantiate(cfg.data, "data")
    model_args = _model_args(cfg)
    notice = ignored_keys(cfg, parser.get_defaults(), model_args)
    trainer = cfg.trainer
    if not trainer.default_root_dir:
        raise ConfigError("answer: trainer.default_root_dir (the output folder) is not set")
    try:
        decoding = Decoding.of(model_args["decoding"])
    except ConfigError as err:
        raise ConfigError(f"answer: {err}") from None
    client = ClientConfig(**cfg.client.as_dict())
    prompts = Prompting(
        **{k: model_args[k] for k in Prompting.__dataclass_fields__ if k in model_args}
    )
    return answer(
        data=data,
        client=client,
        out=Path(trainer.default_root_dir),
        prompts=prompts,
        decoding=decoding,
        export=cfg.export,
        missing_image=cfg.missing_image,
        dry_run=cfg.dry_run,
        batch_results=cfg.batch_results,
        tracking=tracking_of(trainer.logger, data.name),
        progress=cfg.progress,
        notice=notice,
    )


def _instantiate(block: Any, key: str) -> Any:
    from jsonargparse import Namespace
    from jsonargparse._util import import_object

    init = block.init_args.as_dict() if isinstance(block.init_args, Namespace) else {}
    if key == "data" and init.get("benchmark") not in BENCHMARKS:
        raise ConfigError(
            f"answer: data.init_args.benchmark {init.get('benchmark')!r} is not a benchmark; "
            f"one of {', '.join(BENCHMARKS)}"
        )
    try:
        return import_object(block.class_path)(**init)
    except ValueError as err:
        raise ConfigError(f"answer: {key}.init_args: {err}") from None


def _model_args(cfg: Any) -> dict[str, Any]:
    """The model block's arguments with the evaluator's defaults filled in."""
    from .vqa_eval import VQAEvaluator

    defaults = {
        name: p.default
        for name, p in inspect.signature(VQAEvaluator.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    given = cfg.model.init_args.as_dict() if cfg.get("model") and cfg.model.init_args else {}
    return {**defaults, **given}


VERB_DECODING = {"max_tokens": "max_new_tokens"}
"""The verb's own ``decoding`` block, before the evaluator's: its keys' names there."""


def refuse_verb_decoding(argv: list[str]) -> None:
    """``answer --decoding.*`` (or a top-level ``decoding:`` in a config) was the verb's own
    block; it is the evaluator's now, shared with ``test``: one line naming the new key."""
    import yaml

    found: list[tuple[str, str]] = []
    for i, arg in enumerate(argv):
        flag = arg.removeprefix("--").split("=", 1)[0]
        if arg.startswith("--decoding.") or arg == "--decoding":
            found.append((flag.partition(".")[2], "the command line"))
        elif arg in ("--config", "-c") and i + 1 < len(argv) and Path(argv[i + 1]).is_file():
            doc = yaml.safe_load(Path(argv[i + 1]).read_text(encoding="utf-8"))
            block = doc.get("decoding") if isinstance(doc, dict) else None
            if block is not None:
                key = next(iter(block), "") if isinstance(block, dict) else ""
                found.append((str(key), argv[i + 1]))
    if found:
        key, where = found[0]
        old, new = "decoding", "model.init_args.decoding"
        if key:
            old, new = f"{old}.{key}", f"{new}.{VERB_DECODING.get(key, key)}"
        raise ConfigError(f"answer: {where}: {old} moved to {new}")


def ignored_keys(cfg: Any, defaults: Any, model_args: dict[str, Any]) -> list[str]:
    """The config keys set (to other than their defaults) that an endpoint cannot honour."""
    from .vqa_eval import VQAEvaluator

    sig = inspect.signature(VQAEvaluator.__init__).parameters
    out = [
        f"model.init_args.{k}"
        for k in IGNORED_MODEL_KEYS
        if k in model_args and model_args[k] != sig[k].default
    ]
    trainer, base = cfg.trainer.as_dict(), defaults.trainer.as_dict()
    out += [
        f"trainer.{k}"
        for k, v in trainer.items()
        if k not in HONOURED_TRAINER_KEYS and v != base.get(k)
    ]
    return out


def tracking_of(logger: Any, name: str) -> Tracking | None:
    """The MLflow run the config's ``trainer.logger`` describes (``false``: none)."""
    if logger is False:
        return None
    spec = logger.as_dict() if hasattr(logger, "as_dict") else logger
    if isinstance(spec, dict) and str(spec.get("class_path", "")).endswith("MLflowLogger"):
        init = spec.get("init_args") or {}
        return Tracking(
            experiment=init.get("experiment") or "evaluation",
            run_name=init.get("run_name") or name,
            store=init.get("store") or DEFAULT_STORE,
            tags={k: str(v) for k, v in (init.get("tags") or {}).items()},
        )
    return Tracking(run_name=name)
