"""Questions per second: ``test`` (batched Hugging Face ``generate``) against ``answer`` asking
``transformers serve`` (the same export), on the same questions, side by side, as a ratio.

The model is an exported tiny LLaVA (``--export DIR``: a model or export folder, e.g. the demo's
``outputs/demo/tuner/export``; by default the seeded ``tiny:tiny-llava`` exported as the tuner
exports it). The questions are the demo VQA set repeated ``--repeat`` times (distinct questions:
each repeat's text carries its number, so the endpoint's journal caches nothing).

* ``test``: ``VQAEvaluator.answer`` in batches of ``--batch`` on ``--device`` (the model loaded
  once, not timed), as ``python -m biomedvital test`` answers;
* ``answer``: the ``answer`` verb's whole run (requests, journal, scoring, files) against
  ``transformers serve`` on ``--device`` (started once, not timed; its start-up is reported),
  ``--concurrency`` requests in flight; ``--continuous_batching`` asks the server for it (it
  serves text-only models that way; a vision model falls back to one request at a time, which
  the result records).

Interleaved trials, best of ``--trials`` for each. The predictions must agree question by
question (greedy both ways); the count that does is in the result.

    .venv/bin/python bench/eval_endpoint.py [--device cpu|cuda] [--repeat 2] [--trials 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# torch's idle threads sleep rather than spin, as in the server (HFServer sets it): both paths
# wait alike, and on a shared machine a spinning thread costs the other jobs' CPU
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_publish, save, spread  # noqa: E402

from biomedvital.data.demo import materialize_demo  # noqa: E402
from biomedvital.data.jsonio import write_json  # noqa: E402
from biomedvital.evaluation.demo_vqa import demo_vqa_records  # noqa: E402


def tiny_export(folder: Path) -> Path:
    """The seeded tiny LLaVA exported as ``ExportTuned`` writes it (merged/ + run.json), its
    processor set and recorded to pad images to a square as the tuner's data module does (the
    server preprocesses as the export records, ``test`` as the record says)."""
    from biomedvital.tuning.conversation import VICUNA_V1_SYSTEM
    from biomedvital.tuning.export import serving_processor
    from biomedvital.tuning.models import create_llava, set_image_aspect_ratio

    bundle = create_llava("tiny:tiny-llava", seed=0)
    set_image_aspect_ratio(bundle.processor, "pad")
    with serving_processor(bundle.processor, VICUNA_V1_SYSTEM):
        bundle.model.save_pretrained(folder / "merged")
        bundle.processor.save_pretrained(folder / "merged")
    write_json(
        folder / "run.json",
        {"system_prompt": VICUNA_V1_SYSTEM, "image_aspect_ratio": "pad", "mlflow_run_id": None},
    )
    return folder


def questions(path: Path, repeat: int) -> Path:
    """The demo VQA set ``repeat`` times, each copy's questions numbered (all distinct)."""
    rows = []
    for r in range(repeat):
        for q in demo_vqa_records():
            rows.append({**q, "qid": len(rows), "question": f"{q['question']} ({r + 1})"})
    path.write_text(json.dumps(rows))
    return path


def time_test(export: Path, data, device: str, batch: int, max_new_tokens: int) -> tuple:
    import torch

    from biomedvital.data.images import ImageRoot
    from biomedvital.evaluation.decoding import Decoding
    from biomedvital.evaluation.vqa_eval import VQAEvaluator

    decoding = Decoding(max_new_tokens=max_new_tokens)
    ev = VQAEvaluator(model=f"local-dir:{export / 'merged'}", decoding=decoding)
    ev.build()
    ev.trained_system = json.loads((export / "run.json").read_text()).get("system_prompt")
    ev.to(torch.device(device))
    items, root = data.load_items(), ImageRoot(data.image_root)
    ev.answer([root.load(items[0].image)], [ev.question_text(items[0])])  # warm-up

    def run() -> list[str]:
        out: list[str] = []
        for s in range(0, len(items), batch):
            b = items[s : s + batch]
            out += ev.answer([root.load(it.image) for it in b], [ev.question_text(it) for it in b])
        return out

    return ev, run


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of process ``root`` and its live descendants (Linux
    ``/proc``): what a server costs, whatever else the machine runs."""
    parents, times = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(times.get(p, 0.0) for p in tree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (both paths)")
    ap.add_argument("--export", type=Path, default=None, help="a model or export folder")
    ap.add_argument("--repeat", type=int, default=2, help="copies of the 30 demo questions")
    ap.add_argument("--batch", type=int, default=16, help="test's batch size")
    ap.add_argument("--concurrency", type=int, default=8, help="answer's requests in flight")
    ap.add_argument("--max_new_tokens", type=int, default=24)
    ap.add_argument("--continuous_batching", action="store_true")
    ap.add_argument("--trials", type=int, default=2, help="best of N, interleaved")
    add_publish(ap)
    args = ap.parse_args()

    from biomedvital.evaluation.answer import Prompting, answer
    from biomedvital.evaluation.decoding import Decoding
    from biomedvital.evaluation.vqa_eval import VQADataModule
    from biomedvital.llm.config import ClientConfig
    from biomedvital.llm.hf_server import HFServer, model_folder

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-endpoint-"))
    export = args.export or tiny_export(tmp / "export")
    folder = model_folder(export)
    export = folder.parent if folder.name == "merged" else folder
    images = materialize_demo(tmp / "demo").images
    qfile = questions(tmp / "questions.json", args.repeat)
    data = VQADataModule("vqa_rad", str(qfile), str(images), name="bench", batch_size=args.batch)
    n = len(data.load_items())
    ev, run_test = time_test(export, data, args.device, args.batch, args.max_new_tokens)

    t0 = time.perf_counter()
    server = HFServer(
        folder, "bench-model", device=args.device, continuous_batching=args.continuous_batching
    ).start()
    startup = time.perf_counter() - t0
    os.environ["BENCH_LOCAL_KEY"] = "local"  # transformers serve reads no key
    client = ClientConfig(
        base_url=server.base_url,
        model="bench-model",
        api_key_env="BENCH_LOCAL_KEY",
        concurrency=args.concurrency,
        timeout_s=600,
    )
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    times_test, times_answer, cpu_test, cpu_answer = [], [], [], []
    try:
        for trial in range(args.trials):
            c0, t0 = time.process_time(), time.perf_counter()
            test_texts = run_test()
            times_test.append(time.perf_counter() - t0)
            cpu_test.append(time.process_time() - c0)
            out = tmp / f"answer-{trial}"
            assert server.proc is not None
            c0, s0, t0 = time.process_time(), tree_cpu_s(server.proc.pid), time.perf_counter()
            answer(data, client, out, Prompting(), decoding, export=export, progress=False)
            times_answer.append(time.perf_counter() - t0)
            served_cpu = tree_cpu_s(server.proc.pid) - s0
            cpu_answer.append(time.process_time() - c0 + served_cpu)
        served = [
            json.loads(x)["text"] for x in (out / "predictions.jsonl").read_text().splitlines()
        ]
        fallback = "Falling back to sequential generation" in server.log_tail(200)
    finally:
        server.stop()
    tt, ta = min(times_test), min(times_answer)
    import torch

    result = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "export": str(args.export) if args.export else "tiny:tiny-llava (seeded, exported)",
        "questions": n,
        "max_new_tokens": args.max_new_tokens,
        "test_batch": args.batch,
        "answer_concurrency": args.concurrency,
        "continuous_batching": args.continuous_batching and not fallback,
        "server_startup_s": round(startup, 1),
        "trials": args.trials,
        "test_s": [round(t, 2) for t in times_test],
        "answer_s": [round(t, 2) for t in times_answer],
        "test_questions_per_s": round(n / tt, 2),
        "answer_questions_per_s": round(n / ta, 2),
        "test_over_answer": round(ta / tt, 2),
        "test_over_answer_by_trial": spread(
            [a / t for t, a in zip(times_test, times_answer, strict=True)], 2
        ),
        # CPU seconds a question costs (answer: client and server processes), best trial:
        # a load-independent figure on a shared machine, where wall time is not
        "test_cpu_s_per_question": round(min(cpu_test) / n, 4),
        "answer_cpu_s_per_question": round(min(cpu_answer) / n, 4),
        "answer_over_test_cpu": round(min(cpu_answer) / min(cpu_test), 2),
        "same_predictions": sum(a == b for a, b in zip(test_texts, served, strict=True)),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_threads": torch.get_num_threads(),
    }
    print(f"{n} questions on {args.device}, best of {args.trials}:")
    print(f"  test   (batch {args.batch:>2}):      {tt:7.2f} s  {n / tt:7.2f} questions/s")
    print(f"  answer (concurrency {args.concurrency}): {ta:7.2f} s  {n / ta:7.2f} questions/s")
    print(f"  test is {ta / tt:.1f}x answer's rate; server start-up {startup:.1f} s")
    print(
        f"  CPU s per question: test {result['test_cpu_s_per_question']}, answer "
        f"{result['answer_cpu_s_per_question']} (client + server): "
        f"{result['answer_over_test_cpu']}x"
    )
    print(f"  identical predictions: {result['same_predictions']} of {n}")
    print(f"written {save('eval_endpoint', result, publish=args.publish)}")


if __name__ == "__main__":
    main()
