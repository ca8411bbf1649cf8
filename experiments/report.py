"""Report of an ablation grid from the MLflow store: a table (Markdown + CSV) and plots.

    python experiments/report.py --grid w [--store mlruns] [--out experiments/reports]

Collects the latest finished run of each cell (runs tagged ``grid`` = NAME), writes
``<out>/<grid>/table.md``, ``table.csv`` and ``metrics.png``, and logs them as artifacts of a
``report`` run in the ``selection`` experiment (tagged with the grid and the runs it read).
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

from biomedvital.tracking.mlflow import PipelineRun, tracking_uri

METRICS = ("val/align_rate", "val/align_ties", "val/pair_acc", "val/auroc", "val/map")


def collect(grid: str, store: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(store))
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exps,
        filter_string=f"tags.grid = '{grid}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    latest: dict[str, dict] = {}
    for r in runs:
        cell = r.data.tags.get("cell")
        if cell and cell not in latest and any(m in r.data.metrics for m in METRICS):
            latest[cell] = {"cell": cell, "run_id": r.info.run_id, **r.data.metrics}
    return list(latest.values())


def _order(cell: str) -> tuple:
    """Cells named like ``w400`` sort by their number; others by name."""
    m = re.fullmatch(r"([A-Za-z_]*)(\d+(?:\.\d+)?)", cell)
    return (0, m.group(1), float(m.group(2))) if m else (1, cell, 0.0)


def write_table(rows: list[dict], out: Path) -> None:
    cols = ["cell", *METRICS, "run_id"]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], grid: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # evenly spaced cells (w spans 0..1000: a log axis would crowd 200/300/400), labelled by value
    numeric = all(_order(r["cell"])[0] == 0 for r in rows)
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=150)
    for metric, style in (("val/align_rate", "o-"), ("val/pair_acc", "s--"), ("val/auroc", "^:")):
        ys = [r.get(metric) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(xs, ys, style, label=metric, linewidth=2, markersize=7)
    labels = [f"{_order(r['cell'])[2]:g}" if numeric else r["cell"] for r in rows]
    ax.set_xticks(xs, labels, rotation=0 if numeric else 20)
    prefix = _order(rows[0]["cell"])[1] if numeric else ""
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(prefix or f"grid '{grid}' cell")
    ax.set_ylabel("held-out metric")
    ax.set_title(f"Selector ablation — {grid}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "metrics.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--grid", required=True)
    ap.add_argument("--store", default="mlruns")
    ap.add_argument("--out", default="experiments/reports")
    args = ap.parse_args()
    rows = sorted(collect(args.grid, args.store), key=lambda r: _order(r["cell"]))
    if not rows:
        raise SystemExit(
            f"no finished runs tagged grid={args.grid!r} in {args.store}: run `make grid GRID={args.grid}`"
        )
    out = Path(args.out) / args.grid
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out)
    plot(rows, args.grid, out)
    with PipelineRun(
        "selection", f"report/{args.grid}", args.store, {"grid": args.grid, "report": "true"}
    ) as run:
        run.log_params({"runs": ",".join(r["run_id"] for r in rows)})
        for name in ("table.md", "table.csv", "metrics.png"):
            run.client.log_artifact(run.run_id, str(out / name))
    print((out / "table.md").read_text())
    print(f"written to {out}/ (table.md, table.csv, metrics.png)")


if __name__ == "__main__":
    main()
