"""Where a result came from: git state and content hashes, recorded with every run."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    """Return the commit SHA and whether the work tree differs from it.

    Outside a git checkout (an installed wheel) the values say so instead of failing: a run
    must never be refused for lack of git, but it must not pretend to a commit either.
    """
    cwd = Path(cwd)
    sha = _git(["rev-parse", "HEAD"], cwd)
    if not sha:
        return {"git_sha": "unknown", "git_dirty": "unknown"}
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"git_sha": sha, "git_dirty": "true" if status else "false"}
