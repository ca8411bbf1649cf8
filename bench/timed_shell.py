#!/usr/bin/env python3
"""A ``SHELL`` for make that times each recipe line: ``make SHELL=bench/timed_shell.py ...`` runs
every line through ``/bin/sh`` as usual and appends ``{command, wall_s, cpu_s}`` (CPU: user +
system of the line's processes) as a JSON line to the file named by ``BENCH_STAGE_LOG``, so a
benchmark of a whole make target can say which step its time went to."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def main() -> int:
    t0 = time.monotonic()
    code = subprocess.call(["/bin/sh", *sys.argv[1:]])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = os.environ.get("BENCH_STAGE_LOG")
    if log:
        line = {
            "command": " ".join(sys.argv[2:]).strip(),
            "wall_s": round(time.monotonic() - t0, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "exit": code,
        }
        with open(log, "a", encoding="utf-8") as out:  # one short line: appends do not interleave
            out.write(json.dumps(line) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
