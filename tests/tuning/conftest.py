"""Fixtures for the tuning tests: the demo pool's real images and a small selected.json."""

from __future__ import annotations

from pathlib import Path

import pytest
from tuning_helpers import selected_from_demo

from biomedvital.data.demo import materialize_demo


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_demo(tmp_path_factory.mktemp("demo") / "pool").root


@pytest.fixture
def selected(demo_root: Path, tmp_path: Path) -> Path:
    return selected_from_demo(demo_root, tmp_path / "selected" / "selected.json")
