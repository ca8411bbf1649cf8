"""`make demo` runs every stage of the chain (a dry run of the Makefile, nothing executed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_demo_runs_every_stage_once_in_order() -> None:
    plan = subprocess.run(
        ["make", "-n", "-B", "demo"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    stages = re.findall(r"-m biomedvital ([a-z-]+)(?: --config (\S+))?", plan)
    wanted = [
        ("generate", "conf/demo/generate.yaml"),
        ("rate", "conf/demo/rate.yaml"),
        ("fit", "conf/demo/selector.yaml"),
        ("predict", "conf/demo/selector.yaml"),
        ("fit", "conf/demo/tuner.yaml"),
        ("test", "conf/eval/demo_vqa.yaml"),  # the VQA scores
        ("test", "conf/eval/demo_chat.yaml"),  # the chat answers the judge scores
        ("judge", "conf/demo/judge.yaml"),
    ]
    for stage in wanted:
        assert stages.count(stage) == 1, stage
    assert stages.index(("test", "conf/eval/demo_chat.yaml")) < stages.index(wanted[-1])
    assert stages.index(("fit", "conf/demo/tuner.yaml")) < stages.index(wanted[5])
