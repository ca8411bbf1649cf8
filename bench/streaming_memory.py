"""Peak memory of scoring + selection for 10,000 vs 100,000 candidates (streamed input).

Synthetic records over the demo images, embeddings already in the frozen backbone's cache
(what a rescoring or a grid sees). Each pool size runs in its own process; peak RSS is read
from the child; the measuring process runs ``--repeats`` times per size (the spread of the peak
and of the time). Goal: peak(100k) <= 1.3x peak(10k).

    python bench/streaming_memory.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from _common import REPO, add_publish, save, spread

CHILD = r"""
import json, sys, resource, time
from pathlib import Path
import lightning as L
import torch
from biomedvital.data.pool import DemoPool, FilePool
from biomedvital.selection import ScoreWriter, SelectorDataModule, SelectorModule
from biomedvital.selection.select import select

n, work, mode = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[4]
demo = DemoPool(sys.argv[3]).prepare()
figures = [json.loads(x) for x in demo.figures.read_text().splitlines() if x.strip()]
cands = work / "candidates.jsonl"
images = sorted(p.name for p in demo.image_root.iterdir())
if mode == "fill":
  with cands.open("w") as f:
    for i in range(n):
        fig = figures[i % len(figures)]
        img = images[i % len(images)]
        f.write(json.dumps({"id": f"s{i}", "image": img, "pair_id": fig["pair_id"], "conversations": [
            {"from": "human", "value": f"<image>\nQuestion {i}: what does this show?"},
            {"from": "gpt", "value": f"Synthetic answer number {i} about the finding."}]}) + "\n")
model = SelectorModule(backbone="tiny:tiny-clip", backbone_mode="frozen", cache_dir=str(work / "cache"))
pool = FilePool(str(cands), str(demo.image_root), str(demo.figures))
dm = SelectorDataModule(pool, num_workers=0, predict_chunk=512)
trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[ScoreWriter(str(work / "scores.jsonl"))])
# "fill" encodes everything into the cache (what an earlier run leaves behind);
# "measure" is a fresh process that scores from the cache and selects
t = time.perf_counter()
trainer.predict(model, dm, return_predictions=False)
if mode == "measure":
    select(work / "scores.jsonl", cands, work / "selected", top_percent=80, store=str(work / "mlruns"))
print(json.dumps({"n": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t}))
"""


def child(n: int, tmp: str, demo_root: str, mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), tmp, demo_root, mode],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="measuring processes per size")
    add_publish(ap)
    args = ap.parse_args()
    demo_root = str(REPO / "data" / "demo")
    out: dict[int, list[dict]] = {}
    for n in (10_000, 100_000):
        with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
            child(n, tmp, demo_root, "fill")
            out[n] = [child(n, tmp, demo_root, "measure") for _ in range(args.repeats)]
            print(n, [round(r["peak_rss_mb"]) for r in out[n]], flush=True)
    peak = {n: [r["peak_rss_mb"] for r in runs] for n, runs in out.items()}
    seconds = {n: [r["seconds"] for r in runs] for n, runs in out.items()}
    ratio = max(peak[100_000]) / max(peak[10_000])
    result = {
        "backbone": "tiny:tiny-clip",
        "repeats": args.repeats,
        "peak_rss_mb_10k": round(max(peak[10_000]), 1),
        "peak_rss_mb_100k": round(max(peak[100_000]), 1),
        "seconds_10k": round(min(seconds[10_000]), 1),
        "seconds_100k": round(min(seconds[100_000]), 1),
        "ratio": round(ratio, 3),
        "peak_rss_mb_by_repeat": {str(n): spread(v, 1) for n, v in peak.items()},
        "seconds_by_repeat": {str(n): spread(v, 1) for n, v in seconds.items()},
        "goal": "<= 1.3x",
    }
    print(json.dumps(result, indent=2))
    print("results:", save("streaming_memory", result, publish=args.publish))


if __name__ == "__main__":
    main()
