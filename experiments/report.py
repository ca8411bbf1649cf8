"""Report of an ablation grid from the MLflow store: a table (Markdown + CSV) and plots.

    python experiments/report.py --grid w [--store mlruns] [--out experiments/reports]
        [--allow_mixed true] [--publish true]

Collects, per cell, the latest finished run of each of its stages (runs tagged ``grid`` = NAME:
a selector fit, a select → tune → test chain, a win-rate…) and merges their metrics. Only the
cells the grid file lists now count (``--grid_file``, default ``conf/grids/NAME.yaml``): runs of
cells or seeds since removed from it are left out, and said so. Each cell shows the library hash
its runs were made with (their ``library_hash`` tag), the days they ran, and its status against
the checkout now (``current``, or stale and why, as ``grid --plan`` says; a cell kept with
``--reuse_stale`` is marked so). Runs made with different library hashes are refused unless
``--allow_mixed true``, and then the tables' header says so.

Writes ``<out>/<grid>/table.md`` and ``table.csv`` (one row per cell, the CSV with every metric
at full precision), with seeds also ``summary.md``/``summary.csv`` (mean, standard deviation
and count per cell over seeds, the held-out pair counts) and ``differences.csv`` (each two
cells' difference against its standard error over seeds), ``report.json`` (library hashes, git
commits, run dates, every row, and ``time``: the sum of the stages' run times and the span from
the first run's start to the last one's end; each row's ``run_s`` is its cell's) and the plots that the metrics allow:

- ``metrics.png``: the selector's held-out alignment rate, pair accuracy and AUROC per cell
  (the w curve);
- the table also carries a ``judge`` stage's open-chat relative scores (``judge/relative_*``);
- ``test.png``: benchmark metrics (``test/<benchmark>/<metric>``) per cell (the data-size
  curve);
- ``winrate.png``: win rates with their bootstrap intervals as bars.

``--publish true`` writes to ``<out>/published/<grid>/`` instead: the folder that is committed
and that figures in the docs cite (``experiments/quoted.py``); it is refused unless every cell
of the grid file has runs and is current. All are logged as artifacts of a ``report`` run in
the ``selection`` experiment, tagged with the grid and the runs it read.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from datetime import UTC, datetime
from pathlib import Path

from biomedvital.data.jsonio import write_json
from biomedvital.tracking.mlflow import PipelineRun, tracking_uri

SELECTOR = (
    "val/align_rate",
    "val/align_ties",
    "val/pair_acc",
    "val/auroc",
    "val/map",
    "val/mean_rank",
)
CHAT = ("judge/relative_mean_of_ratios", "judge/relative_ratio_of_means")  # LLaVA-Med-Bench
WIN = "win_rate_half_ties"
# beside a win rate, what it counts: a judge that keeps its verdict when the answers swap places
# (position consistency) is one whose win rate says something about the answers
TALLIES = ("position_consistency", "wins", "ties", "losses")
HELD_OUT = ("val_clinician", "val_model")  # a selector fit's held-out pair sets
COUNTS = tuple(f"pairs/{k}" for k in HELD_OUT)
# metrics whose differences between cells the summary weighs against the seeds' spread
COMPARED = ("val/align_rate", "val/pair_acc", "val/auroc", "val/mean_rank", *CHAT, WIN)
AXES = {"w": "clinician-pair weight w", "k": "top k % of the scored pool kept"}  # cell prefixes


def _wanted(metric: str) -> bool:
    """An MLflow metric the report keeps."""
    return (
        metric in SELECTOR + CHAT
        or metric.startswith(("test/", "win_rate/win", "pairwise/win"))
        or _column(metric) in TALLIES
    )


def _column(metric: str) -> str:
    """Its column: `pairwise` logs pairwise/win_rate_*, `win-rate` win_rate/win_rate_*, one
    column each."""
    return metric.removeprefix("pairwise/").removeprefix("win_rate/")


def _is_column(key: str) -> bool:
    return key in SELECTOR + CHAT + TALLIES or key.startswith(("test/", "win_rate"))


def collect(grid: str, store: str, page_size: int = 1000) -> list[dict]:
    """One row per cell: the metrics of the latest finished run of each of its stages."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(store))
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = []
    token = None
    while True:  # every page: one call returns at most 1,000 runs, and a grid can hold more
        page = client.search_runs(
            exps,
            filter_string=f"tags.grid = '{grid}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=page_size,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            break
    rows: dict[str, dict] = {}
    seen: set[tuple[str, str]] = set()
    for r in runs:
        tags = r.data.tags
        cell = tags.get("cell")
        if not cell or tags.get("report"):
            continue
        stage = tags.get("stage") or r.info.run_name or ""
        if (cell, stage) in seen:  # an older rerun of the same stage
            continue
        seen.add((cell, stage))
        metrics = {k: v for k, v in r.data.metrics.items() if _wanted(k)}
        row = rows.setdefault(
            cell,
            {"cell": cell, "base_cell": tags.get("base_cell", cell), "seed": tags.get("seed", "")},
        )
        row.setdefault("_runs", set()).add(r.info.run_id)  # the latest run of each stage
        row["run_s"] = round(row.get("run_s", 0.0) + _run_seconds(r), 1)
        end = r.info.end_time or r.info.start_time
        row["_start"] = min(row.get("_start", r.info.start_time), r.info.start_time)
        row["_end"] = max(row.get("_end", end), end)
        if metrics:
            row.update({_column(k): v for k, v in metrics.items()})
            row["run_ids"] = ",".join(filter(None, [row.get("run_ids", ""), r.info.run_id]))
            _add_provenance(row, r)
            if stage_is_fit(r):
                row.update(_held_out_pairs(client, r.info.run_id))
    return [r for r in rows.values() if "run_ids" in r]  # cells with a wanted metric


def _run_seconds(run) -> float:  # noqa: ANN001 - an MLflow Run
    """A stage's run time, start to end of its MLflow run (the process's start-up before the run
    opens is not in it)."""
    end = run.info.end_time or run.info.start_time
    return max(0, end - run.info.start_time) / 1000


def run_time(rows: list[dict]) -> dict:
    """What the grid's runs cost in time: the sum of its stages' run times (the compute a rerun
    pays, cell after cell) and the span from the first run's start to the last one's end (the
    wall time of a grid run in one go, start-ups and anything else running meanwhile included)."""
    starts = [r["_start"] for r in rows if "_start" in r]
    ends = [r["_end"] for r in rows if "_end" in r]
    total = sum(r.get("run_s", 0.0) for r in rows)
    return {
        "cells": len(rows),
        "run_s_total": round(total, 1),
        "run_s_per_cell": round(total / len(rows), 1) if rows else None,
        "span_s": round((max(ends) - min(starts)) / 1000, 1) if starts and ends else None,
    }


def stage_is_fit(run) -> bool:  # noqa: ANN001 - an MLflow Run
    return "val/align_rate" in run.data.metrics or "val/pair_acc" in run.data.metrics


def _add_provenance(row: dict, run) -> None:  # noqa: ANN001 - an MLflow Run
    """The library hash and times of a run the row aggregates (``unknown`` for runs made before
    runs carried the ``library_hash`` tag)."""
    row.setdefault("_libraries", set()).add(run.data.tags.get("library_hash", "unknown"))
    row.setdefault("_git", set()).add(
        (run.data.tags.get("git_sha", "unknown"), run.data.tags.get("git_dirty", "unknown"))
    )
    start = run.info.start_time
    end = run.info.end_time or start
    row["_start"] = min(row.get("_start", start), start)
    row["_end"] = max(row.get("_end", end), end)
    row["library"] = "+".join(sorted(row["_libraries"]))
    row["runs"] = _dates(row["_start"], row["_end"])


def _dates(start_ms: int, end_ms: int) -> str:
    """``2025-06-01`` or ``2025-06-01..2025-06-03``: the UTC days the runs span."""
    first, last = (
        datetime.fromtimestamp(t / 1000, UTC).strftime("%Y-%m-%d") for t in (start_ms, end_ms)
    )
    return first if first == last else f"{first}..{last}"


def _held_out_pairs(client, run_id: str) -> dict:  # noqa: ANN001 - an MlflowClient
    """The number of held-out pairs a selector fit measured on (``run.fit.json``'s pair
    counts): the figures' denominators."""
    import os
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "run.fit.json", tmp)
            pairs = json.loads(Path(path).read_text())["data"]["pairs"]
    except Exception:  # noqa: BLE001 - a run without the record (an older or foreign run)
        return {}
    return {f"pairs/{k}": int(pairs[k]) for k in HELD_OUT if isinstance(pairs.get(k), int)}


def current_cells(grid_file: Path | None) -> set[str] | None:
    """The cells (seeds expanded) the grid file lists now; ``None`` without a file."""
    if grid_file is None or not Path(grid_file).is_file():
        return None
    from biomedvital.grid import cell_names, load_grid

    return set(cell_names(load_grid(Path(grid_file))))


def keep_current(rows: list[dict], cells: set[str] | None) -> tuple[list[dict], list[str]]:
    """The rows of cells the grid lists now, and the names of the others (stale runs of cells
    or seeds removed from the grid file, which would otherwise enter the tables and means)."""
    if cells is None:
        return rows, []
    kept = [r for r in rows if r["cell"] in cells]
    return kept, sorted(r["cell"] for r in rows if r["cell"] not in cells)


def _seed_key(seed: object) -> tuple:
    """Seeds in numeric order (``2`` before ``10``); no seed first."""
    text = str(seed)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _order(cell: str) -> tuple:
    """Cells named like ``w400`` or ``k10`` sort by their number; others by name."""
    m = re.fullmatch(r"([A-Za-z_]*)(\d+(?:\.\d+)?)", cell)
    return (0, m.group(1), float(m.group(2))) if m else (1, cell, 0.0)


def metric_columns(rows: list[dict]) -> list[str]:
    present = {k for r in rows for k in r if _is_column(k)}
    ordered = [m for m in SELECTOR if m in present]
    return ordered + sorted(present - set(SELECTOR))


def summarise(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Mean, standard deviation and count over seeds, per base cell; with the seeds, the
    held-out pair counts (a range where seeds differ), library hashes and run dates."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["base_cell"], []).append(r)
    out = []
    for base, members in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        row: dict = {"cell": base, "n": len(members)}
        row["seeds"] = " ".join(str(m["seed"]) for m in members)
        for m in metrics:
            values = [x[m] for x in members if isinstance(x.get(m), float) and not math.isnan(x[m])]
            if values:
                row[m] = statistics.fmean(values)
                row[f"{m} sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for c in COUNTS:
            counts = sorted({x[c] for x in members if isinstance(x.get(c), int)})
            if counts:
                row[c] = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        libraries = set().union(*(m.get("_libraries", set()) for m in members))
        row["library"] = "+".join(sorted(libraries))
        starts = [m["_start"] for m in members if "_start" in m]
        if starts:
            row["runs"] = _dates(min(starts), max(m["_end"] for m in members if "_end" in m))
        out.append(row)
    return out


def differences(summary: list[dict], metrics: list[str]) -> list[dict]:
    """For every two cells and headline metric: the difference of their means over seeds, its
    standard error (``sqrt(sd_a^2/n_a + sd_b^2/n_b)``) and whether it exceeds two of them; with
    a handful of seeds, a difference inside that is not a finding."""
    out = []
    for metric in (m for m in metrics if m in COMPARED):
        have = [r for r in summary if metric in r and r["n"] > 1]
        for i, a in enumerate(have):
            for b in have[i + 1 :]:
                diff = b[metric] - a[metric]
                se = math.sqrt(a[f"{metric} sd"] ** 2 / a["n"] + b[f"{metric} sd"] ** 2 / b["n"])
                out.append({
                    "comparison": f"{b['cell']}/{a['cell']}/{metric}", "metric": metric,
                    "a": a["cell"], "b": b["cell"], "diff": diff, "se": se,
                    "exceeds_2se": "yes" if abs(diff) > 2 * se else "no",
                })  # fmt: skip
    return out


def _headline(col: str) -> bool:
    """Columns of the Markdown table: all but the secondary benchmark metrics (BLEU, counts…) and
    win rates without ties, which stay in the CSV."""
    metric = col.removesuffix(" sd")
    if metric.startswith("win_rate"):
        return metric.startswith(WIN)
    return not metric.startswith("test/") or metric.endswith(("/open_recall", "/closed_acc"))


def write_table(
    rows: list[dict], cols: list[str], out: Path, name: str = "table", header: str = ""
) -> None:
    """``<name>.csv`` (every column, full precision: what quoted figures are checked against)
    and ``<name>.md`` (headline columns, three decimals, under ``header``)."""
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    cols = [c for c in cols if _headline(c)]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [header, ""] if header else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def _axis(rows: list[dict]) -> tuple[list[int], list[str], str]:
    """Evenly spaced cells (w spans 0..1000: a log axis would crowd 200/300/400), labelled by
    their number when every cell has one."""
    numeric = all(_order(r["cell"])[0] == 0 for r in rows)
    labels = [f"{_order(r['cell'])[2]:g}" if numeric else r["cell"] for r in rows]
    return list(range(len(rows))), labels, _order(rows[0]["cell"])[1] if numeric else ""


def _curves(rows: list[dict], metrics: list[str], title: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    xs, labels, prefix = _axis(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=150)
    styles = ["o-", "s--", "^:", "D-.", "v-", "P--"]
    for metric, style in zip(metrics, styles * 4, strict=False):
        ys = [r.get(metric, math.nan) for r in rows]
        errs = [r.get(f"{metric} sd", 0.0) for r in rows]
        if all(isinstance(y, float) and math.isnan(y) for y in ys):
            continue
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, fmt=style, capsize=4,
                    label=metric, linewidth=2, markersize=7)  # fmt: skip
    ax.set_xticks(xs, labels, rotation=0 if prefix else 20)
    top = max((r.get(m, 0.0) for r in rows for m in metrics if isinstance(r.get(m), float)),
              default=1.0)  # fmt: skip
    percent = top > 1.02  # LLaVA-Med's VQA metrics are percentages
    ax.set_ylim(0, 100 if percent else 1.02)
    if percent:
        ylabel += " (%)"
    ax.set_xlabel(AXES.get(prefix, prefix) or "cell")
    ax.set_ylabel(ylabel)
    seeded = any(f"{m} sd" in r for r in rows for m in metrics)
    ax.set_title(title + (" (mean ± sd over seeds)" if seeded else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _win_bars(rows: list[dict], grid: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    xs, labels, prefix = _axis(rows)
    ys = [r.get(WIN, math.nan) for r in rows]
    lo = [y - r.get(f"{WIN}_ci_low", y) for y, r in zip(ys, rows, strict=True)]
    hi = [r.get(f"{WIN}_ci_high", y) - y for y, r in zip(ys, rows, strict=True)]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=150)
    ax.bar(xs, ys, yerr=[lo, hi], capsize=6, color="#4C72B0", edgecolor="black", alpha=0.85)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="parity (50 %)")
    for x, y in zip(xs, ys, strict=True):
        if not math.isnan(y):
            ax.text(x, 2, f"{y:.0f}%", ha="center", va="bottom", color="white", fontweight="bold")
    ax.set_xticks(xs, labels, rotation=0 if prefix else 20)
    ax.set_ylim(0, 100)
    ax.set_xlabel(AXES.get(prefix, prefix) or "cell")
    ax.set_ylabel("win rate over baseline, % (ties count half)")
    ax.set_title(f"Pairwise win rate with 95 % bootstrap intervals — {grid}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot(rows: list[dict], grid: str, out: Path) -> list[str]:
    """The plots the rows' metrics allow; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    selector = [
        m for m in ("val/align_rate", "val/pair_acc", "val/auroc") if any(m in r for r in rows)
    ]
    if selector:
        _curves(rows, selector, f"Selector ablation — {grid}", "held-out metric",
                out / "metrics.png")  # fmt: skip
        written.append("metrics.png")
    tests = sorted({k for r in rows for k in r if k.startswith("test/") and not k.endswith(" sd")})
    headline = [k for k in tests if k.endswith(("/open_recall", "/closed_acc"))]  # LLaVA-Med's
    tests = headline or tests
    if tests:
        _curves(rows, tests, f"Benchmarks of the tuned model — {grid}", "score",
                out / "test.png")  # fmt: skip
        written.append("test.png")
    if any(WIN in r for r in rows):
        _win_bars(rows, grid, out / "winrate.png")
        written.append("winrate.png")
    return written


def cell_status(rows: list[dict], grid_file: Path, grid_root: Path) -> None:
    """Each row's ``status``: ``current``, ``stale: ...`` (its code, a config or an input changed
    since it ran: ``grid --plan``'s reasons), ``stale (kept by --reuse_stale): ...``, or
    ``no cell folder`` (runs made elsewhere, e.g. a copied store). A current cell whose latest
    runs in the store are not the ones its ``stages.json`` records says so (a run outside the
    grid with the cell's tags)."""
    from biomedvital.grid import CELL_FILE, plan_cell
    from biomedvital.tracking.provenance import library_hash

    library = library_hash()
    for row in rows:
        folder = grid_root / grid_file.stem / row["cell"]
        if not folder.is_dir():
            row["status"] = "no cell folder"
            continue
        plan = plan_cell(grid_file, row["cell"], str(grid_root), library=library)
        try:
            reused = json.loads((folder / CELL_FILE).read_text()).get("reused_stale")
        except (OSError, ValueError, AttributeError):
            reused = None
        recorded = _recorded_runs(folder)
        if plan.state == "current" and recorded - row.get("_runs", set()):
            row["status"] = (
                "current, but the latest runs in the store are not the ones its stages.json "
                f"records ({', '.join(sorted(recorded))})"
            )
        elif plan.state == "current":
            row["status"] = "current"
        elif reused:
            row["status"] = f"stale (kept by --reuse_stale): {plan.why()}"
        else:
            row["status"] = f"{plan.state}: {plan.why()}"


def _recorded_runs(folder: Path) -> set[str]:
    """The MLflow runs a cell's stages.json records (stages whose done file names its run)."""
    from biomedvital.grid import STAGES_FILE

    try:
        stages = json.loads((folder / STAGES_FILE).read_text())["stages"]
        return {s["mlflow_run_id"] for s in stages.values() if s.get("mlflow_run_id")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def libraries(rows: list[dict]) -> dict[str, list[str]]:
    """Library hash -> the cells whose runs were made with it."""
    out: dict[str, list[str]] = {}
    for r in rows:
        for lib in sorted(r.get("_libraries", {"unknown"})):
            out.setdefault(lib, []).append(r["cell"])
    return out


def header(grid: str, rows: list[dict], libs: dict[str, list[str]]) -> str:
    """The lines above a table: grid, library hash(es), run dates, seeds; mixed libraries and
    stale cells said in bold."""
    start = min((r["_start"] for r in rows if "_start" in r), default=None)
    end = max((r["_end"] for r in rows if "_end" in r), default=None)
    seeds = sorted({str(r["seed"]) for r in rows if r["seed"] != ""}, key=_seed_key)
    parts = [f"Grid `{grid}`", f"{len(rows)} runs" if seeds else f"{len(rows)} cells"]
    if len(libs) == 1:
        parts.append(f"library `{next(iter(libs))}`")
    if start is not None:
        parts.append(f"runs {_dates(start, end)} (UTC)")
    if seeds:
        parts.append(f"seeds {', '.join(seeds)}")
    lines = [" · ".join(parts)]
    if len(libs) > 1:
        each = "; ".join(f"`{lib}`: {', '.join(cells)}" for lib, cells in libs.items())
        lines.append(f"**Mixed library hashes** (made with --allow_mixed true): {each}")
    stale = [r["cell"] for r in rows if r.get("status", "current") not in ("current",)]
    if stale:
        lines.append(
            f"**Not current** (see the status column; `grid --plan` says why): {', '.join(stale)}"
        )
    return "\n\n".join(lines)


def _write_differences(diffs: list[dict], out: Path) -> str:
    """differences.csv; returns the Markdown section for the summary."""
    cols = ["comparison", "metric", "a", "b", "diff", "se", "exceeds_2se"]
    with open(out / "differences.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(diffs)
    if not diffs:
        return ""
    shown = cols[1:]  # the comparison key is for citing the CSV
    lines = [
        "",
        "Differences between cells over seeds (diff = b - a, se its standard error; a difference "
        "within 2 se is within the spread of the seeds):",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    fmt = {"diff": "{:+.3f}", "se": "{:.3f}"}
    lines += ["| " + " | ".join(fmt.get(c, "{}").format(d[c]) for c in shown) + " |" for d in diffs]
    return "\n".join(lines) + "\n"


def _record(args: argparse.Namespace, grid_file: Path, rows: list[dict], shown: list[dict],
            libs: dict[str, list[str]], files: list[str]) -> dict:  # fmt: skip
    """report.json: what the report was made from (library hashes, git, dates, runs)."""
    from biomedvital.tracking.provenance import git_state, library_hash

    def plain(r: dict) -> dict:
        return {k: v for k, v in r.items() if not k.startswith("_")}

    start = min((r["_start"] for r in rows if "_start" in r), default=None)
    end = max((r["_end"] for r in rows if "_end" in r), default=None)
    iso = lambda t: datetime.fromtimestamp(t / 1000, UTC).isoformat(timespec="seconds")  # noqa: E731
    return {
        "grid": args.grid,
        "grid_file": str(grid_file) if grid_file.is_file() else None,
        "libraries": libs,
        "mixed": len(libs) > 1,
        "runs_git": sorted(
            {
                f"{sha}{' (dirty)' if d == 'true' else ''}"
                for r in rows
                for sha, d in r.get("_git", set())
            }
        ),  # fmt: skip
        "runs_from": iso(start) if start is not None else None,
        "runs_to": iso(end) if end is not None else None,
        "time": run_time(rows),
        "made": datetime.now(UTC).isoformat(timespec="seconds"),
        "made_at": {**git_state(), "library_hash": library_hash()},
        "files": files,
        "cells": [plain(r) for r in rows],
        "summary": [plain(r) for r in shown] if shown is not rows else None,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--grid", required=True)
    ap.add_argument("--store", default="mlruns")
    ap.add_argument("--out", default="experiments/reports")
    ap.add_argument(
        "--grid_file",
        default=None,
        help="the grid file whose cells count (default conf/grids/GRID.yaml when it exists)",
    )
    ap.add_argument(
        "--grid_root",
        default="outputs/grids",
        help="where the cells' folders are (grid --out_root)",
    )
    ap.add_argument(
        "--allow_mixed",
        type=_flag,
        default=False,
        help="summarise cells made with different library hashes (the tables say so)",
    )
    ap.add_argument(
        "--publish",
        type=_flag,
        default=False,
        help="write to OUT/published/GRID/ (committed, citable) instead of OUT/GRID/; refused "
        "unless every cell of the grid file has runs and is current",
    )
    args = ap.parse_args(argv)
    grid_file = Path(args.grid_file or f"conf/grids/{args.grid}.yaml")
    if args.grid_file and not grid_file.is_file():
        raise SystemExit(f"--grid_file {grid_file}: no such file")

    # runs of the cells the grid file lists now
    wanted = current_cells(grid_file)
    rows, gone = keep_current(collect(args.grid, args.store), wanted)
    if gone:
        print(f"left out {len(gone)} cell(s) no longer in {grid_file}: {', '.join(gone)}")
    rows.sort(key=lambda r: (_order(r["base_cell"]), _seed_key(r["seed"])))
    if not rows:
        raise SystemExit(
            f"no finished runs tagged grid={args.grid!r} in {args.store}: "
            f"run `make grid GRID={args.grid}`"
        )

    # which code made them, and are they current
    libs = libraries(rows)
    if len(libs) > 1 and not args.allow_mixed:
        each = "\n".join(f"  {lib}: {', '.join(cells)}" for lib, cells in libs.items())
        raise SystemExit(
            f"the runs of grid {args.grid!r} were made with {len(libs)} library hashes:\n{each}\n"
            f"rerun the stale cells (make plan GRID={args.grid}; make grid GRID={args.grid}), or "
            "pass --allow_mixed true (make report ALLOW_MIXED=true) to summarise them anyway"
        )
    if grid_file.is_file():
        cell_status(rows, grid_file, Path(args.grid_root))
    if args.publish:
        _check_publishable(rows, wanted)
    out = Path(args.out) / ("published" if args.publish else "") / args.grid
    out.mkdir(parents=True, exist_ok=True)

    # tables, plots, record
    top = header(args.grid, rows, libs)
    metrics = metric_columns(rows)
    seeded = any(r["seed"] != "" for r in rows)
    counts = [c for c in COUNTS if any(c in r for r in rows)]
    status = ["status"] if any("status" in r for r in rows) else []
    cols = ["cell", *(["seed"] if seeded else []), *metrics, *counts, "run_s", "library", "runs"]
    cols += status
    write_table(rows, [*cols, "run_ids"], out, header=top)
    files = ["table.md", "table.csv"]
    shown = rows
    if seeded:
        shown = summarise(rows, metrics)
        for r in shown:
            members = [x for x in rows if x["base_cell"] == r["cell"]]
            r["status"] = "; ".join(sorted({x.get("status", "") for x in members} - {""}))
        scols = ["cell", "n", *(c for m in metrics for c in (m, f"{m} sd")), *counts]
        write_table(shown, [*scols, "seeds", "library", "runs", *status], out, "summary", top)
        section = _write_differences(differences(shown, metrics), out)
        if section:
            with open(out / "summary.md", "a") as f:
                f.write(section)
        files += ["summary.md", "summary.csv", "differences.csv"]
    files += plot(shown, args.grid, out)
    files.append("report.json")
    write_json(out / "report.json", _record(args, grid_file, rows, shown, libs, files))
    with PipelineRun(
        "selection", f"report/{args.grid}", args.store, {"grid": args.grid, "report": "true"}
    ) as run:
        run.log_params({"runs": ",".join(r.get("run_ids", "") for r in rows)[:500]})
        for name in files:
            run.client.log_artifact(run.run_id, str(out / name))
    print((out / ("summary.md" if seeded else "table.md")).read_text())
    print(f"written to {out}/ ({', '.join(files)})")


def _check_publishable(rows: list[dict], wanted: set[str] | None) -> None:
    """A published report covers every cell of the grid file, each current."""
    missing = sorted((wanted or set()) - {r["cell"] for r in rows})
    if missing:
        raise SystemExit(f"--publish: no runs for cell(s) {', '.join(missing)}: run them first")
    bad = [f"  {r['cell']}: {r.get('status', 'status unknown')}" for r in rows
           if r.get("status") != "current"]  # fmt: skip
    if bad:
        raise SystemExit(
            "--publish: a published report is made of current cells only:\n" + "\n".join(bad)
        )


def _flag(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


if __name__ == "__main__":
    main()
