"""Crash and resume: each stage is SIGKILLed at a seeded random instant, rerun, and compared with
an uninterrupted run (the session's reference chain): identical final outputs, no record lost or
duplicated, no temporary or lock file left.

``fit`` (selector and tuner) reruns with ``--ckpt_path last``; ``predict``, ``select`` and
``test`` rerun the same command. CI runs 2 trials per stage; ``-m slow`` runs 20.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kill_harness import ForkServer, kill_and_resume
from reliability_helpers import SECRET_ENV, Chain, _json, leftovers

STAGES = ("selector_fit", "predict", "select", "tuner_fit", "test")
CI_TRIALS = 2
SLOW_TRIALS = 20


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _same_checkpoint(a: Path, b: Path) -> None:
    ca = torch.load(a, map_location="cpu", weights_only=True)
    cb = torch.load(b, map_location="cpu", weights_only=True)
    assert (ca["epoch"], ca["global_step"]) == (cb["epoch"], cb["global_step"])
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key


def _same_bytes(ref: Path, got: Path, *names: str) -> None:
    for name in names:
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name


def _same_json(ref: Path, got: Path, *names: str) -> None:
    for name in names:
        a, b = _json(ref / name), _json(got / name)
        if isinstance(a, dict) and "best_checkpoint" in a:
            a["best_checkpoint"] = Path(a["best_checkpoint"] or "").name
            b["best_checkpoint"] = Path(b["best_checkpoint"] or "").name
        assert b == a, name


def _same_config(ref: Path, got: Path) -> None:
    """The same resolved config, but for the ``ckpt_path`` of the resumed run and the MLflow
    run it continues (the logger's ``run_id``)."""

    def lines(p: Path) -> list[str]:
        return [
            x
            for x in p.read_text().splitlines()
            if not x.startswith("ckpt_path:") and not x.strip().startswith("run_id:")
        ]

    assert lines(got) == lines(ref)


def _selector_fit(ref: Path, got: Path) -> None:
    r, g = ref / "selector", got / "selector"
    assert _listing(g / "checkpoints") == _listing(r / "checkpoints")
    _same_checkpoint(r / "checkpoints" / "last.ckpt", g / "checkpoints" / "last.ckpt")
    _same_json(r, g, "run.fit.json")
    _same_config(r / "config.fit.yaml", g / "config.fit.yaml")


def _predict(ref: Path, got: Path) -> None:
    r, g = ref / "selector", got / "selector"
    _same_bytes(r, g, "scores.jsonl", "config.predict.yaml")
    _same_json(r, g, "scores.jsonl.manifest.json")
    ids = [json.loads(x)["id"] for x in (g / "scores.jsonl").read_text().splitlines()]
    assert (
        len(ids)
        == len(set(ids))
        == json.loads((g / "scores.jsonl.manifest.json").read_text())["scored"]
    )


def _select(ref: Path, got: Path) -> None:
    r, g = ref / "selected", got / "selected"
    assert _listing(g) == _listing(r)
    _same_bytes(r, g, "selected.json")
    _same_json(r, g, "manifest.json")


def _tuner_fit(ref: Path, got: Path) -> None:
    r, g = ref / "tuner", got / "tuner"
    _same_checkpoint(r / "checkpoints" / "last.ckpt", g / "checkpoints" / "last.ckpt")
    _same_json(r, g, "run.fit.json", "export/run.json", "export/data_manifest.json")
    _same_config(r / "config.fit.yaml", g / "config.fit.yaml")
    _same_config(r / "export" / "config.yaml", g / "export" / "config.yaml")
    files = _listing(r / "export")
    assert _listing(g / "export") == files
    _same_bytes(
        r / "export", g / "export", *(f for f in files if f not in ("run.json", "config.yaml"))
    )


def _test(ref: Path, got: Path) -> None:
    r, g = ref / "eval", got / "eval"
    _same_bytes(r, g, "predictions.jsonl", "scores.json", "config.test.yaml")
    _same_json(r, g, "run.test.json")


COMPARE: dict[str, Callable[[Path, Path], None]] = {
    "selector_fit": _selector_fit,
    "predict": _predict,
    "select": _select,
    "tuner_fit": _tuner_fit,
    "test": _test,
}


def _trials(server: ForkServer, chain: Chain, stage: str, n: int, tmp: Path) -> int:
    """``n`` trials of ``stage``; returns how many runs were killed mid-way (logged under the
    chain's folder, ``trials.jsonl``)."""
    first = chain.argv[stage]
    rerun = chain.resume.get(stage, first)
    base = zlib.crc32(stage.encode())
    killed = 0
    duration = chain.seconds[stage]  # kill instants are drawn within it
    for i in range(n):
        cwd = tmp / f"{stage}-{i}"
        cwd.mkdir()
        trial = kill_and_resume(server, first, rerun, cwd, duration, seed=base + i, env=SECRET_ENV)
        if trial.finished_in is not None:  # ran faster than the reference: aim earlier
            duration = min(duration, trial.finished_in)
        try:
            COMPARE[stage](chain.ref, cwd)
            assert leftovers(cwd) == []
        except AssertionError as e:
            log = (cwd / "log.txt").read_text()[-3000:]
            raise AssertionError(f"{stage} trial {i} {trial}: {e}\n{log}") from e
        killed += trial.killed
        with open(chain.root / "trials.jsonl", "a") as f:
            f.write(json.dumps({"stage": stage, **vars(trial), "killed": trial.killed}) + "\n")
    return killed


@pytest.mark.parametrize("stage", STAGES)
def test_kill_and_resume(stage: str, fork_server: ForkServer, chain: Chain, tmp_path: Path) -> None:
    """A short version for CI: 2 trials per stage, SIGKILLed at seeded random instants."""
    _trials(fork_server, chain, stage, CI_TRIALS, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_kill_and_resume_many(
    stage: str, fork_server: ForkServer, chain: Chain, tmp_path: Path
) -> None:
    """The long version: 20 trials per stage, most of them killed mid-run."""
    assert _trials(fork_server, chain, stage, SLOW_TRIALS, tmp_path) >= SLOW_TRIALS // 2


def test_reference_outputs_complete(chain: Chain) -> None:
    """The uninterrupted runs left every output and no temporary or lock file."""
    ref = chain.ref
    for name in (
        "selector/checkpoints/last.ckpt",
        "selector/run.fit.json",
        "selector/scores.jsonl",
        "selected/selected.json",
        "tuner/export/merged/config.json",
        "tuner/export/run.json",
        "eval/predictions.jsonl",
    ):
        assert (ref / name).is_file(), name
    assert leftovers(ref) == []
