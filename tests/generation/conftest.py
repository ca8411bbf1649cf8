"""Fixtures for the generation tests: the fake chat-completions server (see ``fakeapi``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakeapi import FakeAPI, running_api


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    """A running fake API on 127.0.0.1 and the key in its environment variable."""
    yield from running_api(monkeypatch)


@pytest.fixture(scope="session")
def mlstore(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the whole session (creating the sqlite schema takes seconds)."""
    return str(tmp_path_factory.mktemp("mlruns"))
