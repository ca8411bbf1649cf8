"""``python -m biomedvital`` in a child process, as a user runs it: multi-process runs (DDP,
FSDP2) have Lightning launch the other ranks from that process, which a test cannot host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """This environment less a launcher's rank variables (the child is the launcher), plus
    ``extra``."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def cli_command(verb: str, *args: Any) -> list[str]:
    return [sys.executable, "-m", "biomedvital", verb, *map(str, args)]


def run_cli(verb: str, *args: Any, timeout: float = 300, env: dict[str, str] | None = None) -> str:
    """Run the verb from the repository root; its output (stdout and stderr) when it succeeds,
    else an assertion error holding the output's end."""
    done = subprocess.run(
        cli_command(verb, *args),
        cwd=REPO,
        env=cli_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout
