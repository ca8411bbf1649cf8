"""Throughput of the generation client against a loopback server that answers after 200 ms.

1,000 distinct requests at concurrency 32 cannot finish faster than 1000 × 0.2 / 32 = 6.25 s;
the benchmark prints the wall time as a ratio of that bound (goal ≤ 1.25), then reruns the same
requests and prints how many reached the server (goal 0: the journal answers them all). Each of
``--repeats`` repeats starts from an empty journal; the ratio is the best repeat's, given with
the ratio repeat by repeat.
``--verb`` also times the whole ``generate`` verb on 1,000 figures (text only), MLflow included.

The server runs in its own process (``tests/generation/fakeapi.py``) so that its threads do not
compete with the client for the interpreter lock.
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from biomedvital.llm.config import ClientConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_publish, save, spread  # noqa: E402

FAKEAPI = REPO / "tests" / "generation" / "fakeapi.py"
KEY_ENV = "BIOMEDVITAL_BENCH_KEY"


class Server:
    """``fakeapi.py`` in a subprocess; ``count()`` asks it how many requests it saw."""

    def __init__(self, delay: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKEAPI), "--delay", str(delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()

    def _ask(self, what: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def count(self) -> int:
        return int(self._ask("count"))

    def reset(self) -> None:
        self._ask("reset")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def bench_client(base_url: str, concurrency: int, **settings: Any) -> ClientConfig:
    """The client block of both timings (the bench server, its key variable) plus ``settings``."""
    from biomedvital.llm.config import ClientConfig

    return ClientConfig(
        base_url=base_url,
        model="bench-model",
        api_key_env=KEY_ENV,
        concurrency=concurrency,
        timeout_s=30,
        **settings,
    )


def client_run(base_url: str, journal: Path, n: int, concurrency: int) -> tuple[float, dict]:
    from biomedvital.llm.journal import Journal
    from biomedvital.llm.online import ChatClient
    from biomedvital.llm.outcome import ChatRequest

    config = bench_client(
        base_url, concurrency, max_attempts=3, price_per_million={"input": 2.5, "output": 10.0}
    )
    requests = (
        ChatRequest(
            [{"role": "user", "content": f"Describe figure {i} of the benchmark."}],
            {"temperature": 0.7, "max_tokens": 256, "seed": 0},
        )
        for i in range(n)
    )
    t0 = time.perf_counter()
    with Journal(journal) as j:
        res = ChatClient(config, j).fill(requests, "bench", progress=True, total=n)
    return time.perf_counter() - t0, res.ledger.as_dict()


def verb_run(base_url: str, root: Path, n: int, concurrency: int) -> float:
    from biomedvital.generation.generate import generate

    sys.path.insert(0, str(FAKEAPI.parent))
    from fakeapi import write_inputs

    inputs = write_inputs(root / "in", n_figures=n)
    t0 = time.perf_counter()
    m = generate(
        out=root / "out",
        **inputs,
        client=bench_client(base_url, concurrency),
        vision=False,
        store=str(root / "mlruns"),
        progress=False,
    )
    wall = time.perf_counter() - t0
    assert m["counts"]["written"] == n, m["counts"]
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--verb", action="store_true", help="also time the generate verb")
    ap.add_argument("--repeats", type=int, default=3, help="each from an empty journal")
    add_publish(ap)
    args = ap.parse_args()
    os.environ[KEY_ENV] = "sk-bench"
    import openai  # noqa: F401 - the SDK's import (~1 s) is start-up, not throughput

    import biomedvital.llm.online  # noqa: F401

    bound = args.requests * args.delay / args.concurrency
    server = Server(args.delay)
    runs = []
    try:
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                server.reset()
                journal = Path(tmp) / "journal.jsonl"
                wall, ledger = client_run(server.base_url, journal, args.requests, args.concurrency)
                seen = server.count()
                server.reset()
                rerun_wall, rerun_ledger = client_run(
                    server.base_url, journal, args.requests, args.concurrency
                )
                runs.append(
                    {
                        "wall_s": round(wall, 3),
                        "ratio": round(wall / bound, 3),
                        "server_saw": seen,
                        "ledger": ledger,
                        "rerun_wall_s": round(rerun_wall, 3),
                        "rerun_requests": server.count(),
                        "rerun_ledger": rerun_ledger,
                    }
                )
            print(
                f"repeat {repeat}: {wall:.2f} s = {wall / bound:.3f} × bound (goal <= 1.25); "
                f"server saw {seen}; rerun {rerun_wall:.2f} s, "
                f"{runs[-1]['rerun_requests']} requests reached the server (goal 0)",
                flush=True,
            )
        verb_wall = None
        if args.verb:
            server.reset()
            with tempfile.TemporaryDirectory() as tmp:
                verb_wall = verb_run(server.base_url, Path(tmp), args.requests, args.concurrency)
    finally:
        server.close()
    best = min(runs, key=lambda r: r["wall_s"])
    print(
        f"\n{args.requests} requests, {args.delay * 1000:.0f} ms each, concurrency "
        f"{args.concurrency}: bound {bound:.2f} s; best {best['wall_s']:.2f} s = "
        f"{best['ratio']:.3f} × bound"
    )
    if verb_wall is not None:
        print(f"generate verb, {args.requests} figures (MLflow included): {verb_wall:.2f} s")
    path = save(
        "generation_throughput",
        {
            "requests": args.requests,
            "delay_s": args.delay,
            "concurrency": args.concurrency,
            "repeats": args.repeats,
            "bound_s": bound,
            "wall_s": best["wall_s"],
            "ratio": best["ratio"],
            "wall_s_by_repeat": spread([r["wall_s"] for r in runs], 3),
            "ratio_by_repeat": spread([r["ratio"] for r in runs], 3),
            "rerun_requests": max(r["rerun_requests"] for r in runs),
            "rerun_wall_s": max(r["rerun_wall_s"] for r in runs),
            "runs": runs,
            "verb_wall_s": None if verb_wall is None else round(verb_wall, 3),
        },
        publish=args.publish,
    )
    print(f"results: {path}")
    print(
        json.dumps(
            {"ratio": best["ratio"], "rerun_requests": max(r["rerun_requests"] for r in runs)}
        )
    )


if __name__ == "__main__":
    main()
