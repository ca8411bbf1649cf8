"""Peak memory of scoring + selection for 10,000 vs 100,000 candidates (streamed input).

Synthetic records over the demo images, embeddings already in the frozen backbone's cache
(what a rescoring or a grid sees). Each pool size runs in its own process; peak RSS is read
from the child. Goal: peak(100k) <= 1.3x peak(10k).

    python bench/streaming_memory.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile

from _common import REPO, save

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


def main() -> None:
    demo_root = str(REPO / "data" / "demo")
    out = {}
    for n in (10_000, 100_000):
        with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
            for mode in ("fill", "measure"):
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, str(n), tmp, demo_root, mode],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
            out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = out[100_000]["peak_rss_mb"] / out[10_000]["peak_rss_mb"]
    result = {
        "peak_rss_mb_10k": round(out[10_000]["peak_rss_mb"], 1),
        "peak_rss_mb_100k": round(out[100_000]["peak_rss_mb"], 1),
        "seconds_10k": round(out[10_000]["seconds"], 1),
        "seconds_100k": round(out[100_000]["seconds"], 1),
        "ratio": round(ratio, 3),
        "goal": "<= 1.3x",
    }
    print(json.dumps(result, indent=2))
    save("streaming_memory", result)
    _ = resource


if __name__ == "__main__":
    main()
