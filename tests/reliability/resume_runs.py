"""Run folders of the shipped setups (:mod:`resume_setups`) for one test session, and the
uninterrupted baseline of each, run once and shared by every trial that compares with it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kill_harness import ForkServer, Trial
from resume_compare import checkpoint_step
from resume_setups import Setup, prepare_run

from biomedvital.data.demo import materialize_demo
from biomedvital.evaluation.demo_vqa import write_demo_vqa


def tail(run: Path) -> str:
    return (run / "log.txt").read_text()[-4000:]


class Runs:
    """Run folders of the setups under one session folder, and the uninterrupted baseline of
    each setup, run once per session (the reference of all its trials); every run gets
    ``env`` in its environment."""

    def __init__(self, root: Path, server: ForkServer, env: dict[str, str | None]) -> None:
        from biomedvital.tracking.mlflow import PipelineRun

        self.root, self.server, self.env = root, server, env
        self.data = root / "data"
        materialize_demo(self.data / "demo")
        write_demo_vqa(self.data / "demo_vqa" / "demo_vqa.json")
        self.store = root / "empty-store"
        with PipelineRun("setup", "create-store", self.store):
            pass
        self.baselines: dict[str, Path] = {}
        self.seconds: dict[str, float] = {}

    def new(self, setup: Setup, label: str) -> Path:
        return prepare_run(self.root / f"{setup.name}-{label}", setup, self.data, self.store)

    def baseline(self, setup: Setup) -> Path:
        if setup.name not in self.baselines:
            run = self.new(setup, "uninterrupted")
            t0 = time.monotonic()
            rc = self.server.run(setup.argv(run), run, run / "log.txt", self.env)
            self.seconds[setup.name] = time.monotonic() - t0
            if rc != 0:
                raise AssertionError(f"{setup.name} failed (rc {rc}):\n{tail(run)}")
            self.baselines[setup.name] = run
        return self.baselines[setup.name]

    def finished(self, run: Path, setup: Setup, final_step: int) -> bool:
        """The fit in ``run`` had finished: its run record is written, or its last checkpoint
        is at the uninterrupted run's final step."""
        last = checkpoint_step(run / setup.root / "checkpoints" / "last.ckpt")
        return (run / setup.stamp).exists() or last == final_step

    def record(self, setup: Setup, trial: Trial) -> None:
        with open(self.root / "trials.jsonl", "a") as f:
            f.write(json.dumps({"setup": setup.name, **vars(trial)}) + "\n")
