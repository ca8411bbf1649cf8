"""Report of an ablation grid from the MLflow store: a table (Markdown + CSV) and plots.

    python experiments/report.py --grid w [--store mlruns] [--out experiments/reports]

Collects, per cell, the latest finished run of each of its stages (runs tagged ``grid`` = NAME:
a selector fit, a select → tune → test chain, a win-rate…) and merges their metrics. Only the
cells the grid file lists now count (``--grid_file``, default ``conf/grids/NAME.yaml``): runs of
cells or seeds since removed from it are left out, and said so. Writes
``<out>/<grid>/table.md`` and ``table.csv`` (one row per cell, the CSV with every metric; with
seeds, also
``summary.md``/``summary.csv``: mean, standard deviation and count per cell over seeds) and the
plots that the metrics allow:

- ``metrics.png``: the selector's held-out alignment rate, pair accuracy and AUROC per cell
  (the w curve);
- the table also carries a ``judge`` stage's open-chat relative scores (``judge/relative_*``);
- ``test.png``: benchmark metrics (``test/<benchmark>/<metric>``) per cell (the data-size
  curve);
- ``winrate.png``: win rates with their bootstrap intervals as bars.

All are logged as artifacts of a ``report`` run in the ``selection`` experiment, tagged with the
grid and the runs it read.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
from pathlib import Path

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
AXES = {"w": "clinician-pair weight w", "k": "top k % of the scored pool kept"}  # cell prefixes


def _wanted(metric: str) -> bool:
    """An MLflow metric the report keeps."""
    return metric in SELECTOR + CHAT or metric.startswith(("test/", "win_rate/win", "pairwise/win"))


def _column(metric: str) -> str:
    """Its column: `pairwise` logs pairwise/win_rate_*, `win-rate` win_rate/win_rate_*, one
    column each."""
    return metric.removeprefix("pairwise/").removeprefix("win_rate/")


def _is_column(key: str) -> bool:
    return key in SELECTOR + CHAT or key.startswith(("test/", "win_rate"))


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
        if metrics:
            row.update({_column(k): v for k, v in metrics.items()})
            row["run_ids"] = ",".join(filter(None, [row.get("run_ids", ""), r.info.run_id]))
    return [r for r in rows.values() if "run_ids" in r]  # cells with a wanted metric


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
    """Mean, standard deviation and count over seeds, per base cell."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["base_cell"], []).append(r)
    out = []
    for base, members in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        row: dict = {"cell": base, "n": len(members)}
        for m in metrics:
            values = [x[m] for x in members if isinstance(x.get(m), float) and not math.isnan(x[m])]
            if values:
                row[m] = statistics.fmean(values)
                row[f"{m} sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def _headline(col: str) -> bool:
    """Columns of the Markdown table: all but the secondary benchmark metrics (BLEU, counts…) and
    win rates without ties, which stay in the CSV."""
    metric = col.removesuffix(" sd")
    if metric.startswith("win_rate"):
        return metric.startswith(WIN)
    return not metric.startswith("test/") or metric.endswith(("/open_recall", "/closed_acc"))


def write_table(rows: list[dict], cols: list[str], out: Path, name: str = "table") -> None:
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    cols = [c for c in cols if _headline(c)]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
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
    args = ap.parse_args(argv)
    grid_file = Path(args.grid_file or f"conf/grids/{args.grid}.yaml")
    if args.grid_file and not grid_file.is_file():
        raise SystemExit(f"--grid_file {grid_file}: no such file")
    rows, stale = keep_current(collect(args.grid, args.store), current_cells(grid_file))
    if stale:
        print(f"left out {len(stale)} cell(s) no longer in {grid_file}: {', '.join(stale)}")
    rows.sort(key=lambda r: (_order(r["base_cell"]), _seed_key(r["seed"])))
    if not rows:
        raise SystemExit(
            f"no finished runs tagged grid={args.grid!r} in {args.store}: "
            f"run `make grid GRID={args.grid}`"
        )
    out = Path(args.out) / args.grid
    out.mkdir(parents=True, exist_ok=True)
    metrics = metric_columns(rows)
    seeded = any(r["seed"] != "" for r in rows)
    write_table(rows, ["cell", *(["seed"] if seeded else []), *metrics, "run_ids"], out)
    files = ["table.md", "table.csv"]
    shown = rows
    if seeded:
        shown = summarise(rows, metrics)
        cols = ["cell", "n", *(c for m in metrics for c in (m, f"{m} sd"))]
        write_table(shown, cols, out, "summary")
        files += ["summary.md", "summary.csv"]
    files += plot(shown, args.grid, out)
    with PipelineRun(
        "selection", f"report/{args.grid}", args.store, {"grid": args.grid, "report": "true"}
    ) as run:
        run.log_params({"runs": ",".join(r.get("run_ids", "") for r in rows)[:500]})
        for name in files:
            run.client.log_artifact(run.run_id, str(out / name))
    print((out / ("summary.md" if seeded else "table.md")).read_text())
    print(f"written to {out}/ ({', '.join(files)})")


if __name__ == "__main__":
    main()
