"""git_state: the commit and dirtiness of the code a run used, told honestly or "unknown"."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from biomedvital.tracking import provenance
from biomedvital.tracking.provenance import git_state

_GIT_ID = [
    "-c",
    "user.name=test",
    "-c",
    "user.email=test@example.org",
    "-c",
    "commit.gpgsign=false",
]


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *_GIT_ID, *args], cwd=repo, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _repo(path: Path, files: dict[str, str]) -> str:
    """A git repository at ``path`` with ``files`` committed; its HEAD SHA."""
    path.mkdir(parents=True)
    _git(path, "init", "-q")
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    _git(path, "add", ".")
    _git(path, "commit", "-q", "-m", "init")
    return _git(path, "rev-parse", "HEAD")


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A checkout holding a tracked package, installed as the package git_state describes."""
    repo = tmp_path / "src"
    sha = _repo(repo, {"pkg/__init__.py": "", "pkg/mod.py": "x = 1\n"})
    monkeypatch.setattr(provenance, "_SOURCE_DIR", repo / "pkg")
    return repo, sha


def test_clean_checkout(package: tuple[Path, str]) -> None:
    _, sha = package
    assert git_state() == {"git_sha": sha, "git_dirty": "false"}


def test_an_untracked_file_makes_the_tree_dirty(package: tuple[Path, str]) -> None:
    repo, sha = package
    (repo / "pkg" / "new_module.py").write_text("y = 2\n")
    assert git_state() == {"git_sha": sha, "git_dirty": "true"}


def test_an_ignored_output_keeps_the_tree_clean(package: tuple[Path, str]) -> None:
    repo, _ = package
    (repo / ".git" / "info" / "exclude").write_text("/outputs/\n")
    (repo / "outputs").mkdir()
    (repo / "outputs" / "scores.jsonl").write_text("{}\n")
    assert git_state()["git_dirty"] == "false"


def test_the_working_directory_does_not_choose_the_checkout(
    package: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, sha = package
    other = tmp_path / "other"
    other_sha = _repo(other, {"README": "another project\n"})
    monkeypatch.chdir(other)
    assert git_state()["git_sha"] == sha != other_sha
    monkeypatch.chdir(tmp_path)  # not a checkout at all
    assert git_state()["git_sha"] == sha


def test_a_failing_git_status_is_unknown_not_clean(package: tuple[Path, str]) -> None:
    repo, sha = package
    (repo / ".git" / "index").write_bytes(b"not an index")  # rev-parse works, status fails
    assert git_state(repo) == {"git_sha": sha, "git_dirty": "unknown"}


def test_a_package_outside_any_checkout_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site-packages" / "pkg"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    monkeypatch.setattr(provenance, "_SOURCE_DIR", site)
    assert git_state() == {"git_sha": "unknown", "git_dirty": "unknown"}


def test_a_package_untracked_by_the_checkout_around_it_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A virtualenv inside another project's repository: that project's SHA is not the code's."""
    repo = tmp_path / "project"
    _repo(repo, {"README": "project\n", ".gitignore": ".venv/\n"})
    site = repo / ".venv" / "lib" / "site-packages" / "pkg"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    monkeypatch.setattr(provenance, "_SOURCE_DIR", site)
    assert git_state() == {"git_sha": "unknown", "git_dirty": "unknown"}


def test_this_package_is_described_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real package: the same answer from its checkout and from an unrelated folder."""
    monkeypatch.chdir(provenance._SOURCE_DIR)
    here = git_state()
    monkeypatch.chdir(tmp_path)
    assert git_state()["git_sha"] == here["git_sha"]


def test_reading_the_state_never_writes_the_users_index(tmp_path: Path) -> None:
    """``git status`` refreshes a stale index in place under ``.git/index.lock``: a run killed
    meanwhile would leave that lock in the user's checkout. The state is read without optional
    locks, so the index is never written (a touched file makes the refresh happen otherwise)."""
    import os

    repo = tmp_path / "repo"
    _repo(repo, {"a.py": "x = 1\n"})
    index = repo / ".git" / "index"
    os.utime(repo / "a.py", ns=(index.stat().st_mtime_ns + 2_000_000_000,) * 2)
    before = index.read_bytes()
    assert git_state(repo)["git_dirty"] == "false"
    assert index.read_bytes() == before
    _git(repo, "status", "--porcelain")  # plain git status does rewrite it
    assert index.read_bytes() != before


def test_library_hash_follows_the_package_content_not_the_commits(
    package: tuple[Path, str],
) -> None:
    """An uncommitted edit or a new file in the package changes the hash; committing it does
    not (same content), nor does a commit outside the package, bytecode, or an ignored file."""
    from biomedvital.tracking.provenance import library_hash

    repo, _ = package
    first = library_hash()
    (repo / "README.md").write_text("docs\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "docs")
    (repo / "pkg" / "__pycache__").mkdir()
    (repo / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (repo / ".gitignore").write_text("*.log\n")
    (repo / "pkg" / "run.log").write_text("noise\n")
    assert library_hash() == first
    (repo / "pkg" / "mod.py").write_text("x = 2\n")
    edited = library_hash()
    assert edited != first
    _git(repo, "commit", "-q", "-am", "edit")
    assert library_hash() == edited
    (repo / "pkg" / "new.py").write_text("")  # untracked, not ignored
    assert library_hash() != edited


def test_library_hash_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed copy (no git): every file but bytecode, by content."""
    from biomedvital.tracking.provenance import library_hash

    pkg = tmp_path / "site" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("x = 1\n")
    monkeypatch.setattr(provenance, "_SOURCE_DIR", pkg)
    first = library_hash()
    (pkg / "mod.cpython-311.pyc").write_bytes(b"\0")
    assert library_hash() == first
    (pkg / "mod.py").write_text("x = 2\n")
    assert library_hash() != first
