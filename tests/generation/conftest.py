"""Fixtures for the generation tests: the fake chat-completions server (see ``fakeapi``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from fakeapi import KEY_ENV, SECRET, FakeAPI, _make_handler, _Server


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    """A running fake API on 127.0.0.1 and the key in its environment variable."""
    state = FakeAPI()
    server = _Server(("127.0.0.1", 0), _make_handler(state))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    monkeypatch.setenv(KEY_ENV, SECRET)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def mlstore(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the whole session (creating the sqlite schema takes seconds)."""
    return str(tmp_path_factory.mktemp("mlruns"))
