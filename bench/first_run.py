"""A new user's first ``make demo``: a fresh clone of HEAD in a temporary folder, empty uv and pip
caches (nothing built or downloaded before), ``make setup`` then the rest of ``make demo``.

Prints and writes (``bench/results/first_run.json``) each phase's wall time, the CPU time its
processes used (user + system, children included: on a busy machine the wall time grows, the CPU
time much less) and the load average before and after, with the machine's core count; and, for
``make demo``, each of its steps (``bench/timed_shell.py`` as make's shell), so that the record
says where the time went.

    python bench/first_run.py                   # bench/results/first_run.json
    python bench/first_run.py --publish true    # bench/results/published/ (docs/performance.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, add_publish, cpu_seconds, save

_VERB = re.compile(r"-m biomedvital ([\w-]+)(?:.*?--config (\S+))?")


def phase(name: str, command: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run one phase; its wall and CPU seconds and the 1-minute load around it."""
    load_before = os.getloadavg()[0]
    cpu0, t0 = cpu_seconds(), time.monotonic()
    with open(log, "ab") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
    if done.returncode != 0:
        sys.exit(f"{name}: {' '.join(command)} exited {done.returncode}; log: {log}")
    return {
        "command": " ".join(command),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
    }


def steps(log: Path) -> list[dict]:
    """``make demo``'s recipe lines as timed by ``bench/timed_shell.py``, in the order they
    ended, named by verb and first config (the line that runs the whole chain left out: its
    time is the phase's)."""
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        step = json.loads(line)
        command = step.pop("command")
        if re.match(r"^\S*make\b", command):
            continue
        verb = _VERB.search(command)
        step["step"] = (
            " ".join(x for x in verb.groups() if x) if verb else command.split("\n")[0][:60]
        )
        out.append(step)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone and its caches")
    add_publish(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="biomedvital-first-run-"))
    clone, log = work / "biomedvital", work / "first_run.log"
    env = {**os.environ, "UV_CACHE_DIR": str(work / "uv-cache")}
    env["PIP_CACHE_DIR"] = str(work / "pip-cache")
    env["BENCH_STAGE_LOG"] = str(work / "steps.jsonl")
    shell = f"SHELL={REPO / 'bench' / 'timed_shell.py'}"
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        phases = {
            "setup": phase("setup", ["make", "setup"], clone, env, log),
            "demo": phase("demo", ["make", "demo", shell], clone, env, log),
        }
        phases["demo"]["command"] = "make demo"
        demo_steps = steps(work / "steps.jsonl")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "commit": commit,
        "cores": len(os.sched_getaffinity(0)),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "phases": phases,
        "demo_steps": demo_steps,
        "wall_s": round(sum(p["wall_s"] for p in phases.values()), 1),
        "wall_min": round(sum(p["wall_s"] for p in phases.values()) / 60, 2),
        "cpu_s": round(sum(p["cpu_s"] for p in phases.values()), 1),
    }
    path = save("first_run", result, publish=args.publish)
    for step in demo_steps:
        print(f"  {step['step']:<40} {step['wall_s']:7.1f} s wall, {step['cpu_s']:7.1f} s CPU")
    for name, p in phases.items():
        print(
            f"{name:>5}: {p['wall_s']:7.1f} s wall, {p['cpu_s']:7.1f} s CPU"
            f" (load {p['load_1min_before']} -> {p['load_1min_after']})"
        )
    print(f"first make demo: {result['wall_s']:.1f} s wall on {result['cores']} cores -> {path}")


if __name__ == "__main__":
    main()
