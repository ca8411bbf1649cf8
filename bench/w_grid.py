"""Cost of an ablation grid over w with the frozen, cached backbone, against one run.

One run = one frozen-backbone fit from a cold feature cache (what a single cell costs without
caching). The grid = six fits (w = 1, 10, 100, 200, 300, 400) in sequence from a cold cache: the
first cell fills the cache, the others read it. Goal: grid total <= 1.5x one run.

    python bench/w_grid.py [--backbone open_clip:ViT-B-16] [--copies 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import lightning as L
from _common import REPO, model_name, replicate_pool, save, timer

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--backbone", default="open_clip:ViT-B-16", type=model_name(PREFIXES, "backbone")
    )
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()

    demo = DemoPool(str(REPO / "data" / "demo")).prepare()
    tmp = Path(tempfile.mkdtemp(prefix="bench-wgrid-"))
    pool_dir = replicate_pool(demo.candidates.parent, tmp / "pool", args.copies)
    times: dict[str, float] = {}

    with timer(times, "one_run"):
        fit_once(pool_dir, tmp / "cache-one", 400.0, args.backbone, args.epochs)
    cells = {}
    with timer(times, "grid"):
        for w in GRID:
            t: dict[str, float] = {}
            with timer(t, "cell"):
                metrics = fit_once(pool_dir, tmp / "cache-grid", w, args.backbone, args.epochs)
            cells[str(w)] = {
                "seconds": round(t["cell"], 2),
                "val/align_rate": metrics.get("val/align_rate"),
            }
    ratio = times["grid"] / times["one_run"]
    n_cand = sum(1 for _ in (pool_dir / "candidates.jsonl").open())
    result = {
        "backbone": args.backbone,
        "candidates": n_cand,
        "images": len(list((pool_dir / "images").iterdir())),
        "one_run_s": round(times["one_run"], 2),
        "grid_of_6_s": round(times["grid"], 2),
        "cells": cells,
        "ratio": round(ratio, 2),
        "goal": "<= 1.5x",
    }
    print(json.dumps(result, indent=2))
    save(f"w_grid-{args.backbone.replace(':', '_')}", result)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
