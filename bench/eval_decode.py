"""Batched greedy decoding (left padding) vs one question at a time, same model, same questions.

The tiny LLaVA (``tiny:tiny-llava``, seeded random weights) answers the demo VQA set (repeated
``--repeat`` times) with ``VQAEvaluator.answer``: once in batches of ``--batch`` and once with
batch 1. Answers must be identical (greedy decoding does not depend on batch neighbours); the
figure of merit is the speed-up (goal >= 4x), best of ``--trials`` interleaved runs.

    .venv/bin/python bench/eval_decode.py [--batch 16] [--repeat 4] [--max_new_tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_publish, model_name, save, spread  # noqa: E402

from biomedvital.data.demo import materialize_demo  # noqa: E402
from biomedvital.evaluation.decoding import Decoding  # noqa: E402
from biomedvital.evaluation.demo_vqa import write_demo_vqa  # noqa: E402
from biomedvital.evaluation.vqa_eval import VQADataModule, VQAEvaluator, collate_vqa  # noqa: E402
from biomedvital.tuning.registry import PREFIXES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny:tiny-llava", type=model_name(PREFIXES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--trials", type=int, default=3, help="best of N (CPUs may be shared)")
    add_publish(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        files = materialize_demo(Path(tmp) / "demo")
        questions = write_demo_vqa(Path(tmp) / "demo_vqa.json")
        dm = VQADataModule("vqa_rad", str(questions), str(files.images))
        ds = dm.test_dataloader().dataset
        rows = [ds[i] for i in range(len(ds))] * args.repeat
    ev = VQAEvaluator(model=args.model, decoding=Decoding(max_new_tokens=args.max_new_tokens))
    ev.build()

    def batched() -> list[str]:
        out: list[str] = []
        for i in range(0, len(rows), args.batch):
            b = collate_vqa(rows[i : i + args.batch])
            out += ev.answer(b["images"], [ev.question_text(it) for it in b["items"]])
        return out

    def single() -> list[str]:
        return [ev.answer([r["image"]], [ev.question_text(r["item"])])[0] for r in rows]

    ev.answer([rows[0]["image"]], [rows[0]["item"].question])  # warm-up
    times_b, times_1 = [], []
    for _ in range(args.trials):  # interleaved, so a busy period hits both modes
        t0 = time.perf_counter()
        out_b = batched()
        t1 = time.perf_counter()
        out_1 = single()
        times_b.append(t1 - t0)
        times_1.append(time.perf_counter() - t1)
    tb, t1s = min(times_b), min(times_1)
    same = sum(a == b for a, b in zip(out_b, out_1, strict=True))
    result = {
        "model": args.model,
        "questions": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "batch": args.batch,
        "torch_threads": torch.get_num_threads(),
        "trials": args.trials,
        "batched_s": round(tb, 3),
        "batch1_s": round(t1s, 3),
        "batched_questions_per_s": round(len(rows) / tb, 2),
        "batch1_questions_per_s": round(len(rows) / t1s, 2),
        "speedup": round(t1s / tb, 2),
        "speedup_by_trial": spread([a / b for a, b in zip(times_1, times_b, strict=True)], 2),
        "batched_s_by_trial": spread(times_b, 3),
        "batch1_s_by_trial": spread(times_1, 3),
        "identical_answers": same,
        "distinct_answers": len(set(out_b)),
        "goal_speedup": 4.0,
    }
    path = save(f"eval_decode-{args.model.replace(':', '_')}", result, publish=args.publish)
    for k, v in result.items():
        print(f"{k:>26}: {v}")
    print(f"written {path}")
    if same != len(rows):
        raise SystemExit(f"batched and batch-1 answers differ on {len(rows) - same} questions")


if __name__ == "__main__":
    main()
