"""``win_rate``: pairwise-judge win rate of a model against a baseline, with position swap.

Verdict file layout (JSONL or a JSON array), one record per judge call::

    {"question_id": 17, "order": "ab", "verdict": "... Overall, [[A]]"}
    {"question_id": 17, "order": "ba", "verdict": "... so my verdict is [[B]]"}

``order`` says where the evaluated model sat: ``"ab"`` = the model was shown as Assistant A and the
baseline as B; ``"ba"`` = positions swapped (model as B). Every question needs exactly one record
of each order (the swap is always on, switch 7 of the reference method); a repeated
``(question_id, order)`` or a missing order is refused, since either would weight a question
twice or judge it in one position only. An optional ``category`` (``pairwise`` writes the
question's answer type, ``open`` or ``closed``) must be the same in both orders; with it, the
result also has ``by_category``: the counts, failures, rates and intervals of each category.
Other fields are ignored, except ``identical`` (below).

Parsing (:func:`parse_verdict`): the markers ``[[A]]``, ``[[B]]`` and ``[[C]]`` (tie; ``[[tie]]``
is accepted too), case-insensitive, spaces inside the brackets allowed, anywhere in the text. The
**last** marker wins: judges reason first and conclude last, and an echo of the instructions
("answer [[A]], [[B]] or [[C]]") comes before the verdict. Texts with several different markers
are counted in ``n_multi_marker`` so this choice stays visible. No marker → a parse failure.

Combining the two orders (:func:`combine`), per question, from the model's side (W/T/L):

* ``rule="sum"`` (default): each order is half a vote (W=+1, T=0, L=−1); positive sum → win,
  negative → loss, zero → tie. So W+W → win, W+T → win, W+L (position-biased split) → tie.
* ``rule="strict"``: a win or loss only when both orders agree; any disagreement → tie (FastChat's
  "inconsistent counts as a tie").

``rule`` picks the headline (the top-level counts and rates); the result always holds both:
``by_rule`` has the counts, rates and intervals under ``sum`` and under ``strict``. Each order is
also reported on its own, as if only it had been judged: ``single_order["ab"]`` and
``single_order["ba"]`` are win/tie/loss tallies of every question whose verdict in that order
parsed (``n_failed``: those whose did not), with both rates and their intervals.
``single_order["ab"]`` (the model shown as Assistant A) is the tally BioMed-VITAL's released
script makes, which judges one order with the evaluated model first.

A question with an unparseable verdict in either order is a counted failure (``n_failed``),
excluded from ``n``, never turned into a tie. Rates, in percent: ``win_rate_half_ties`` =
(wins + ½ ties) / n and ``win_rate_excl_ties`` = wins / (n − ties) (None when every pair is tied),
each with a seeded percentile-bootstrap interval over questions. ``by_order`` counts every parsed
call per position (including the parsed half of a failed pair) to expose position bias;
``position_consistency`` is the share of counted questions whose two orders agree.

Records with ``"identical": true`` in both orders (``pairwise`` writes them, without a judge
call, when the two models gave the same answer) count as ties in the rates (each order's
included), but not in
``by_order`` or ``position_consistency``: those describe the judge, which never saw them
(counted in ``n_identical``). The percentile bootstrap has zero width when every counted
question has the same outcome (e.g. all wins): report ``n`` beside such an interval.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import iter_objects, write_json
from biomedvital.data.outputs import locks_output
from biomedvital.data.report import BadRecordError

Label = Literal["A", "B", "C"]
Outcome = Literal["win", "tie", "loss"]
CombineRule = Literal["sum", "strict"]
ORDERS = ("ab", "ba")
RULES: tuple[CombineRule, ...] = ("sum", "strict")

_MARKER = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_VOTE = {"win": 1, "tie": 0, "loss": -1}


def find_markers(text: str) -> list[Label]:
    """Every verdict marker in ``text``, in order (``[[tie]]`` read as ``C``)."""
    out: list[Label] = []
    for m in _MARKER.finditer(text):
        tok = m.group(1).upper()
        out.append("C" if tok == "TIE" else tok)  # type: ignore[arg-type]
    return out


def parse_verdict(text: str) -> Label | None:
    """The judge's verdict: the last marker in the text; None when there is none."""
    markers = find_markers(text)
    return markers[-1] if markers else None


def model_outcome(label: Label, order: str) -> Outcome:
    """Translate a positional verdict into the evaluated model's outcome for that order."""
    if label == "C":
        return "tie"
    model_pos = "A" if order == "ab" else "B"
    return "win" if label == model_pos else "loss"


def combine(first: Outcome, second: Outcome, rule: CombineRule = "sum") -> Outcome:
    """One outcome from the model's outcomes in the two orders (see the module docstring)."""
    if rule == "strict":
        return first if first == second else "tie"
    if rule != "sum":
        raise ValueError(f"rule must be 'sum' or 'strict', got {rule!r}")
    total = _VOTE[first] + _VOTE[second]
    return "win" if total > 0 else "loss" if total < 0 else "tie"


def _rates(wins: np.ndarray, ties: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Both win rates (percent) for arrays of win/tie counts out of ``n``; NaN when undefined."""
    half = (wins + 0.5 * ties) / n * 100
    decided = n - ties
    with np.errstate(invalid="ignore", divide="ignore"):
        excl = np.where(decided > 0, wins / np.maximum(decided, 1) * 100, np.nan)
    return half, excl


def rates_with_ci(
    outcomes: Sequence[Outcome], n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> dict[str, Any]:
    """Counts, both win rates and their percentile-bootstrap intervals over the given outcomes.

    Resampling is over questions (a question's two orders stay together). A resample with only
    ties has no ``excl_ties`` rate; those are dropped from that interval and counted.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    n = len(outcomes)
    codes = np.array([_VOTE[o] for o in outcomes], dtype=np.int8)
    wins, ties = int((codes == 1).sum()), int((codes == 0).sum())
    res: dict[str, Any] = {
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "ci_level": ci,
        "n_boot": n_boot,
        "seed": seed,
    }
    if n == 0:
        res.update(
            win_rate_half_ties=None,
            win_rate_half_ties_ci=None,
            win_rate_excl_ties=None,
            win_rate_excl_ties_ci=None,
            n_boot_all_ties=None,
        )
        return res
    half, excl = _rates(np.array(wins), np.array(ties), n)
    # Resampling n questions with replacement only matters through the win/tie/loss counts, which
    # are then multinomial: drawing the counts directly is exact and O(n_boot) in memory.
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [wins / n, ties / n, (n - wins - ties) / n], size=n_boot)
    b_half, b_excl = _rates(counts[:, 0], counts[:, 1], n)
    lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
    defined = b_excl[~np.isnan(b_excl)]
    res.update(
        win_rate_half_ties=float(half),
        win_rate_half_ties_ci=[float(np.percentile(b_half, lo)), float(np.percentile(b_half, hi))],
        win_rate_excl_ties=None if np.isnan(excl) else float(excl),
        win_rate_excl_ties_ci=(
            [float(np.percentile(defined, lo)), float(np.percentile(defined, hi))]
            if defined.size
            else None
        ),
        n_boot_all_ties=int(n_boot - defined.size),
    )
    return res


def read_verdicts(path: Path) -> dict[str, dict[str, str]]:
    """``question_id -> {order: verdict text}``; refuses repeats, bad orders and half pairs."""
    return _read_verdicts(path)[0]


def _read_verdicts(
    path: Path,
) -> tuple[dict[str, dict[str, str]], set[str], dict[str, str]]:
    """The verdict pairs, the ids whose two records are both marked ``identical`` (ties
    ``pairwise`` writes without asking the judge, which must not count as the judge's own) and
    each question's optional ``category`` (the two orders must agree on it)."""
    pairs: dict[str, dict[str, str]] = {}
    flagged: dict[str, int] = {}
    categories: dict[str, str] = {}
    first_pos: dict[tuple[str, str], int] = {}
    for pos, kind, obj in iter_objects(path):
        if not isinstance(obj, dict):
            raise BadRecordError(
                path, pos, "expected a JSON object", kind=kind, category="not_an_object"
            )
        for key in ("question_id", "order", "verdict"):
            if key not in obj:
                raise BadRecordError(
                    path, pos, "missing", key, kind=kind, category=f"missing:{key}"
                )
        qid, order, verdict = obj["question_id"], obj["order"], obj["verdict"]
        if isinstance(qid, bool) or not isinstance(qid, int | str) or qid == "":
            raise BadRecordError(
                path,
                pos,
                f"expected an integer or string id (got {qid!r})",
                "question_id",
                kind=kind,
            )
        if order not in ORDERS:
            raise BadRecordError(
                path, pos, f"expected 'ab' or 'ba' (got {order!r})", "order", kind=kind
            )
        if not isinstance(verdict, str):
            raise BadRecordError(
                path, pos, f"expected a string (got {verdict!r})", "verdict", kind=kind
            )
        qid = str(qid)
        if (qid, order) in first_pos:
            raise BadRecordError(
                path,
                pos,
                f"duplicate verdict for question_id {qid!r} order {order!r} "
                f"(first at {kind} {first_pos[qid, order]})",
                "question_id",
                kind=kind,
                category="duplicate:question_id",
            )
        cat = obj.get("category")
        if cat is not None and (not isinstance(cat, str) or not cat):
            raise BadRecordError(
                path, pos, f"expected a non-empty string (got {cat!r})", "category", kind=kind
            )
        if qid in pairs and categories.get(qid) != cat:
            raise BadRecordError(
                path,
                pos,
                f"question_id {qid!r}: category {cat!r} differs from the other order's "
                f"{categories.get(qid)!r}",
                "category",
                kind=kind,
            )
        if cat is not None:
            categories[qid] = cat
        first_pos[qid, order] = pos
        pairs.setdefault(qid, {})[order] = verdict
        if obj.get("identical") is True:
            flagged[qid] = flagged.get(qid, 0) + 1
    half = [(q, next(iter(v))) for q, v in pairs.items() if len(v) != 2]
    if half:
        shown = ", ".join(f"{q!r} (only {o!r})" for q, o in half[:5])
        raise BadRecordError(
            path,
            None,
            f"{len(half)} question(s) lack one of the two orders: {shown}"
            + (", ..." if len(half) > 5 else ""),
            "order",
            category="unpaired:order",
        )
    return pairs, {q for q, n in flagged.items() if n == len(ORDERS)}, categories


def _breakdowns(
    both: list[tuple[Outcome, Outcome]],
    single: dict[str, list[Outcome]],
    by_order: dict[str, dict[str, int]],
    by_cat: dict[str, list[Outcome]],
    failed_cat: dict[str, int],
    categories: dict[str, str],
    boot: dict[str, Any],
) -> dict[str, Any]:
    """The rates by combining rule, by each order on its own and by category, each with its
    bootstrap interval (``boot``: ``n_boot``, ``seed``, ``ci``)."""
    result: dict[str, Any] = {}
    result["by_rule"] = {
        r: rates_with_ci([combine(a, b, r) for a, b in both], **boot) for r in RULES
    }
    result["single_order"] = {
        o: {
            "n_failed": by_order[o]["failed"],
            **rates_with_ci(single[o], **boot),
        }
        for o in ORDERS
    }
    if categories:
        result["by_category"] = {
            cat: {
                "n_failed": failed_cat.get(cat, 0),
                **rates_with_ci(by_cat.get(cat, []), **boot),
            }
            for cat in sorted(set(categories.values()))
        }
    return result


@locks_output("out", parent=True)
def win_rate(
    verdicts: Path,
    out: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    store: str | None = None,
    rule: CombineRule = "sum",
    ci: float = 0.95,
    tags: dict[str, str] | None = None,
) -> dict:
    """Win rate of the model over the baseline from position-swapped pairwise verdicts.

    Args:
        verdicts: JSONL/JSON array of ``{"question_id", "order": "ab"|"ba", "verdict"}``
            (``ab`` = the model shown as Assistant A); see the module docstring.
        out: also write the result here as JSON (atomically).
        n_boot: bootstrap resamples for the intervals.
        seed: bootstrap seed (same seed, same interval).
        store: MLflow store folder; when given, the result is logged as a run of ``evaluation``.
        rule: how the two orders combine: ``sum`` (half a vote each) or ``strict`` (agreement).
        ci: interval level (0.95 → 2.5th and 97.5th percentiles).
        tags: extra MLflow run tags (a grid's ``grid``/``cell``).

    Returns one dict with counts, failures, position consistency, both rates and their intervals.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be 'sum' or 'strict', got {rule!r}")
    verdicts = Path(verdicts)
    pairs, identical, categories = _read_verdicts(verdicts)
    if not pairs:
        raise BadRecordError(verdicts, None, "no verdicts", category="empty")
    outcomes: list[Outcome] = []
    by_cat: dict[str, list[Outcome]] = {}
    failed_cat: dict[str, int] = {}
    failed: list[str] = []
    n_multi = n_agree = n_judged = 0
    by_order = {o: {"win": 0, "tie": 0, "loss": 0, "failed": 0} for o in ORDERS}
    both: list[tuple[Outcome, Outcome]] = []  # each counted question's (ab, ba) outcomes
    single: dict[str, list[Outcome]] = {o: [] for o in ORDERS}  # each order on its own
    for qid, texts in pairs.items():
        cat = categories.get(qid)
        if qid in identical:
            outcomes.append("tie")  # the same answer twice: a tie the judge never gave
            both.append(("tie", "tie"))
            for order in ORDERS:
                single[order].append("tie")
            if cat is not None:
                by_cat.setdefault(cat, []).append("tie")
            continue
        per: dict[str, Outcome] = {}
        for order in ORDERS:
            markers = find_markers(texts[order])
            n_multi += len(set(markers)) > 1
            if not markers:
                by_order[order]["failed"] += 1
                continue
            per[order] = model_outcome(markers[-1], order)
            by_order[order][per[order]] += 1
            single[order].append(per[order])
        if len(per) < 2:
            failed.append(qid)
            if cat is not None:
                failed_cat[cat] = failed_cat.get(cat, 0) + 1
            continue
        n_judged += 1
        n_agree += per["ab"] == per["ba"]
        both.append((per["ab"], per["ba"]))
        outcomes.append(combine(per["ab"], per["ba"], rule))
        if cat is not None:
            by_cat.setdefault(cat, []).append(outcomes[-1])
    result: dict[str, Any] = {
        "rule": rule,
        "n_questions": len(pairs),
        "n_failed": len(failed),
        "failed_question_ids": failed,
        "n_identical": len(identical),
        "n_multi_marker": n_multi,
        "position_consistency": n_agree / n_judged * 100 if n_judged else None,
        "by_order": by_order,
    }
    result.update(rates_with_ci(outcomes, n_boot=n_boot, seed=seed, ci=ci))
    boot = {"n_boot": n_boot, "seed": seed, "ci": ci}
    result.update(_breakdowns(both, single, by_order, by_cat, failed_cat, categories, boot))
    result["verdicts"] = {"path": str(verdicts), "sha256": sha256_file(verdicts)}
    if out is not None:
        write_json(out, result)
    if store is not None:
        _log(result, store, tags)
    return result


def rate_metrics(part: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Counts, both rates and their interval ends of one tally (the headline, a ``by_rule`` or a
    ``single_order`` entry) as flat metrics, ``prefix`` before each name."""
    metrics: dict[str, float] = {}
    for key in ("n", "wins", "ties", "losses"):
        metrics[f"{prefix}{key}"] = part[key]
    for key in ("win_rate_half_ties", "win_rate_excl_ties"):
        if part.get(key) is not None:
            metrics[f"{prefix}{key}"] = part[key]
            if part.get(f"{key}_ci") is not None:
                low, high = part[f"{key}_ci"]
                metrics[f"{prefix}{key}_ci_low"], metrics[f"{prefix}{key}_ci_high"] = low, high
    return metrics


def _log(result: dict[str, Any], store: str, tags: dict[str, str] | None = None) -> None:
    from biomedvital.tracking.mlflow import PipelineRun

    with PipelineRun("evaluation", "win_rate", store, tags) as run:
        run.log_params(
            {
                "verdicts": result["verdicts"]["path"],
                "sha256": result["verdicts"]["sha256"],
                "rule": result["rule"],
                "n_boot": result["n_boot"],
                "seed": result["seed"],
            }
        )
        metrics = {
            k: result[k]
            for k in ("n_failed", "n_identical", "n_multi_marker")
            if result.get(k) is not None
        }
        metrics.update(rate_metrics(result))
        for name, part in (*result["by_rule"].items(), *result["single_order"].items()):
            metrics.update(rate_metrics(part, f"{name}/"))
        if result["position_consistency"] is not None:
            metrics["position_consistency"] = result["position_consistency"]
        run.log_metrics({f"win_rate/{k}": v for k, v in metrics.items()})
        run.log_dict(result, "win_rate.json")
