"""Peak memory of ``generate`` for 10,000 and 100,000 source figures (goal: ratio ≤ 1.3).

Each size runs in its own process (``ru_maxrss`` is per process) against the fake API answering
at once from another process, with images attached (one small JPEG shared by every figure, so
the image folder stays small), 5 demonstrations per prompt, concurrency 32. The figures are
streamed, requests built as the client has room, and outputs assembled from a spooled plan and
the journal, so what grows with the number of figures is only the journal's key index and the
set of seen ``pair_id`` values.

``python bench/generation_memory.py [--sizes 10000 100000]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_publish, save  # noqa: E402
from generation_throughput import KEY_ENV, Server  # noqa: E402


def write_figures(root: Path, n: int) -> dict[str, Path]:
    """``n`` figures sharing one image, and two demonstrations per modality."""
    sys.path.insert(0, str(REPO / "tests" / "generation"))
    from fakeapi import write_inputs

    inputs = write_inputs(root, n_figures=1)  # the image and the demonstrations
    image = next(inputs["image_root"].iterdir()).name
    with open(inputs["figures"], "w") as f:
        for i in range(n):
            fig = {
                "pair_id": f"PMC{i}_F{i % 7}",
                "image": image,
                "fig_label": f"Figure {i % 7}",
                "fig_caption": f"Axial CT number {i} showing a hypodense lesion in segment {i % 8}.",
                "in_text_mention": [{"tokens": f"The lesion (Fig. {i % 7}) measured {i % 5} cm."}],
                "domain": {"ct_scan": True},
            }
            f.write(json.dumps(fig) + "\n")
    return inputs


def child(args: argparse.Namespace) -> None:
    from biomedvital.generation.generate import generate
    from biomedvital.llm.config import ClientConfig

    root = Path(args.dir)
    t0 = time.perf_counter()
    m = generate(
        figures=root / "figures.jsonl",
        image_root=root / "images",
        demonstrations=root / "demos.json",
        out=root / "out",
        client=ClientConfig(
            base_url=args.base_url,
            model="bench-model",
            api_key_env=KEY_ENV,
            concurrency=32,
            timeout_s=60,
        ),
        store=str(root / "mlruns"),
        progress=False,
    )
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps({"peak_rss_mb": round(peak, 1), "wall_s": round(wall, 1), "counts": m["counts"]})
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--base_url", help=argparse.SUPPRESS)
    add_publish(ap)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    os.environ[KEY_ENV] = "sk-bench"
    server = Server(0.0)
    results = {}
    try:
        for n in args.sizes:
            with tempfile.TemporaryDirectory() as tmp:
                write_figures(Path(tmp), n)
                cmd = [sys.executable, __file__, "--child", "--dir", tmp, "--base_url"]
                proc = subprocess.run(
                    [*cmd, server.base_url], capture_output=True, text=True, check=False
                )
                if proc.returncode:
                    sys.exit(f"size {n} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                assert res["counts"]["written"] == n, res["counts"]
                results[n] = res
                print(
                    f"{n:>7} figures: peak RSS {res['peak_rss_mb']:.0f} MB, {res['wall_s']:.0f} s"
                )
    finally:
        server.close()
    small, large = min(results), max(results)
    ratio = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"]
    print(f"ratio {large} / {small}: {ratio:.3f} (goal <= 1.3)")
    path = save(
        "generation_memory",
        {str(n): r for n, r in results.items()}
        | {"sizes": args.sizes, "ratio": round(ratio, 3), "goal": "<= 1.3x"},
        publish=args.publish,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
