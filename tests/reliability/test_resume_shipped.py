"""Kill and resume on the shipped training configs, with the DataLoader workers they ship with:
a run SIGKILLed at a chosen batch or a random instant and resumed with ``--ckpt_path last`` ends
with every tensor, counter, record and logged metric of a run that never stopped.

CI runs the demo selector and the demo tuner (trial-size overlays, 1 worker each as shipped),
killed just after their first ``last.ckpt``: the case that trained an epoch's batches again
when workers were on. ``-m slow`` runs the whole matrix (:data:`SLOW_SETUPS`: the paper
selector's options, the ``frozen`` and ``ranknet`` ablations, the paper tuner on FSDP2 with 2
CPU processes, the demo configs at full size): at the epoch boundary, mid-epoch, at random
instants, and with the worker count changed between the kill and the resume.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from kill_harness import kill_and_resume, kill_at
from kill_points import kill_at_arg
from resume_compare import checkpoint_step, same_fit
from resume_runs import Runs, tail
from resume_setups import (
    CI_SETUPS,
    DEMO_TUNER,
    PAPER_SELECTOR,
    PAPER_TUNER_FSDP2,
    RANKNET,
    SLOW_SETUPS,
    Setup,
)

RANDOM_TRIALS = 3  # per setup, under -m slow


def _final_step(ref: Path, setup: Setup) -> int:
    step = checkpoint_step(ref / setup.root / "checkpoints" / "last.ckpt")
    assert step is not None
    return step


def _kill_at(
    runs: Runs,
    setup: Setup,
    *points: tuple[int, int],
    first_extra: tuple[str, ...] = (),
    rerun_extra: tuple[str, ...] = (),
    label: str = "",
    ignore_config: tuple[str, ...] = (),
) -> Path:
    """A run of ``setup`` killed before batch ``point`` = (epoch, batch), resumed (with
    ``--ckpt_path last``) and killed at the next point, if any, and so on, then resumed to the
    end; compared with the baseline."""
    ref = runs.baseline(setup)
    final = _final_step(ref, setup)
    run = runs.new(setup, label or "kill-" + "-".join(f"{e}-{b}" for e, b in points))
    resume = ("--ckpt_path", "last")
    killed = [
        setup.argv(run, *(resume if i else ()), *kill_at_arg("train", e, b), *first_extra)
        for i, (e, b) in enumerate(points)
    ]
    trial = kill_at(
        runs.server,
        killed,
        setup.argv(run, *resume, *rerun_extra),
        run,
        lambda: runs.finished(run, setup, final),
        runs.env,
        points=[f"epoch {e} batch {b}" for e, b in points],
    )
    runs.record(setup, trial)
    try:
        same_fit(ref, run, setup, ignore_config)
    except AssertionError as e:
        raise AssertionError(f"{setup.name} killed at {points}: {e}\n{tail(run)}") from e
    return run


@pytest.mark.parametrize("setup", CI_SETUPS, ids=lambda s: s.name)
def test_demo_config_killed_after_its_first_checkpoint_resumes_exactly(
    setup: Setup, runs: Runs
) -> None:
    """The demo selector and tuner as shipped (1 DataLoader worker), at trial size, SIGKILLed as
    epoch 1 starts, just after the first ``last.ckpt``: the resumed run's checkpoints are
    ``torch.equal`` to the uninterrupted run's, tensor for tensor (weights, optimiser state),
    and so are its epoch, step, records and metrics. (The case where a loader whose workers
    prefetch as its iterator is built, before Lightning sets the epoch, would train epoch 0's
    batches again in epoch 1.)"""
    _kill_at(runs, setup, setup.kills[0])


SLOW_POINTS = [
    pytest.param(s, p, id=f"{s.name}-epoch{p[0]}-batch{p[1]}")
    for s in SLOW_SETUPS
    for p in s.kills
    if not (s in CI_SETUPS and p == s.kills[0])  # those run in CI
]


@pytest.mark.slow
@pytest.mark.parametrize(("setup", "point"), SLOW_POINTS)
def test_killed_at_a_chosen_batch_resumes_exactly(
    setup: Setup, point: tuple[int, int], runs: Runs
) -> None:
    """Every setup, killed at the epoch boundary and mid-epoch (mid-window of gradient
    accumulation where there is one; after a step checkpoint where the config writes them)."""
    _kill_at(runs, setup, point)


@pytest.mark.slow
@pytest.mark.parametrize(
    "setup", [s for s in SLOW_SETUPS if "full" not in s.name], ids=lambda s: s.name
)
def test_killed_at_random_instants_resumes_exactly(setup: Setup, runs: Runs) -> None:
    """Seeded random instants within the uninterrupted run's duration (start-up, training,
    validation, checkpoint writes, export); most must land before the run finished."""
    ref = runs.baseline(setup)
    final = _final_step(ref, setup)
    base = zlib.crc32(setup.name.encode())
    unfinished = 0
    for i in range(RANDOM_TRIALS):
        run = runs.new(setup, f"random-{i}")
        trial = kill_and_resume(
            runs.server,
            setup.argv(run),
            setup.argv(run, "--ckpt_path", "last"),
            run,
            runs.seconds[setup.name],
            seed=base + i,
            env=runs.env,
            finished=lambda run=run: runs.finished(run, setup, final),
        )
        runs.record(setup, trial)
        unfinished += trial.killed_unfinished
        try:
            same_fit(ref, run, setup)
        except AssertionError as e:
            raise AssertionError(f"{setup.name} random trial {i} {trial}: {e}\n{tail(run)}") from e
    assert unfinished >= RANDOM_TRIALS - 1, "most kills must land before the run finished"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setup", "point", "killed_with", "resumed_with"),
    [
        pytest.param(PAPER_SELECTOR, PAPER_SELECTOR.kills[1], 4, 2, id="paper_selector-4-to-2"),
        pytest.param(DEMO_TUNER, DEMO_TUNER.kills[1], 4, 2, id="demo_tuner-4-to-2"),
        pytest.param(DEMO_TUNER, DEMO_TUNER.kills[0], 0, 2, id="demo_tuner-0-to-2"),
    ],
)
def test_worker_count_may_change_between_kill_and_resume(
    setup: Setup, point: tuple[int, int], killed_with: int, resumed_with: int, runs: Runs
) -> None:
    """Nothing random is drawn in or for the workers and the batch order is (seed, epoch)'s: a
    run killed with one worker count and resumed with another ends as an uninterrupted run
    with the second (its saved config names the resumed run's count)."""
    workers = ("--data.init_args.num_workers",)
    _kill_at(
        runs,
        setup,
        point,
        first_extra=(*workers, str(killed_with)),
        rerun_extra=(*workers, str(resumed_with)),
        label=f"workers-{killed_with}-{resumed_with}",
        ignore_config=("num_workers:",),  # the baseline's count, not the resumed run's
    )


@pytest.mark.slow
@pytest.mark.parametrize("setup", [PAPER_SELECTOR, PAPER_TUNER_FSDP2], ids=lambda s: s.name)
def test_killed_twice_resumes_exactly(setup: Setup, runs: Runs) -> None:
    """Killed at the epoch boundary, resumed, killed again mid-epoch after a step checkpoint,
    resumed: the second resume continues that epoch (it starts it over if the first resumed
    epoch is not counted as started, as Lightning leaves it)."""
    _kill_at(runs, setup, *setup.kills)


@pytest.mark.slow
@pytest.mark.parametrize(
    "setup", [PAPER_TUNER_FSDP2, PAPER_SELECTOR, RANKNET], ids=lambda s: s.name
)
def test_rerun_of_a_finished_fit_changes_nothing(setup: Setup, runs: Runs) -> None:
    """A fit run to its end, then rerun with ``--ckpt_path last`` (a kill that landed after the
    end): the rerun trains nothing and its folder, checkpoints included, ends as the
    uninterrupted run's. FSDP2's ``last`` is written at the final batch's end (a step
    checkpoint), where the rerun closes the epoch again: it must not save ``last`` once more
    (with the epoch counted twice)."""
    ref = runs.baseline(setup)
    run = runs.new(setup, "rerun-finished")
    assert runs.server.run(setup.argv(run), run, run / "log.txt", runs.env) == 0, tail(run)
    assert runs.finished(run, setup, _final_step(ref, setup))
    rerun = setup.argv(run, "--ckpt_path", "last")
    assert runs.server.run(rerun, run, run / "log.txt", runs.env) == 0, tail(run)
    same_fit(ref, run, setup)
