"""Scoring throughput: the suite's predict path against the released code's recipe.

Reference recipe (as released): images opened inside the forward loop, no DataLoader workers,
the model left in train mode (dropout on), every candidate re-encodes its image. Suite: eval +
inference mode, DataLoader workers, each image decoded and encoded once per chunk and reused
for all its candidates. Same model weights, same candidates; printed as a ratio, the best time
of each over ``--repeats`` interleaved repeats (other load on a shared machine only slows a run
down), with the ratio repeat by repeat.

    python bench/scoring_throughput.py [--backbone open_clip:ViT-B-16] [--copies 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from _common import REPO, add_publish, model_name, replicate_pool, save, spread, timer

from biomedvital.data.images import ImageRoot
from biomedvital.data.pool import DemoPool, FilePool
from biomedvital.data.records import Candidate, read_figures
from biomedvital.selection import ScoreWriter, SelectorDataModule, SelectorModule
from biomedvital.selection.backbones import PREFIXES
from biomedvital.selection.text import candidate_text


def reference_scores(model: SelectorModule, files, batch_size: int) -> dict[str, float]:
    """The released scoring loop, re-expressed: decode inside the loop, train mode, no reuse."""
    bb = model._backbone
    root = ImageRoot(files.image_root)
    caps = {f.pair_id: (f.fig_caption, f.mentions_text()) for f in read_figures(files.figures)}
    cands = [
        Candidate.model_validate_json(x)
        for x in files.candidates.read_text().splitlines()
        if x.strip()
    ]
    model.train()  # the released code never calls .eval(): dropout stays on
    out = {}
    with torch.no_grad():
        for i in range(0, len(cands), batch_size):
            chunk = cands[i : i + batch_size]
            pixels = torch.stack([bb.preprocess(root.load(c.image)) for c in chunk])
            texts = [candidate_text("paper", *caps[c.pair_id], c.qa_pairs()) for c in chunk]
            img = F.normalize(bb.model.encode_image(pixels), dim=-1)
            txt = F.normalize(bb.model.encode_text(bb.tokenizer(texts)), dim=-1)
            s = torch.sigmoid(model.head(torch.cat([txt, img], dim=-1)).squeeze(-1))
            out.update({c.id: float(v) for c, v in zip(chunk, s, strict=True)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--backbone", default="open_clip:ViT-B-16", type=model_name(PREFIXES, "backbone")
    )
    ap.add_argument("--copies", type=int, default=2, help="demo pool replicated this many times")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats, best of each")
    add_publish(ap)
    args = ap.parse_args()

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    demo = DemoPool(str(REPO / "data" / "demo")).prepare()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    pool_dir = replicate_pool(demo.candidates.parent, tmp / "pool", args.copies)
    files = FilePool(
        str(pool_dir / "candidates.jsonl"),
        str(pool_dir / "images"),
        str(pool_dir / "figures.jsonl"),
    ).prepare()
    n = sum(1 for x in files.candidates.read_text().splitlines() if x.strip())
    n_img = len(list(files.image_root.iterdir()))

    model = SelectorModule(backbone=args.backbone)
    runs: dict[str, list[float]] = {"reference": [], "suite": []}
    for repeat in range(args.repeats):
        times: dict[str, float] = {}
        with timer(times, "reference"):
            reference_scores(model, files, args.batch_size)
        dm = SelectorDataModule(
            FilePool(str(files.candidates), str(files.image_root), str(files.figures)),
            predict_chunk=args.batch_size,
            num_workers=args.workers,
        )
        writer = ScoreWriter(str(tmp / f"scores-{repeat}" / "scores.jsonl"))
        trainer = L.Trainer(
            accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
            enable_model_summary=False,
        )  # fmt: skip
        with timer(times, "suite"):
            trainer.predict(model, dm, return_predictions=False)
        for key in runs:
            runs[key].append(times[key])
        print(
            f"repeat {repeat}: reference {times['reference']:.2f} s, suite {times['suite']:.2f} s"
        )
    ref, suite = min(runs["reference"]), min(runs["suite"])
    result = {
        "backbone": args.backbone,
        "copies": args.copies,
        "candidates": n,
        "images": n_img,
        "repeats": args.repeats,
        "reference_s": round(ref, 2),
        "suite_s": round(suite, 2),
        "reference_cand_per_s": round(n / ref, 2),
        "suite_cand_per_s": round(n / suite, 2),
        "speedup": round(ref / suite, 2),
        "reference_s_by_repeat": spread(runs["reference"], 2),
        "suite_s_by_repeat": spread(runs["suite"], 2),
        "speedup_by_repeat": spread(
            [r / s for r, s in zip(runs["reference"], runs["suite"], strict=True)], 2
        ),
        "goal": ">= 3x",
    }
    print(json.dumps(result, indent=2))
    name = f"scoring_throughput-{args.backbone.replace(':', '_')}"
    print("results:", save(name, result, publish=args.publish))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
