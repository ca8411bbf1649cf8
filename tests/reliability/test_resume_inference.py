"""Kill and rerun for inference with DataLoader workers, and for a ``make grid`` cell: ``predict``
(the selector's scores) and ``test`` (``conf/eval/vqa_rad.yaml``, 4 workers as shipped) SIGKILLed
at a chosen batch, at random instants and with the worker count changed, rerun with the same
command: byte-identical outputs; a grid cell killed between its stages and rerun with
``make grid``: the cell of an uninterrupted run. All under ``-m slow`` (the CI trials of
``predict`` and ``test`` are in ``test_crash_resume.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kill_harness import kill_and_resume, kill_at
from kill_points import kill_at_arg
from reliability_helpers import leftovers
from resume_compare import config_lines, mlflow_history, read_record, same_checkpoint
from resume_runs import Runs, tail
from resume_setups import DEMO_SELECTOR, DEMO_TUNER, PAPER_SELECTOR, REPO, Setup

pytestmark = pytest.mark.slow
RANDOM_TRIALS = 3


@dataclass(frozen=True)
class Inference:
    """A ``predict`` or ``test`` run of a shipped config at trial size.

    Args:
        name: the trial's name.
        verb: ``predict`` or ``test``.
        setup: the fit whose baseline provides the model (its checkpoint or its export) and
            whose run folder layout is used.
        configs: the shipped configs; ``argv`` adds the setup's overlay (``predict``) or one
            of its own (``test``) and ``extra``.
        root: the output folder as shipped.
        outputs: files compared byte for byte.
        records: JSON files compared but for run ids.
        batches: batches in the run (kill points are drawn among them).
    """

    name: str
    verb: str
    setup: Setup
    configs: tuple[str, ...]
    root: str
    outputs: tuple[str, ...]
    records: tuple[str, ...]
    batches: int
    extra: tuple[str, ...] = ()

    def argv(self, run: Path, model: Path, *more: str) -> list[str]:
        configs = [a for c in self.configs for a in ("--config", str(REPO / c))]
        if self.verb == "predict":
            return [
                "predict", *configs, "--config", str(run / "overlay.yaml"),
                "--ckpt_path", str(model), *self.extra, *more,
            ]  # fmt: skip
        (run / "eval.yaml").write_text(yaml.safe_dump(_eval_overlay(model)))
        return ["test", *configs, "--config", str(run / "eval.yaml"), *self.extra, *more]


def _eval_overlay(merged: Path) -> dict[str, Any]:
    """``conf/eval/vqa_rad.yaml`` at trial size: the demo tuner's export answering the demo VQA
    set (VQA-RAD layout), 8 new tokens, batches of 4; its 4 workers as shipped."""
    return {
        "model": {"init_args": {"model": f"local-dir:{merged}", "decoding": {"max_new_tokens": 8}}},
        "data": {
            "init_args": {
                "data": "data/demo_vqa/demo_vqa.json",
                "image_root": "data/demo/images",
                "batch_size": 4,
            }
        },
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False},
    }


_SCORES = ("scores.jsonl",)
_SCORE_RECORDS = ("scores.jsonl.manifest.json",)
CHUNK = ("--data.init_args.predict_chunk", "8")  # 48 demo candidates: 6 batches
PREDICT_DEMO = Inference(
    "predict_demo_selector", "predict", DEMO_SELECTOR, DEMO_SELECTOR.configs,
    DEMO_SELECTOR.root, _SCORES, _SCORE_RECORDS, 6, CHUNK,
)  # fmt: skip
PREDICT_PAPER = Inference(
    "predict_paper_selector", "predict", PAPER_SELECTOR, PAPER_SELECTOR.configs,
    PAPER_SELECTOR.root, _SCORES, _SCORE_RECORDS, 6, CHUNK,
)  # fmt: skip
TEST_VQA_RAD = Inference(
    "test_vqa_rad", "test", DEMO_TUNER, ("conf/eval/vqa_rad.yaml",), "outputs/eval/vqa_rad",
    ("predictions.jsonl", "scores.json"), ("run.test.json",), 8,
)  # fmt: skip
INFERENCE = (PREDICT_DEMO, PREDICT_PAPER, TEST_VQA_RAD)


def _model(runs: Runs, inf: Inference) -> Path:
    ref = runs.baseline(inf.setup)
    if inf.verb == "predict":
        return ref / inf.setup.root / "checkpoints" / "last.ckpt"
    return ref / inf.setup.root / "export" / "merged"


class InferenceRuns:
    """The uninterrupted run of each inference setup, once per session."""

    def __init__(self, runs: Runs) -> None:
        self.runs = runs
        self.refs: dict[str, Path] = {}
        self.seconds: dict[str, float] = {}

    def new(self, inf: Inference, label: str) -> Path:
        return self.runs.new(inf.setup, f"{inf.name}-{label}")

    def ref(self, inf: Inference) -> Path:
        if inf.name not in self.refs:
            model = _model(self.runs, inf)
            run = self.new(inf, "uninterrupted")
            t0 = time.monotonic()
            rc = self.runs.server.run(inf.argv(run, model), run, run / "log.txt", self.runs.env)
            self.seconds[inf.name] = time.monotonic() - t0
            assert rc == 0, tail(run)
            self.refs[inf.name] = run
        return self.refs[inf.name]


@pytest.fixture(scope="session")
def inference(runs: Runs) -> InferenceRuns:
    return InferenceRuns(runs)


def _same_outputs(
    inf: Inference, ref: Path, got: Path, ignore_config: tuple[str, ...] = ()
) -> None:
    r, g = ref / inf.root, got / inf.root
    for name in inf.outputs:
        assert (g / name).read_bytes() == (r / name).read_bytes(), name
    for name in inf.records:
        assert read_record(g / name, got) == read_record(r / name, ref), name
    config = f"config.{inf.verb}.yaml"
    want = config_lines(r / config, ref, ignore_config)
    assert config_lines(g / config, got, ignore_config) == want, config
    if inf.verb == "test":  # the rerun's MLflow run logged what the uninterrupted one did
        record = f"{inf.root}/run.test.json"
        assert mlflow_history(got, record) == mlflow_history(ref, record)
    assert leftovers(got / "outputs") == [], "temporary, lock or journal files left"


def _finished(run: Path, inf: Inference) -> bool:
    return all((run / inf.root / name).exists() for name in inf.outputs)


@pytest.mark.parametrize("inf", INFERENCE, ids=lambda i: i.name)
def test_inference_killed_at_a_chosen_batch_reruns_to_the_same_bytes(
    inf: Inference, inference: InferenceRuns
) -> None:
    """Killed before its middle batch (the workers have prefetched past it), rerun."""
    ref = inference.ref(inf)
    run = inference.new(inf, "kill")
    model = _model(inference.runs, inf)
    batch = inf.batches // 2
    kill_at(
        inference.runs.server,
        [inf.argv(run, model, *kill_at_arg(inf.verb, 0, batch))],
        inf.argv(run, model),
        run,
        lambda: _finished(run, inf),
        inference.runs.env,
        points=[f"{inf.verb} batch {batch}"],
    )
    try:
        _same_outputs(inf, ref, run)
    except AssertionError as e:
        raise AssertionError(f"{inf.name}: {e}\n{tail(run)}") from e


@pytest.mark.parametrize("inf", INFERENCE, ids=lambda i: i.name)
def test_inference_killed_at_random_instants_reruns_to_the_same_bytes(
    inf: Inference, inference: InferenceRuns
) -> None:
    ref = inference.ref(inf)
    model = _model(inference.runs, inf)
    unfinished = 0
    for i in range(RANDOM_TRIALS):
        run = inference.new(inf, f"random-{i}")
        trial = kill_and_resume(
            inference.runs.server,
            inf.argv(run, model),
            inf.argv(run, model),
            run,
            inference.seconds[inf.name],
            seed=zlib.crc32(inf.name.encode()) + i,
            env=inference.runs.env,
            finished=lambda run=run: _finished(run, inf),
        )
        unfinished += trial.killed_unfinished
        try:
            _same_outputs(inf, ref, run)
        except AssertionError as e:
            raise AssertionError(f"{inf.name} random trial {i} {trial}: {e}\n{tail(run)}") from e
    assert unfinished >= RANDOM_TRIALS - 1, "most kills must land before the run finished"


@pytest.mark.parametrize("inf", INFERENCE, ids=lambda i: i.name)
def test_inference_rerun_with_another_worker_count_gives_the_same_bytes(
    inf: Inference, inference: InferenceRuns
) -> None:
    """Killed with 4 workers, rerun with 2 (``test`` resumes from its answer journal)."""
    ref = inference.ref(inf)
    run = inference.new(inf, "workers")
    model = _model(inference.runs, inf)
    batch = inf.batches // 2
    workers = "--data.init_args.num_workers"
    kill_at(
        inference.runs.server,
        [inf.argv(run, model, workers, "4", *kill_at_arg(inf.verb, 0, batch))],
        inf.argv(run, model, workers, "2"),
        run,
        lambda: _finished(run, inf),
        inference.runs.env,
        points=[f"{inf.verb} batch {batch}"],
    )
    _same_outputs(inf, ref, run, ignore_config=("num_workers:",))


# -- make grid -------------------------------------------------------------------------------

GRID_STAGES = ("select", "tune", "test")


def _grid_file(runs: Runs, scores: Path, path: Path) -> Path:
    """A chained grid of one cell: select the top half of the demo selector's ``scores``, tune
    the demo tuner (shipped, 1 epoch) on them, test it with ``conf/eval/vqa_rad.yaml`` (its 4
    workers)."""
    overlay = _eval_overlay(Path("{cell_dir}/tuner/export/merged"))
    test_args = {
        "model.init_args.model": "local-dir:{cell_dir}/tuner/export/merged",
        "model.init_args.decoding.max_new_tokens": overlay["model"]["init_args"]["decoding"][
            "max_new_tokens"
        ],
        **{f"data.init_args.{k}": v for k, v in overlay["data"]["init_args"].items()},
        "trainer.accelerator": "cpu",
        "trainer.enable_progress_bar": False,
        "trainer.default_root_dir": "{cell_dir}/eval",
    }
    spec = {
        "stages": {
            "select": {
                "verb": "select",
                "args": {
                    "scores": str(scores),
                    "candidates": str(runs.data / "demo" / "candidates.jsonl"),
                    "out": "{cell_dir}/selected",
                    "top_percent": 50,
                },
                "done": "{cell_dir}/selected/manifest.json",
            },
            "tune": {
                "verb": "fit",
                "config": [str(REPO / "conf/demo/tuner.yaml")],
                "args": {
                    "data.init_args.data": "{cell_dir}/selected/selected.json",
                    "trainer.default_root_dir": "{cell_dir}/tuner",
                    "trainer.max_epochs": 1,
                    "trainer.enable_progress_bar": False,
                },
                "done": "{cell_dir}/tuner/export/run.json",
            },
            "test": {
                "verb": "test",
                "config": [str(REPO / "conf/eval/vqa_rad.yaml")],
                "args": test_args,
                "done": "{cell_dir}/eval/scores.json",
            },
        },
        "cells": {"half": {}},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Grid:
    """``make grid`` of :func:`_grid_file` in run folders (a stand-in venv whose python is this
    one, so that make installs nothing)."""

    def __init__(self, runs: Runs, scores: Path) -> None:
        self.runs = runs
        self.venv = runs.root / "venv"
        (self.venv / "bin").mkdir(parents=True, exist_ok=True)
        python = self.venv / "bin" / "python"
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        python.chmod(0o755)
        (self.venv / ".installed").touch()
        self.file = _grid_file(runs, scores, runs.root / "g.yaml")

    def folder(self, label: str) -> Path:
        run = self.runs.root / f"grid-{label}"
        run.mkdir()
        (run / "data").symlink_to(self.runs.data, target_is_directory=True)
        # make's own files, as in a checkout (its sub-make reads ./Makefile; the venv stamp
        # depends on ./pyproject.toml and ./requirements.lock, older than the stand-in's stamp)
        for name in ("Makefile", "pyproject.toml", "requirements.lock"):
            (run / name).symlink_to(REPO / name)
        return run

    def start(self, run: Path) -> subprocess.Popen:
        env = {**os.environ, **{k: v for k, v in self.runs.env.items() if v is not None}}
        return subprocess.Popen(
            ["make", "--no-print-directory", "grid", f"VENV={self.venv}", "GRID=g",
             f"GRID_FILE={self.file}"],
            cwd=run, env=env, stdout=open(run / "log.txt", "a"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def cell(self, run: Path) -> Path:
        return run / "outputs" / "grids" / "g" / "half"


@pytest.fixture(scope="session")
def grid(runs: Runs, inference: InferenceRuns) -> tuple[Grid, Path]:
    """The grid and its uninterrupted run."""
    scores = inference.ref(PREDICT_DEMO) / PREDICT_DEMO.root / "scores.jsonl"
    g = Grid(runs, scores)
    ref = g.folder("uninterrupted")
    proc = g.start(ref)
    assert proc.wait(timeout=1800) == 0, tail(ref)
    return g, ref


def _same_cell(ref: Path, got: Path) -> None:
    r, g = ref, got
    for name in ("selected/selected.json", "eval/predictions.jsonl", "eval/scores.json"):
        assert (g / name).read_bytes() == (r / name).read_bytes(), name
    assert read_record(g / "selected" / "manifest.json", got) == read_record(
        r / "selected" / "manifest.json", ref
    )
    same_checkpoint(
        r / "tuner" / "checkpoints" / "last.ckpt", g / "tuner" / "checkpoints" / "last.ckpt"
    )
    for p in sorted((r / "tuner" / "export").rglob("*.safetensors")):
        assert (g / p.relative_to(r)).read_bytes() == p.read_bytes(), p.name
    assert _identities(g) == _identities(r)
    cell = json.loads((g / "cell.json").read_text())
    want = json.loads((r / "cell.json").read_text())
    for record in (cell, want):
        record.pop("finished")
        for stage in record["stages"]:
            # the rerun ran only the stages the killed run had not finished, and says why
            for key in ("ran", "state", "reasons"):
                stage.pop(key)
    assert cell == want


def _finished_stages(stages: Path) -> dict[str, Any]:
    """The stages a cell's ``stages.json`` records as finished (none while it is missing)."""
    text = stages.read_text() if stages.exists() else ""
    return json.loads(text or "{}").get("stages", {})


def _identities(cell: Path) -> dict[str, Any]:
    """Each finished stage's identity (command, configs, inputs' hashes, library), without
    what names the run (its time, MLflow run, the inputs' modification times)."""
    records = _finished_stages(cell / "stages.json")
    for record in records.values():
        record.pop("finished")
        record.pop("mlflow_run_id")
        for meta in record["inputs"].values():
            meta.pop("mtime_ns")
    return records


@pytest.mark.parametrize("after", GRID_STAGES[:-1])
def test_grid_cell_killed_between_stages_reruns_to_the_same_cell(
    after: str, grid: tuple[Grid, Path]
) -> None:
    """``make grid`` SIGKILLed (make, the cell's runner and its stage process) as soon as the
    cell records ``after`` done; ``make grid`` again finishes the cell as an uninterrupted run
    did, running only the stages not yet done."""
    g, ref = grid
    run = g.folder(f"kill-after-{after}")
    proc = g.start(run)
    stages = g.cell(run) / "stages.json"
    deadline = time.monotonic() + 1800
    while after not in _finished_stages(stages):
        assert proc.poll() is None, f"make ended before the kill:\n{tail(run)}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (g.cell(run) / "cell.json").exists()  # killed before the cell was done
    proc = g.start(run)
    assert proc.wait(timeout=1800) == 0, tail(run)
    record = json.loads((g.cell(run) / "cell.json").read_text())
    ran = {s["stage"]: s["ran"] for s in record["stages"]}
    done_before = GRID_STAGES[: GRID_STAGES.index(after) + 1]
    assert ran == {s: s not in done_before for s in GRID_STAGES}
    _same_cell(g.cell(ref), g.cell(run))
    assert leftovers(run / "outputs") == []
