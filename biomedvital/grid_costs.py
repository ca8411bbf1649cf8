"""What a grid cell would cost, before it runs: API tokens and dollars, GPU-hours.

Each stage is read from its resolved config (its config files and ``--key value`` arguments,
merged as YAML; nothing is imported or built) and the sizes of its inputs:

- **input sizes**: a file that exists is measured: its records and the mean characters of text
  a record brings (a conversation for training; a question with its caption, mentions and
  reference answer for a judge; an answer). A file an earlier stage of the cell writes is sized
  from that stage (``select`` keeps the top k % of its pool, at the pool's mean length; ``test``
  writes one answer a question, each at its ``max_new_tokens`` budget). Otherwise the grid
  file's ``estimates`` says what to assume (``{path: {records, text_chars}}``), and the plan says
  it assumed.
- **API** (``judge``): one request a question (``limit`` caps them); input tokens by the
  client's own estimate (:func:`~biomedvital.llm.keys.estimate_tokens`: characters /
  :data:`~biomedvital.llm.keys.CHARS_PER_TOKEN`, an image at
  :data:`~biomedvital.llm.keys.TOKENS_PER_IMAGE`) over the judge's fixed prompt text, the
  question's text and the answer; output tokens at ``sampling.max_tokens``, so dollars are an
  upper bound as far as output goes; re-asks are not counted. Dollars from
  ``client.price_per_million`` (the Batch API's factor in ``client.mode: batch``), printed with
  ``client.prices_as_of``. Other API verbs (``generate``, ``rate``, ``pairwise``) are not
  estimated here: their ``--dry_run true`` prints an estimate once their inputs exist.
- **GPU** (tuning, :class:`~biomedvital.tuning.LlavaTuner`): tokens to train = epochs × records
  × tokens a record (its text at ``CHARS_PER_TOKEN`` plus the measurement's image tokens, at most
  ``max_length``), at the tokens/s/GPU of the committed benchmark result
  (``bench/results/published/``) whose run has the tuner's model size, mode, per-GPU batch and
  memory options. The measurement used full 2048-token sequences on one GPU; padding and the
  scaling to several GPUs are not in it. Other GPU stages (evaluation, the selector) have no
  committed GPU measurement and say so.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from biomedvital.llm.hf_server import LOCAL_HF_PREFIX
from biomedvital.llm.keys import CHARS_PER_TOKEN, cost_of, estimate_tokens
from biomedvital.llm.local_server import LOCAL_PREFIX

THROUGHPUT = Path(__file__).resolve().parents[1] / "bench/results/published/tuner_mfu_h100.json"
"""The committed tuner throughput the GPU-hours are computed from (``grid --throughput``)."""

JUDGE_SOURCE = Path(__file__).resolve().parent / "evaluation" / "judge.py"
TUNER = "LlavaTuner"
EVALUATOR = "VQAEvaluator"


class CostError(ValueError):
    """An estimate that cannot be made; the plan prints why instead of a figure."""


# -- resolved configs -----------------------------------------------------------------------


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node: dict[str, Any] = {}
    leaf = node
    parts = dotted.split(".")
    for part in parts[:-1]:
        leaf[part] = {}
        leaf = leaf[part]
    leaf[parts[-1]] = value
    return _merge(config, node)


def resolve(argv: list[str]) -> dict[str, Any]:
    """A stage's config as its command gives it: the ``--config`` files merged in order, then
    each ``--key value`` (dotted keys nest; values read as YAML). Defaults the verb fills in are
    not there: an estimate that needs one says so."""
    config: dict[str, Any] = {}
    i = 1
    while i < len(argv):
        key = argv[i][2:] if argv[i].startswith("--") else None
        value = argv[i + 1] if i + 1 < len(argv) else None
        i += 2
        if key is None or value is None:
            continue
        if key == "config":
            loaded = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
            config = _merge(config, loaded if isinstance(loaded, dict) else {})
        else:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            config = _set(config, key, parsed)
    return config


def _get(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


# -- input sizes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSize:
    """How many records a stage reads and the mean characters of text each brings."""

    records: int
    text_chars: float
    source: str  # "measured", "assumed (grid file)", or the stage that writes it


def _mentions(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(m.get("tokens", "")) if isinstance(m, dict) else str(m) for m in value)
    return value if isinstance(value, str) else ""


def record_chars(record: Any, role: str) -> int:
    """Characters of text one record brings to a stage: ``conversation`` (every turn of a
    training record), ``judge`` (a chat question, its reference answer, caption and mentions),
    ``answer`` (a prediction's text) or ``count`` (none: only the records count)."""
    if not isinstance(record, dict):
        return 0
    if role == "conversation":
        turns = record.get("conversations") or []
        return sum(len(t.get("value", "")) for t in turns if isinstance(t, dict))
    if role == "judge":
        fields = (
            str(record.get("text", "")).replace("<image>", "").strip(),
            str(record.get("gpt4_answer", "")).strip(),
            str(record.get("fig_caption") or "").strip(),
            _mentions(record.get("in_text_mention")).strip(),
        )
        return sum(len(f) for f in fields)
    if role == "answer":
        return len(str(record.get("text", "")).strip())
    return 0


def measure(path: Path, role: str) -> InputSize:
    """Count a JSONL or JSON-array file's records and their mean text (unreadable records are
    left out of both). A file is read once per plan while its size and time stay the same."""
    st = Path(path).stat()
    return _measure(str(path), role, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _measure(path: str, role: str, size: int, mtime_ns: int) -> InputSize:
    from biomedvital.data.jsonio import iter_objects
    from biomedvital.data.report import RecordReport

    n = chars = 0
    for _, _, obj in iter_objects(path, on_bad="skip", report=RecordReport()):
        n += 1
        chars += record_chars(obj, role)
    return InputSize(n, chars / n if n else 0.0, "measured")


def size_of(
    paths: str | list[str] | None,
    role: str,
    written: dict[str, InputSize],
    stated: dict[str, dict[str, float]],
) -> InputSize:
    """The size of one input (or several files read in turn): measured when the file exists,
    else as the stage that writes it says, else as the grid file's ``estimates`` state."""
    files = [paths] if isinstance(paths, str) else list(paths or [])
    if not files:
        raise CostError("no input named")
    sizes = []
    for name in map(str, files):
        if Path(name).is_file():
            sizes.append(measure(Path(name), role))
        elif name in written:
            sizes.append(written[name])
        elif name in stated:
            s = stated[name]
            sizes.append(InputSize(int(s["records"]), float(s["text_chars"]), "assumed"))
        else:
            raise CostError(f"{name} missing (measured once it exists, or state it in estimates)")
    records = sum(s.records for s in sizes)
    chars = sum(s.records * s.text_chars for s in sizes) / records if records else 0.0
    return InputSize(records, chars, ", ".join(sorted({s.source for s in sizes})))


def check_stated(estimates: Any) -> dict[str, dict[str, float]]:
    """A grid file's ``estimates``: ``{path: {records: int > 0, text_chars: >= 0}}``."""
    if estimates is None:
        return {}
    if not isinstance(estimates, dict):
        raise ValueError("'estimates' maps input paths to {records, text_chars}")
    for name, s in estimates.items():
        ok = isinstance(s, dict) and set(s) == {"records", "text_chars"}
        ok = ok and isinstance(s["records"], int) and s["records"] > 0
        if not ok or not isinstance(s["text_chars"], int | float) or s["text_chars"] < 0:
            raise ValueError(
                f"estimates[{name!r}] must be {{records: int > 0, text_chars: >= 0}}, got {s!r}"
            )
    return estimates


# -- the committed throughput ---------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """A committed benchmark result of the tuner: the card, the day, the runs."""

    path: Path
    card: str
    date: str
    image_tokens: int
    runs: list[dict[str, Any]]


def load_throughput(path: Path) -> Throughput:
    """Read a ``bench/tuner_mfu.py`` result (``card``, ``date``, ``conditions.image_tokens``,
    ``runs``, a list or named, with ``tokens_per_s_per_gpu``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        runs = data["runs"].values() if isinstance(data["runs"], dict) else data["runs"]
        runs = [r for r in runs if float(r["tokens_per_s_per_gpu"]) > 0]
        return Throughput(
            Path(path), str(data["card"]), str(data["date"]),
            int(data["conditions"]["image_tokens"]), runs,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CostError(f"no GPU throughput in {path} ({type(err).__name__}: {err})") from None


def model_size(name: str) -> str | None:
    """``13b`` of ``hf-hub:llava-hf/llava-1.5-13b-hf`` (the parameter count a name states)."""
    m = re.search(r"(?<![\d.])(\d+)b(?![a-z0-9])", name.lower())
    return f"{m.group(1)}b" if m else None


def tuner_run_key(config: dict[str, Any]) -> dict[str, Any]:
    """What a measured run must share with the tuner's config to stand for it."""
    args = _get(config, "model.init_args", {}) or {}
    memory = args.get("memory") or {}
    return {
        "size": model_size(str(args.get("model", ""))),
        "mode": args.get("mode", "lora"),
        "batch_size": _get(config, "data.init_args.batch_size"),
        "gradient_checkpointing": bool(memory.get("gradient_checkpointing", False)),
        "checkpoint_every": int(memory.get("checkpoint_every", 1)),
        "lora_dropout_recompute": bool(memory.get("lora_dropout_recompute", False)),
        "compile": bool(memory.get("compile", False)),
    }


def matching_run(throughput: Throughput, key: dict[str, Any]) -> dict[str, Any]:
    for run in throughput.runs:
        if all(run.get(k) == v for k, v in key.items()):
            return run
    shown = " ".join(f"{k}={v}" for k, v in key.items())
    raise CostError(f"no run in {throughput.path.name} matches the tuner ({shown})")


# -- stage estimates ------------------------------------------------------------------------


@dataclass
class StageCost:
    """One stage's estimate: GPU-hours and API dollars where they can be told, and its line."""

    stage: str
    text: str = ""  # the plan's line; empty when the stage costs neither
    gpu_hours: float | None = None
    dollars: float | None = None
    tokens: tuple[int, int] | None = None  # API (input, output upper bound)
    train_tokens: float | None = None  # GPU: the tokens the tuner trains on
    unknown: list[str] = field(default_factory=list)  # what could not be estimated


def _fmt(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k"
    return f"{n:,.0f}"


def _gpus(trainer: dict[str, Any]) -> int | None:
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if isinstance(devices, list):
        devices = len(devices)
    return devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None


def _train_tokens(config: dict[str, Any], data: InputSize, image_tokens: int) -> tuple[float, str]:
    """Tokens the tuner trains on and how they were counted."""
    trainer = config.get("trainer") or {}
    epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    max_length = _get(config, "data.init_args.max_length")
    per_record = image_tokens + data.text_chars / CHARS_PER_TOKEN
    if isinstance(max_length, int):
        per_record = min(per_record, max_length)
    if not isinstance(epochs, int):
        raise CostError("trainer.max_epochs not set")
    tokens = epochs * data.records * per_record
    how = f"{epochs} epochs × {_fmt(data.records)} records × {per_record:.0f} tokens"
    gpus, batch = _gpus(trainer), _get(config, "data.init_args.batch_size")
    if isinstance(max_steps, int) and max_steps > 0 and gpus and isinstance(batch, int):
        per_step = batch * gpus * int(trainer.get("accumulate_grad_batches", 1)) * per_record
        if max_steps * per_step < tokens:
            tokens, how = max_steps * per_step, f"{max_steps} steps × {per_step:.0f} tokens"
    return tokens, how


def tune_cost(
    name: str, config: dict[str, Any], data: InputSize, throughput: Throughput
) -> StageCost:
    """GPU-hours of a tuner fit from the committed tokens/s/GPU of the matching run."""
    run = matching_run(throughput, tuner_run_key(config))
    tokens, how = _train_tokens(config, data, throughput.image_tokens)
    rate = float(run["tokens_per_s_per_gpu"])
    hours = tokens / rate / 3600
    gpus = _gpus(config.get("trainer") or {})
    wall = f"; ≈ {hours / gpus:.1f} h on {gpus} GPUs" if gpus and gpus > 1 else ""
    text = (
        f"GPU ≈ {hours:.1f} GPU-hours: {_fmt(tokens)} tokens ({how}; records: {data.source}) "
        f"at {rate:,.0f} tokens/s/GPU ({throughput.card}, {throughput.date}, "
        f"{throughput.path.name}){wall}"
    )
    return StageCost(name, text, gpu_hours=hours, train_tokens=tokens)


def judge_prompt_chars(vision: bool, source: Path = JUDGE_SOURCE) -> int:
    """Characters of ``judge``'s fixed prompt text: its system prompt, the labels around each
    field and the task. Read from the verb's source: importing it would load torch on every
    plan; ``tests/test_grid_costs.py`` checks the count against the prompt it builds."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    named = {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
        if isinstance(t, ast.Name) and isinstance(n.value.value, str)
    }
    fn = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "judge_messages"),
        None,
    )
    system = named.get("JUDGE_SYSTEM_VISION" if vision else "JUDGE_SYSTEM")
    if fn is None or system is None:
        raise CostError(f"the judge's prompt is not where it was in {source}")
    chars = len(system)
    for node in ast.walk(fn):
        for part in node.values if isinstance(node, ast.JoinedStr) else []:
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                chars += len(part.value)
            elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name):
                chars += len(named.get(part.value.id, ""))
    return chars


def judge_cost(
    name: str, config: dict[str, Any], questions: InputSize, answers: InputSize
) -> StageCost:
    """Tokens and dollars of ``judge``: one request a question, output at its budget."""
    client = config.get("client") or {}
    max_tokens = _get(config, "sampling.max_tokens")
    if not isinstance(max_tokens, int):
        raise CostError("sampling.max_tokens not set: output has no bound")
    limit = config.get("limit")
    requests = min(questions.records, limit) if isinstance(limit, int) else questions.records
    vision = bool(config.get("vision", False))
    body = judge_prompt_chars(vision) + questions.text_chars + answers.text_chars
    user: Any = "x" * round(body)
    if vision:
        user = [{"type": "text", "text": user}, {"type": "image_url", "image_url": {"url": ""}}]
    per_in, per_out = estimate_tokens([{"role": "system", "content": ""}, {"role": "user",
                                        "content": user}], max_tokens)  # fmt: skip
    tokens = (requests * per_in, requests * per_out)
    usage = {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]}
    prices = client.get("price_per_million")
    batch = client.get("mode") == "batch"
    dollars = cost_of(usage, prices, batch) if prices else None
    as_of = client.get("prices_as_of")
    money = (
        f" → ${dollars:,.2f} at {client.get('model')} prices"
        f"{f' as of {as_of}' if as_of else ' (undated)'}{' (batch)' if batch else ''}"
        ", output at its bound"
        if dollars is not None
        else " (no client.price_per_million: dollars not estimated)"
    )
    text = (
        f"API {client.get('model')}: {requests:,} requests, ≈ {_fmt(tokens[0])} input tokens "
        f"(questions: {questions.source}; answers: {answers.source}), ≤ {_fmt(tokens[1])} output "
        f"tokens (max_tokens){money}"
    )
    return StageCost(name, text, dollars=dollars, tokens=tokens)


def _class(config: dict[str, Any]) -> str:
    return str(_get(config, "model.class_path", "")).rpartition(".")[2]


def _key(path: Any) -> str:
    return str(Path(str(path)))


def _select_writes(config: dict[str, Any], written: dict[str, InputSize], stated: dict) -> None:
    """What ``select`` writes: the top k % (or top n) of its pool, at the pool's mean length."""
    import inspect

    from biomedvital.selection.select import select, top_count

    pool = size_of(config.get("candidates"), "conversation", written, stated)
    top_n = config.get("top_percent") is None and config.get("top_n")
    default = inspect.signature(select).parameters["top_percent"].default
    k = config.get("top_percent", default)
    kept = int(top_n) if top_n else top_count(pool.records, k)
    how = f"top {top_n} of the pool" if top_n else f"top {k} % of the pool"
    out = Path(str(config.get("out"))) / "selected.json"
    written[_key(out)] = InputSize(kept, pool.text_chars, f"{how} ({pool.source})")


def _test_writes(
    name: str, config: dict[str, Any], written: dict[str, InputSize], stated: dict
) -> None:
    """What an evaluator's ``test`` writes: one answer a question, each at its budget."""
    args = _get(config, "model.init_args", {}) or {}
    budget = args.get("max_new_tokens", _get(config, "model.init_args.decoding.max_new_tokens"))
    root = _get(config, "trainer.default_root_dir")
    if not isinstance(budget, int) or root is None:
        return
    questions = size_of(_get(config, "data.init_args.data"), "count", written, stated)
    at_budget = f"{name}'s answers at max_new_tokens {budget}"
    size = InputSize(questions.records, budget * CHARS_PER_TOKEN, at_budget)
    written[_key(Path(str(root)) / "predictions.jsonl")] = size


def stage_cost(
    name: str,
    argv: list[str],
    written: dict[str, InputSize],
    stated: dict[str, dict[str, float]],
    throughput: Path | None,
) -> StageCost:
    """One stage's estimate; what it writes is added to ``written`` for the stages after it."""
    verb, config = argv[0], resolve(argv)
    model, kind = _class(config), "GPU"
    on_gpu = _get(config, "trainer.accelerator", "auto") != "cpu"
    local = str(_get(config, "client.base_url", "")).startswith((LOCAL_PREFIX, LOCAL_HF_PREFIX))
    try:
        if verb == "select":
            _select_writes(config, written, stated)
        elif verb == "test" and model == EVALUATOR:
            _test_writes(name, config, written, stated)
    except CostError:
        pass  # a stage that reads what it would write says what is missing
    try:
        if verb == "fit" and model == TUNER and on_gpu:
            data = size_of(_get(config, "data.init_args.data"), "conversation", written, stated)
            if throughput is None:
                raise CostError("no throughput file given")
            return tune_cost(name, config, data, load_throughput(throughput))
        if local:  # a server this machine starts for the stage: no API bill
            return StageCost(name)
        if verb == "judge":
            kind = "API"
            questions = size_of(config.get("questions"), "judge", written, stated)
            answers = size_of(config.get("answers"), "answer", written, stated)
            return judge_cost(name, config, questions, answers)
        if verb in ("generate", "rate", "pairwise", "answer"):
            kind = "API"
            raise CostError(f"not estimated here: {verb} --dry_run true prints it")
        if "trainer" in config and on_gpu:
            raise CostError(f"no committed GPU measurement of {verb} ({model or 'this model'})")
    except (CostError, OSError) as err:
        return StageCost(name, f"{kind}: not estimated: {err}", unknown=[str(err)])
    return StageCost(name)


def cell_costs(
    commands: list[dict[str, Any]],
    stated: dict[str, dict[str, float]],
    throughput: Path | None = THROUGHPUT,
) -> list[StageCost]:
    """Each stage's estimate, in order (``commands``: :func:`biomedvital.grid.stage_commands`)."""
    written: dict[str, InputSize] = {}
    stated = {_key(k): v for k, v in stated.items()}
    return [stage_cost(c["stage"], c["argv"], written, stated, throughput) for c in commands]


def total(costs: list[StageCost]) -> str:
    """``GPU ≈ … GPU-hours; API $…`` over the stages given, naming what was not estimated;
    empty when nothing costs."""
    parts = []
    hours = [c.gpu_hours for c in costs if c.gpu_hours is not None]
    dollars = [c.dollars for c in costs if c.dollars is not None]
    if hours:
        parts.append(f"GPU ≈ {sum(hours):.1f} GPU-hours")
    if dollars:
        parts.append(f"API ${sum(dollars):,.2f} (output at its bound)")
    unknown = [c.stage for c in costs if c.unknown]
    if unknown:
        more = f" ({len(unknown)} stages)" if len(set(unknown)) < len(unknown) else ""
        parts.append(f"not estimated: {', '.join(dict.fromkeys(unknown))}{more}")
    return "; ".join(parts)
