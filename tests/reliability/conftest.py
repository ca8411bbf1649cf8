"""Session fixtures of the reliability tests: a fork server and the demo chain run once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# the trials' comparisons live in helper modules: their asserts say what differed
pytest.register_assert_rewrite("resume_compare")

from kill_harness import ForkServer  # noqa: E402
from reliability_helpers import SECRET_ENV, Chain, build_chain, run_reference  # noqa: E402
from resume_runs import Runs  # noqa: E402


@pytest.fixture(scope="session")
def fork_server() -> Iterator[ForkServer]:
    server = ForkServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def chain(tmp_path_factory: pytest.TempPathFactory, fork_server: ForkServer) -> Chain:
    """The demo chain (selector fit, predict, select, tuner fit, test) run once, uninterrupted,
    with the API key in the environment: the reference of every crash-resume trial."""
    chain = build_chain(tmp_path_factory.mktemp("chain"))
    run_reference(chain, fork_server, SECRET_ENV)
    return chain


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, fork_server: ForkServer) -> Runs:
    """Run folders of the shipped configs' trials and their uninterrupted baselines."""
    return Runs(tmp_path_factory.mktemp("shipped"), fork_server, SECRET_ENV)
