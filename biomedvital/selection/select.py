"""``select``: keep the best-scored candidates and write them as LLaVA training data."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from tqdm import tqdm

from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import (
    atomic_write,
    handle_bad,
    iter_files,
    iter_objects,
    parse_record,
    write_json,
)
from biomedvital.data.outputs import locks_output
from biomedvital.data.records import Candidate
from biomedvital.data.report import MAX_EXAMPLES, BadRecordError, RecordReport
from biomedvital.tracking.mlflow import DEFAULT_STORE, PipelineRun
from biomedvital.tracking.provenance import git_state


def _read_scores(path: Path, on_bad: str, report: RecordReport) -> dict[str, tuple[float, float]]:
    """``id -> (score, rank key)``; the key is the logit when given (no float32 saturation)."""
    scores: dict[str, tuple[float, float]] = {}
    for pos, kind, obj in iter_objects(path, on_bad=on_bad, report=report):
        try:
            if not isinstance(obj, dict) or "id" not in obj or "score" not in obj:
                raise BadRecordError(
                    path,
                    pos,
                    "expected {'id': ..., 'score': ...}",
                    kind=kind,
                    category="invalid_record",
                )
            cid, score = str(obj["id"]), obj["score"]
            if (
                not isinstance(score, (int, float))
                or isinstance(score, bool)
                or not math.isfinite(score)
            ):
                raise BadRecordError(
                    path,
                    pos,
                    f"score must be a finite number (got {score!r})",
                    "score",
                    kind=kind,
                    category="invalid:score",
                )
            if cid in scores:
                raise BadRecordError(
                    path, pos, f"duplicate id {cid!r}", "id", kind=kind, category="duplicate_id"
                )
        except BadRecordError as err:
            if on_bad == "raise":
                raise
            report.skip(err)
            continue
        logit = obj.get("logit")
        key = (
            float(logit)
            if isinstance(logit, (int, float)) and math.isfinite(logit)
            else float(score)
        )
        scores[cid] = (float(score), key)
        report.kept()
    return scores


def top_count(scored: int, top_percent: float) -> int:
    """How many of ``scored`` candidates the top ``top_percent`` % keeps, rounded up.

    Computed exactly on the decimal the user wrote: in floats ``100000 * 1.1 / 100`` is
    ``1100.0000000000002`` and its ceiling keeps one candidate too many.
    """
    share = Fraction(str(top_percent)) * scored / 100
    return math.ceil(share)


@dataclass(frozen=True)
class _Ranking:
    """Pass 1: each candidate's score in file order (NaN: invalid, repeated or unscored) and
    the scores whose id names no candidate."""

    scores: np.ndarray  # float64, one per candidate record
    keys: np.ndarray  # float64 rank keys (the logit when given)
    orphans: int
    orphan_examples: list[str]

    @property
    def scored(self) -> int:
        return int(np.isfinite(self.scores).sum())


@locks_output("out")
def select(
    scores: Path,
    candidates: Path | list[Path],
    out: Path,
    top_percent: float | None = 80.0,
    top_n: int | None = None,
    on_bad_record: Literal["raise", "skip"] = "raise",
    store: str = DEFAULT_STORE,
    upstream_run: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict:
    """Keep the top candidates by selector score and write ``selected.json`` (LLaVA layout).

    Args:
        scores: the ``predict`` output (JSONL of ``{"id", "score"}``).
        candidates: the scored pool (LLaVA layout, JSONL or JSON array), or a list of files
            read in turn (ids unique across them); streamed.
        out: output folder: ``selected.json`` and ``manifest.json``.
        top_percent: keep this share of the scored pool (paper: 10, 40, 80, 90 %).
        top_n: keep this many instead (overrides ``top_percent``).
        on_bad_record: ``raise`` or ``skip`` (counted in the manifest).
            Scores whose id names no candidate are counted (``orphan_scores``); when none of
            them names a candidate the files do not belong together, and select raises.
        store: MLflow store folder.
        upstream_run: MLflow run id of the scoring run (read from the scores' manifest when
            omitted).
        tags: extra MLflow run tags (a grid's ``grid``/``cell``).

    Ties at the threshold are broken by file order, so the count is exact and reproducible.
    """
    scores, out = Path(scores), Path(out)
    files = (
        [Path(candidates)] if isinstance(candidates, (str, Path)) else list(map(Path, candidates))
    )
    _check_share(top_percent, top_n)
    upstream_run = _upstream_run(scores, upstream_run)
    reports = {"scores": RecordReport(), "candidates": RecordReport()}
    score_of = _read_scores(scores, on_bad_record, reports["scores"])
    ranking = _rank(scores, score_of, files, on_bad_record, reports["candidates"])
    n_keep = top_n if top_n is not None else top_count(ranking.scored, top_percent)
    keep = _keep_mask(ranking, n_keep)
    out.mkdir(parents=True, exist_ok=True)
    with (
        atomic_write(out / "selected.json") as f,
        PipelineRun(
            "selection", "select", store, {**(tags or {}), "upstream_run": upstream_run}
        ) as run,
    ):
        written = _write_kept(f, files, keep, on_bad_record)
        manifest = {
            **_counts(ranking, keep, written, top_percent, top_n),
            "inputs": _inputs(scores, files),
            "records": {k: r.as_dict() for k, r in reports.items()},
            "upstream_run": upstream_run,
            "mlflow_run_id": run.run_id,
            "config": {
                "scores": str(scores),
                "candidates": str(files[0]) if len(files) == 1 else [str(f) for f in files],
                "out": str(out),
                "top_percent": top_percent,
                "top_n": top_n,
                "on_bad_record": on_bad_record,
            },
            "git": git_state(),
        }
        params = {"top_percent": top_percent, "top_n": top_n, "scores": scores}
        _log_run(run, manifest, {**params, "candidates": candidates})
    write_json(out / "manifest.json", manifest)
    return manifest


def _check_share(top_percent: float | None, top_n: int | None) -> None:
    """Refuse a share that keeps nothing sensible, before anything is read."""
    if top_n is None and top_percent is None:
        raise ValueError("give top_percent or top_n")
    if top_n is None and not 0 < float(top_percent) <= 100:
        raise ValueError(f"top_percent must be in (0, 100], got {top_percent}")
    if top_n is not None and top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")


def _upstream_run(scores: Path, upstream_run: str | None) -> str | None:
    """The scoring run: as given, else from the manifest beside the scores."""
    manifest_in = scores.with_name(scores.name + ".manifest.json")
    if upstream_run is None and manifest_in.is_file():
        upstream_run = json.loads(manifest_in.read_text()).get("mlflow_run_id")
    return upstream_run


def _rank(
    scores: Path,
    score_of: dict[str, tuple[float, float]],
    files: list[Path],
    on_bad_record: str,
    report: RecordReport,
) -> _Ranking:
    """Pass 1: the score of each candidate in file order (floats only: memory stays small).

    An invalid or repeated candidate is never kept (raised, or counted in skip mode), so that
    pass 2 writes only valid records, each id once.
    """
    order_scores, order_keys = [], []
    seen: set[str] = set()
    matched = 0  # scores whose id names a candidate; the rest are orphans, counted
    for path, pos, kind, obj in iter_files(files, on_bad_record, report):
        score, key = np.nan, np.nan
        try:
            cid = parse_record(obj, Candidate, path, pos, kind).id
            if cid in seen:
                raise BadRecordError(
                    path,
                    pos,
                    f"duplicate id {cid!r}",
                    "id",
                    kind=kind,
                    category="duplicate_id",
                )
            seen.add(cid)
        except BadRecordError as err:
            handle_bad(err, on_bad_record, report)
        else:
            report.kept()
            score, key = score_of.get(cid, (np.nan, np.nan))
            matched += cid in score_of
        order_scores.append(score)
        order_keys.append(key)
    orphans = len(score_of) - matched
    if score_of and not matched:
        named = ", ".join(map(str, files))
        raise ValueError(
            f"none of the {len(score_of)} ids in the scores file {scores} names a candidate of "
            f"{named} (e.g. {next(iter(score_of))!r}): were they scored from another pool?"
        )
    orphan_examples = [cid for cid in score_of if cid not in seen][:MAX_EXAMPLES] if orphans else []
    return _Ranking(
        np.asarray(order_scores, dtype=np.float64),
        np.asarray(order_keys, dtype=np.float64),
        orphans,
        orphan_examples,
    )


def _keep_mask(ranking: _Ranking, n_keep: int) -> np.ndarray:
    """The ``n_keep`` best-ranked scored candidates (at most all of them); ties by file order."""
    arr, keys = ranking.scores, ranking.keys
    n_keep = min(n_keep, ranking.scored)
    keep = np.zeros(len(arr), dtype=bool)
    if n_keep:
        ranked = np.lexsort((np.arange(len(arr)), -np.nan_to_num(keys, nan=-np.inf)))
        keep[ranked[:n_keep]] = True
    return keep


def _write_kept(f: IO[str], files: list[Path], keep: np.ndarray, on_bad_record: str) -> int:
    """Pass 2: stream the kept candidates out as one JSON array; how many were written."""
    written = 0
    f.write("[\n")
    items = iter_files(files, on_bad_record, RecordReport())
    for i, (path, pos, kind, obj) in enumerate(
        tqdm(items, total=len(keep), desc="select", unit="cand")
    ):
        if not keep[i]:
            continue
        cand = parse_record(obj, Candidate, path, pos, kind)
        f.write(
            ("," if written else "")
            + json.dumps(cand.model_dump(by_alias=True, exclude_none=True), ensure_ascii=False)
            + "\n"
        )
        written += 1
    f.write("]\n")
    return written


def _counts(
    ranking: _Ranking,
    keep: np.ndarray,
    written: int,
    top_percent: float | None,
    top_n: int | None,
) -> dict[str, Any]:
    """The manifest's counts: kept, dropped, unscored, orphan scores, threshold, histogram."""
    arr, scored = ranking.scores, ranking.scored
    hist, edges = np.histogram(arr[np.isfinite(arr)], bins=10, range=(0.0, 1.0))
    return {
        "kept": written,
        "dropped": scored - written,
        "unscored_candidates": int(len(arr) - scored),
        "orphan_scores": ranking.orphans,  # scores naming no candidate (e.g. the first few below)
        "orphan_score_examples": ranking.orphan_examples,
        "threshold": float(arr[keep].min()) if keep.any() else None,
        "top_percent": None if top_n is not None else top_percent,
        "top_n": top_n,
        "score_histogram": {
            f"{edges[i]:.1f}-{edges[i + 1]:.1f}": int(n) for i, n in enumerate(hist)
        },
    }


def _inputs(scores: Path, files: list[Path]) -> dict[str, Any]:
    """The input files with their hashes (one candidate file as an object, several as a list)."""
    cand_inputs = [{"path": str(f), "sha256": sha256_file(f)} for f in files]
    return {
        "scores": {"path": str(scores), "sha256": sha256_file(scores)},
        "candidates": cand_inputs[0] if len(cand_inputs) == 1 else cand_inputs,
    }


def _log_run(run: PipelineRun, manifest: dict[str, Any], params: dict[str, Any]) -> None:
    """The parameters, the counts as ``select/*`` metrics and the manifest, to MLflow."""
    run.log_params(params)
    run.log_metrics(
        {
            "select/kept": manifest["kept"],
            "select/dropped": manifest["dropped"],
            "select/unscored": manifest["unscored_candidates"],
            "select/orphan_scores": manifest["orphan_scores"],
        }
    )
    run.log_dict(manifest, "select.manifest.json")
