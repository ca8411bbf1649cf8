"""A benchmark result records the conditions it was measured under, and its published copy (the
file docs/performance.md quotes) is made by committed code only (bench/_common.py)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_common", REPO / "bench" / "_common.py")
common = importlib.util.module_from_spec(_spec)
sys.modules["_common"] = common
_spec.loader.exec_module(common)


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "PUBLISHED", tmp_path / "results" / "published")
    return tmp_path / "results"


def test_a_result_records_load_commit_and_command(results: Path) -> None:
    path = common.save("b", {"ratio": 1.5, "s": common.spread([2.0, 3.0, 4.0], 2)})
    assert path == results / "b.json"
    got = json.loads(path.read_text())
    assert got["ratio"] == 1.5
    assert got["s"] == {"values": [2.0, 3.0, 4.0], "min": 2.0, "max": 4.0, "mean": 3.0, "sd": 1.0}
    assert set(got["load_average"]) == {"start", "end"}
    assert all(len(v) == 3 for v in got["load_average"].values())
    assert {"cpus", "when", "nice", "git_commit", "git_dirty", "command"} <= set(got)


def test_publish_writes_the_committed_copy(results: Path) -> None:
    path = common.save("b", {"ratio": 1.5}, publish=True)
    assert path == results / "published" / "b.json"
    assert not (results / "b.json").exists()


def test_publish_is_refused_with_uncommitted_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_uncommitted", lambda: " M bench/w_grid.py")
    parser = argparse.ArgumentParser()
    common.add_publish(parser)
    assert parser.parse_args(["--publish", "false"]).publish is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--publish", "true"])
    monkeypatch.setattr(common, "_uncommitted", lambda: "")
    assert parser.parse_args(["--publish", "true"]).publish is True
    with pytest.raises(argparse.ArgumentTypeError, match="true or false"):
        common.publish_flag("yes")
