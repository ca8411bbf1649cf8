"""Fixtures for the annotation tests: demo items over real images, servers stopped after each
test, and Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from annotation_helpers import CHROMIUM, CHROMIUM_ARGS, AnnotateServer


@pytest.fixture(scope="session")
def demo_pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(items file, image root): the demo's preference pairs as items to annotate."""
    from biomedvital.annotation.items import write_demo_items

    root = tmp_path_factory.mktemp("annotation-demo")
    return write_demo_items(root / "demo", root / "items.jsonl")


@pytest.fixture
def servers() -> Iterator[list[AnnotateServer]]:
    """Servers started by a test are stopped after it, whatever happens."""
    started: list[AnnotateServer] = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's headless Chromium (a fresh profile per launch), never a downloaded browser."""
    if not CHROMIUM.exists():
        pytest.skip(
            "needs /usr/bin/chromium (Debian package chromium; .ci/run installs it): "
            "apt-get install -y chromium chromium-driver"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
