"""Cost of an ablation grid over w with the frozen, cached backbone, against one run.

One run = one frozen-backbone fit from a cold feature cache (what a single cell costs without
caching). The grid = six fits (w = 1, 10, 100, 200, 300, 400) in sequence from a cold cache: the
first cell fills the cache, the others read it. Goal: grid total <= 1.5x one run. Each of
``--repeats`` repeats starts from cold caches; the ratio is that of the best times, given with
the ratio repeat by repeat, and the same for CPU time (this process and its DataLoader workers),
which a shared machine's other jobs move far less than wall time.

    python bench/w_grid.py [--backbone open_clip:ViT-B-16] [--copies 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import lightning as L
from _common import (
    REPO,
    add_publish,
    cpu_seconds,
    model_name,
    replicate_pool,
    save,
    spread,
    timer,
)

from biomedvital.data.pool import DemoPool, FilePool
from biomedvital.selection import SelectorDataModule, SelectorModule
from biomedvital.selection.backbones import PREFIXES

GRID = (1.0, 10.0, 100.0, 200.0, 300.0, 400.0)


def fit_once(pool_dir: Path, cache: Path, w: float, backbone: str, epochs: int) -> dict:
    model = SelectorModule(
        backbone=backbone, backbone_mode="frozen", cache_dir=str(cache), w=w, head_lr=1e-3
    )
    pool = FilePool(
        *(
            str(pool_dir / f)
            for f in (
                "candidates.jsonl",
                "images",
                "figures.jsonl",
                "ratings.jsonl",
                "preferences.jsonl",
            )
        )
    )
    dm = SelectorDataModule(pool, model_pairs=1024, val_model_pairs=256, num_workers=2)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, dm)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def run_once(pool_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """One run from a cold cache, then the grid of six from another cold cache."""
    times: dict[str, float] = {}
    cpu = cpu_seconds()
    with timer(times, "one_run"):
        fit_once(pool_dir, work / "cache-one", 400.0, args.backbone, args.epochs)
    cpu_one, cpu = cpu_seconds() - cpu, cpu_seconds()
    cells = {}
    with timer(times, "grid"):
        for w in GRID:
            t: dict[str, float] = {}
            with timer(t, "cell"):
                metrics = fit_once(pool_dir, work / "cache-grid", w, args.backbone, args.epochs)
            cells[str(w)] = {
                "seconds": round(t["cell"], 2),
                "val/align_rate": metrics.get("val/align_rate"),
            }
    cpu_grid = cpu_seconds() - cpu
    print(
        f"one run {times['one_run']:.1f} s ({cpu_one:.1f} CPU s), grid of 6 {times['grid']:.1f} s"
        f" ({cpu_grid:.1f} CPU s)",
        flush=True,
    )
    return {
        "one_run_s": round(times["one_run"], 2),
        "grid_of_6_s": round(times["grid"], 2),
        "one_run_cpu_s": round(cpu_one, 2),
        "grid_of_6_cpu_s": round(cpu_grid, 2),
        "cell_seconds": [c["seconds"] for c in cells.values()],
        "cells": cells,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--backbone", default="open_clip:ViT-B-16", type=model_name(PREFIXES, "backbone")
    )
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3, help="each from cold caches")
    add_publish(ap)
    args = ap.parse_args()

    demo = DemoPool(str(REPO / "data" / "demo")).prepare()
    tmp = Path(tempfile.mkdtemp(prefix="bench-wgrid-"))
    pool_dir = replicate_pool(demo.candidates.parent, tmp / "pool", args.copies)
    repeats = [run_once(pool_dir, tmp / f"repeat-{r}", args) for r in range(args.repeats)]
    one, grid = min(r["one_run_s"] for r in repeats), min(r["grid_of_6_s"] for r in repeats)
    n_cand = sum(1 for _ in (pool_dir / "candidates.jsonl").open())
    result = {
        "backbone": args.backbone,
        "copies": args.copies,
        "candidates": n_cand,
        "images": len(list((pool_dir / "images").iterdir())),
        "epochs": args.epochs,
        "one_run_s": one,
        "grid_of_6_s": grid,
        "ratio": round(grid / one, 2),
        "ratio_by_repeat": spread([r["grid_of_6_s"] / r["one_run_s"] for r in repeats], 2),
        "one_run_s_by_repeat": spread([r["one_run_s"] for r in repeats], 2),
        "grid_of_6_s_by_repeat": spread([r["grid_of_6_s"] for r in repeats], 2),
        "one_run_cpu_s": min(r["one_run_cpu_s"] for r in repeats),
        "grid_of_6_cpu_s": min(r["grid_of_6_cpu_s"] for r in repeats),
        "cpu_ratio": round(
            min(r["grid_of_6_cpu_s"] for r in repeats) / min(r["one_run_cpu_s"] for r in repeats), 2
        ),
        "cpu_ratio_by_repeat": spread(
            [r["grid_of_6_cpu_s"] / r["one_run_cpu_s"] for r in repeats], 2
        ),
        # the cells after the first read the cache: each costs the head's training only
        "cached_cell_s": spread([c for r in repeats for c in r["cell_seconds"][1:]], 2),
        "repeats": repeats,
        "goal": "<= 1.5x",
    }
    print(json.dumps(result, indent=2))
    name = f"w_grid-{args.backbone.replace(':', '_')}-copies{args.copies}"
    print("results:", save(name, result, publish=args.publish))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
