"""How long ``make test`` (or ``make test-heavy``) takes on this machine: its wall time, the CPU
time of its processes, pytest's closing line and the load average around it, so the budget the
README states (< 10 minutes on 2 cores) is a measured, committed figure.

    python bench/suite_time.py                     # bench/results/suite_time.json
    python bench/suite_time.py --target test-heavy
    python bench/suite_time.py --publish true      # bench/results/published/ (committed code only)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from _common import add_publish, cpu_seconds, save

_CLOSING = re.compile(r"^=+ (.*(?:passed|failed|error).*) in ([0-9.]+)s", re.M)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=("test", "test-heavy"), default="test")
    add_publish(ap)
    args = ap.parse_args()
    load_before = os.getloadavg()
    cpu0, t0 = cpu_seconds(), time.monotonic()
    done = subprocess.run(["make", args.target], capture_output=True, text=True)
    wall, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
    closing = _CLOSING.findall(done.stdout)
    if done.returncode != 0 or not closing:
        sys.stdout.write(done.stdout[-4000:] + done.stderr[-2000:])
        sys.exit(f"make {args.target} exited {done.returncode}")
    counts, pytest_s = closing[-1]
    path = save(
        "suite_time" if args.target == "test" else "suite_time_heavy",
        {
            "target": f"make {args.target}",  # "command" is the bench's own (conditions)
            "wall_s": round(wall, 1),
            "wall_min": round(wall / 60, 2),
            "pytest_s": float(pytest_s),
            "cpu_s": round(cpu, 1),
            "result": counts,
            "load_1min_before": round(load_before[0], 2),
            "load_1min_after": round(os.getloadavg()[0], 2),
        },
        publish=args.publish,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
