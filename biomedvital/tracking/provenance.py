"""Where a result came from: git state and content hashes, recorded with every run."""

from __future__ import annotations

import subprocess
from pathlib import Path

_SOURCE_DIR = Path(__file__).resolve().parents[1]
"""The ``biomedvital`` package's own directory: its checkout is the code a run used, whatever
the working directory of the process."""


def _git(args: list[str], cwd: Path) -> str | None:
    # --no-optional-locks: ``status`` would otherwise refresh the index under .git/index.lock,
    # and a run killed meanwhile (SIGKILL, preemption) would leave the lock in the user's
    # checkout, breaking their next git command
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(cwd: str | Path | None = None) -> dict[str, str]:
    """Return the commit SHA of the code and whether the work tree differs from it.

    By default the checkout described is the one holding the installed ``biomedvital`` package,
    not the process's working directory (a run started from /tmp or another repository must not
    record that one's commit); ``cwd`` names another checkout explicitly. Untracked files count
    as dirty, since a new unversioned module or config may have shaped the result (outputs are
    git-ignored, so they do not). Where git cannot tell, a value is ``"unknown"``: outside a
    checkout (an installed wheel), or when the package's files are not tracked by the checkout
    around them (a virtualenv inside another repository). A run is never refused for lack of
    git, but it must not pretend to a commit or a clean tree either.
    """
    unknown = {"git_sha": "unknown", "git_dirty": "unknown"}
    if cwd is None:
        where = _SOURCE_DIR
        # The package must be part of that checkout, not merely lie under its directory.
        if _git(["ls-files", "--error-unmatch", "--", "__init__.py"], where) is None:
            return unknown
    else:
        where = Path(cwd)
    sha = _git(["rev-parse", "--verify", "HEAD"], where)
    if not sha:
        return unknown
    status = _git(["status", "--porcelain"], where)
    if status is None:
        return {"git_sha": sha, "git_dirty": "unknown"}
    return {"git_sha": sha, "git_dirty": "true" if status else "false"}


_BYTECODE = (".pyc", ".pyo")


def library_hash(root: str | Path | None = None) -> str:
    """A content hash of the ``biomedvital`` package as it is on disk (16 hex digits).

    It covers the files git would commit under the package, tracked or not (ignored ones and
    bytecode left out) with their working-tree bytes: an uncommitted edit changes it,
    a commit elsewhere in the repository (docs, configs) does not. Outside a checkout every
    file but bytecode counts. A grid stage whose library hash changed runs again; every MLflow
    run carries it as the ``library_hash`` tag, so a report can tell which code made a figure.
    """
    import hashlib

    where = Path(root) if root is not None else _SOURCE_DIR
    listed = None
    if _git(["ls-files", "--error-unmatch", "--", "__init__.py"], where) is not None:
        out = _git(
            ["ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "."], where
        )
        if out is not None:
            listed = [name for name in out.split("\0") if name]
    if listed is None:
        listed = [str(p.relative_to(where)) for p in where.rglob("*") if p.is_file()]
    listed = [n for n in listed if "__pycache__" not in n.split("/") and not n.endswith(_BYTECODE)]
    h = hashlib.sha256()
    for name in sorted(set(listed)):
        path = where / name
        if not path.is_file():  # tracked but deleted in the work tree: its absence counts
            continue
        h.update(name.encode("utf-8") + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]
