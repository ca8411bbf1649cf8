"""requirements.lock agrees with pyproject.toml: it was written from the dependencies as they are
(fingerprint), every requirement of the package and of each extra is met by a locked version,
every locked package carries hashes, and no line names a machine's path or index."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _locked() -> dict[str, list[tuple[str, str]]]:
    """Locked versions by package: (version, marker) per entry (a package may have one per
    Python range)."""
    entries: dict[str, list[tuple[str, str]]] = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(
            r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line
        )
        if m:
            name, version, marker = m.groups()
            entries.setdefault(canonicalize_name(name), []).append((version, marker or ""))
    return entries


def _project() -> dict:
    return _tool("lock_fingerprint").tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_lock_was_written_from_this_pyproject() -> None:
    fp = _tool("lock_fingerprint")
    assert fp.recorded(LOCK) == fp.fingerprint(REPO), (
        "pyproject.toml's dependencies (or requirements-pins.txt) changed since "
        "requirements.lock was written: run make lock"
    )


def test_fingerprint_follows_the_dependencies(tmp_path: Path) -> None:
    fp = _tool("lock_fingerprint")
    for name in ("pyproject.toml", "requirements-pins.txt"):
        (tmp_path / name).write_text((REPO / name).read_text())
    before = fp.fingerprint(tmp_path)
    text = (tmp_path / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(
        text.replace("\ndependencies = [", '\ndependencies = [\n  "six>=1.16",', 1)
    )
    assert fp.fingerprint(tmp_path) != before
    (tmp_path / "pyproject.toml").write_text("# a comment\n" + text)
    assert fp.fingerprint(tmp_path) == before  # comments and layout do not count


@pytest.mark.parametrize("group", ["dependencies", "dev", "ui", "report"])
def test_every_requirement_is_met_by_a_locked_version(group: str) -> None:
    project = _project()
    requirements = (
        project["dependencies"]
        if group == "dependencies"
        else project["optional-dependencies"][group]
    )
    env = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.7"}
    env.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
    locked = _locked()
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        versions = [
            v
            for v, marker in locked.get(canonicalize_name(req.name), [])
            if not marker or _marker_holds(marker, env)
        ]
        assert versions, f"{req.name} ({group}) is not in requirements.lock: run make lock"
        assert all(req.specifier.contains(v, prereleases=True) for v in versions), (
            f"{text} ({group}): requirements.lock has {versions}: run make lock"
        )


def _marker_holds(marker: str, env: dict[str, str]) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate(env)


def test_mlflow_and_its_skinny_part_are_locked_together() -> None:
    locked = _locked()
    assert locked["mlflow"] == locked["mlflow-skinny"] == locked["mlflow-tracing"]


def test_lock_pins_hashes_and_no_machine_paths() -> None:
    text = LOCK.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 3)[3])
    for block in blocks:
        assert "--hash=sha256:" in block, f"no hash: {block.splitlines()[0]}"
    assert not re.search(r"file:|/opt/|/home/|/root/|/tmp/|--find-links|--index-url", text)
    pins = _tool("lock_fingerprint").pins(REPO / "requirements-pins.txt")
    for pin in pins:  # torch and torchvision as pinned (the builds the machines hold on disk)
        name, version = pin.split("==")
        assert [v for v, _ in _locked()[canonicalize_name(name)]] == [version]


def test_uv_sources_carry_pips_local_sources() -> None:
    uv_sources = _tool("uv_sources")
    settings = {
        "find-links": "/srv/wheels",
        "extra-index-url": "file:///srv/simple https://mirror.example/simple",
    }
    assert uv_sources.uv_options(settings) == [
        "--find-links",
        "/srv/wheels",
        "--extra-index-url",
        "file:///srv/simple",
        "--extra-index-url",
        "https://mirror.example/simple",
        "--index-strategy",
        "unsafe-best-match",
    ]
    assert uv_sources.uv_options({}) == []
