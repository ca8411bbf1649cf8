"""VQA evaluation on 2 processes (DDP, one thread each) against 1 process (two threads), same
questions, same model, end to end through ``python -m biomedvital test`` (start-up included).

The tiny LLaVA (``tiny:tiny-llava``, seeded random weights) answers the demo VQA set repeated
``--repeat`` times (new question ids per copy). The answers files must be byte-identical; the
figures of merit are the wall-time ratio, best of ``--trials`` interleaved runs, and the same
ratio less each side's fixed cost (start-up, model load, process group: a run of the set once). On a GPU node the
same command with ``--trainer.devices 8`` is the multi-GPU path; here the CPUs stand in.

    .venv/bin/python bench/eval_processes.py [--repeat 64] [--trials 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_publish, save, spread  # noqa: E402

from biomedvital.data.demo import materialize_demo  # noqa: E402
from biomedvital.evaluation.demo_vqa import write_demo_vqa  # noqa: E402


def _questions(tmp: Path, repeat: int) -> tuple[Path, Path]:
    images = materialize_demo(tmp / "demo").images
    rows = json.loads(write_demo_vqa(tmp / "demo_vqa.json").read_text())
    many = [{**r, "qid": k * len(rows) + i} for k in range(repeat) for i, r in enumerate(rows)]
    path = tmp / "many.json"
    path.write_text(json.dumps(many))
    return path, images


def _run(questions: Path, images: Path, out: Path, devices: int, args: argparse.Namespace) -> float:
    cmd = [
        sys.executable, "-m", "biomedvital", "test", "--config", "conf/eval/demo_vqa.yaml",
        "--model.init_args.model", "tiny:tiny-llava",
        "--model.init_args.decoding.max_new_tokens", str(args.max_new_tokens),
        "--data.init_args.data", str(questions), "--data.init_args.image_root", str(images),
        "--data.init_args.batch_size", str(args.batch),
        "--trainer.default_root_dir", str(out), "--trainer.logger", "false",
    ] + (["--trainer.devices", str(devices), "--trainer.strategy", "ddp"] if devices > 1 else [])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=2)
    add_publish(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        once, images = _questions(tmp / "once", 1)
        fixed = {d: _run(once, images, tmp / f"once{d}", d, args) for d in (1, 2)}
        questions, images = _questions(tmp, args.repeat)
        n = len(json.loads(questions.read_text()))
        times: dict[int, list[float]] = {1: [], 2: []}
        for trial in range(args.trials):
            for devices in (1, 2):
                out = tmp / f"run{devices}-{trial}"
                times[devices].append(_run(questions, images, out, devices, args))
                print(
                    f"trial {trial}: {devices} process(es) {times[devices][-1]:.1f} s", flush=True
                )
        same = all(
            (tmp / f"run2-{t}" / "predictions.jsonl").read_bytes()
            == (tmp / f"run1-{t}" / "predictions.jsonl").read_bytes()
            for t in range(args.trials)
        )
    one, two = min(times[1]), min(times[2])
    result = {
        "questions": n,
        "one_process_s": round(one, 2),
        "two_processes_s": round(two, 2),
        "speedup": round(one / two, 2),
        "fixed_s": {d: round(t, 2) for d, t in fixed.items()},
        "answering_speedup": round((one - fixed[1]) / (two - fixed[2]), 2),
        "speedup_by_trial": spread([a / b for a, b in zip(times[1], times[2], strict=True)], 2),
        "identical_predictions": same,
        "times": times,
        **{k: v for k, v in vars(args).items() if k != "publish"},
    }
    print(json.dumps(result))
    print("results:", save("eval_processes", result, publish=args.publish))


if __name__ == "__main__":
    main()
