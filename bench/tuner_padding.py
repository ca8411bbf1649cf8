"""Tuner batching and memory on the demo: grouped batches (the tuner's sampler) vs random ones.

Same tiny LLaVA (``tiny:tiny-llava``, LoRA as ``conf/demo/tuner.yaml``), the demo's selected
data (``outputs/demo/selected/selected.json``; ``make demo`` first), batch 4, on the CPU.
Reports the padding fraction (pad tokens / tokens computed on) and real (non-pad) tokens per
second of training with ``group_by: modality_length`` vs ``group_by: none``, side by side as
ratios (goal: padding <= 10 % grouped; ``batch_split: min_padding`` as the demo config, and
LLaVA's fixed-size cut for reference), then the peak memory (RSS) of the demo's own fit in a
fresh process (goal < 8 GB).

    python bench/tuner_padding.py [--epochs 3] [--repeats 2] [--skip-demo-fit]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time

import psutil
from _common import REPO, add_publish, save, spread

DATA = REPO / "outputs" / "demo" / "selected" / "selected.json"
IMAGES = REPO / "data" / "demo" / "images"


def measure(group_by: str, epochs: int, split: str = "fixed") -> dict:
    import lightning as L
    import torch

    from biomedvital.tuning import LlavaTuner, LoraArgs, OptimArgs, TunerDataModule

    L.seed_everything(0, verbose=False)
    torch.set_num_threads(2)
    model = LlavaTuner(
        "tiny:tiny-llava",
        lora=LoraArgs(r=16, alpha=32),
        optim=OptimArgs(lr=1e-3, projector_lr=1e-4),
        init_seed=0,
    )
    dm = TunerDataModule(
        str(DATA), str(IMAGES), max_length=1024, batch_size=4, group_by=group_by, num_workers=1,
        batch_split=split,
    )  # fmt: skip
    dm.processor = model.processor
    dm.setup("fit")
    lengths = [len(s) for s in dm.sets["train"]]
    real = padded = 0
    for epoch in range(epochs):
        sampler = dm.sampler("train", shuffle=True)
        sampler.set_epoch(epoch)
        for batch in sampler:
            real += sum(lengths[i] for i in batch)
            padded += max(lengths[i] for i in batch) * len(batch)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - t0
    return {
        "group_by": group_by,
        "batch_split": split,
        "samples": len(lengths),
        "steps": trainer.global_step,
        "real_tokens": real,
        "computed_tokens": padded,
        "padding_fraction": round(1 - real / padded, 4),
        "seconds": round(seconds, 2),
        "real_tokens_per_s": round(real / seconds, 1),
    }


def demo_fit_peak_rss() -> dict:
    """``python -m biomedvital fit --config conf/demo/tuner.yaml`` in a fresh process (outputs
    in a temporary folder, no MLflow run); RSS of its process tree sampled every 50 ms."""
    with tempfile.TemporaryDirectory(prefix="bench-tuner-") as tmp:
        cmd = [
            sys.executable, "-m", "biomedvital", "fit", "--config", "conf/demo/tuner.yaml",
            "--trainer.default_root_dir", tmp, "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = psutil.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peak = {"tree": 0, "main": 0}

        def sample() -> None:
            while proc.poll() is None:
                try:
                    procs = [proc, *proc.children(recursive=True)]
                    rss = [p.memory_info().rss for p in procs]
                except psutil.Error:
                    continue
                peak["tree"] = max(peak["tree"], sum(rss))
                peak["main"] = max(peak["main"], rss[0])
                time.sleep(0.05)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        _, err = proc.communicate()
        watcher.join()
        if proc.returncode:
            sys.exit(err.decode()[-3000:])
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb_main_process": round(peak["main"] / 2**20, 1),
        "peak_rss_mb_process_tree": round(peak["tree"] / 2**20, 1),
        "goal": "< 8192 MB",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-demo-fit", action="store_true")
    add_publish(parser)
    args = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"{DATA} not found: run `make demo` first")
    # alternated and repeated, the fastest of each kept: other load on a shared machine only
    # ever slows a run down
    cases = {  # name: (group_by, batch_split)
        "grouped_min_padding": ("modality_length", "min_padding"),  # conf/demo/tuner.yaml
        "grouped_fixed": ("modality_length", "fixed"),  # LLaVA's group_by_modality_length
        "random": ("none", "fixed"),
    }
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, done in runs.items():
            done.append(measure(cases[name][0], args.epochs, cases[name][1]))
    best = {name: min(done, key=lambda r: r["seconds"]) for name, done in runs.items()}
    for name, r in best.items():
        r["all_seconds"] = [x["seconds"] for x in runs[name]]
    grouped, fixed, plain = best["grouped_min_padding"], best["grouped_fixed"], best["random"]
    result = {
        **best,
        "padding_min_padding_vs_fixed_vs_random": f"{grouped['padding_fraction']:.1%} vs "
        f"{fixed['padding_fraction']:.1%} vs {plain['padding_fraction']:.1%}",
        "computed_tokens_ratio": round(grouped["computed_tokens"] / plain["computed_tokens"], 3),
        "tokens_per_s_ratio": round(grouped["real_tokens_per_s"] / plain["real_tokens_per_s"], 3),
        "tokens_per_s_ratio_vs_fixed": round(
            grouped["real_tokens_per_s"] / fixed["real_tokens_per_s"], 3
        ),
        # pair by pair (the same repeat), the spread other load leaves in the ratio
        "tokens_per_s_ratio_by_repeat": spread(
            [
                g["real_tokens_per_s"] / r["real_tokens_per_s"]
                for g, r in zip(runs["grouped_min_padding"], runs["random"], strict=True)
            ]
        ),
        "tokens_per_s_ratio_vs_fixed_by_repeat": spread(
            [
                g["real_tokens_per_s"] / f["real_tokens_per_s"]
                for g, f in zip(runs["grouped_min_padding"], runs["grouped_fixed"], strict=True)
            ]
        ),
        "repeats": args.repeats,
        "data": {
            "path": DATA.relative_to(REPO).as_posix(),
            "sha256": hashlib.sha256(DATA.read_bytes()).hexdigest(),
            "samples": len(json.loads(DATA.read_text())),
        },
        "padding_goal": "<= 10 % grouped",
    }
    if not args.skip_demo_fit:
        result["demo_fit"] = demo_fit_peak_rss()
    print(json.dumps(result, indent=2))
    print("results:", save("tuner_padding", result, publish=args.publish))


if __name__ == "__main__":
    main()
