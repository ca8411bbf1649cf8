"""A seeded SIGKILL harness for the command line, with a fork server so that runs start at once.

Importing torch, Lightning, transformers and MLflow takes 10-15 s on the test machine, longer
than most tiny runs. :class:`ForkServer` imports them once in a helper process and forks one
child per command: each child is a real process (its own pid, process group, files, exit status)
that runs ``python -m biomedvital <verb> ...`` (``biomedvital.__main__``), and can be
killed with SIGKILL at any instant. :func:`kill_and_resume` kills a run at seeded random times
and reruns it until it completes; :func:`kill_at` runs one that kills itself at a chosen batch
(:mod:`kill_points`) and reruns it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PRELOAD = (
    "torch",
    "lightning.pytorch",
    "lightning.pytorch.cli",
    "transformers",
    "peft",
    "open_clip",
    "mlflow",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "biomedvital.cli",
    "biomedvital.selection",
    "biomedvital.selection.select",
    "biomedvital.tuning",
    "biomedvital.evaluation.vqa_eval",
    "biomedvital.tracking",
)

_SERVER = r"""
import importlib, json, os, runpy, sys, traceback
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "spawn":
        pid = os.fork()
        if pid == 0:  # the child: one CLI run, then exit without the server's cleanup
            code = 1
            try:
                os.setsid()
                os.chdir(cmd["cwd"])
                for k, v in cmd["env"].items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.argv = ["biomedvital", *cmd["argv"]]
                runpy.run_module("biomedvital", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif cmd["op"] == "wait":
        _, status = os.waitpid(cmd["pid"], 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"rc": rc}), flush=True)
"""


class ForkServer:
    """A process with the heavy modules imported, forking a child per CLI command."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD, env: dict[str, str] | None = None):
        env = {**os.environ, **(env or {})}
        # the children (and the other ranks a multi-process strategy starts) import the
        # harness's callbacks (kill_points) by name
        here = str(Path(__file__).parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, json.dumps(list(preload))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (rc {self.proc.poll()})")
        return json.loads(line)

    def _send(self, cmd: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def spawn(
        self, argv: list[str], cwd: Path, log: Path, env: dict[str, str | None] | None = None
    ) -> int:
        """Start ``python -m biomedvital *argv`` in ``cwd``; stdout and stderr go to ``log``."""
        return self._send(
            {"op": "spawn", "argv": argv, "cwd": str(cwd), "log": str(log), "env": env or {}}
        )["pid"]

    def wait(self, pid: int) -> int:
        """Exit status of a child (``-9`` when SIGKILLed)."""
        return self._send({"op": "wait", "pid": pid})["rc"]

    @staticmethod
    def kill(pid: int) -> None:
        """SIGKILL the child and anything it started (its own process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

    def run(
        self, argv: list[str], cwd: Path, log: Path, env: dict[str, str | None] | None = None
    ) -> int:
        return self.wait(self.spawn(argv, cwd, log, env))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Trial:
    """What happened to one interrupted run: kill times, exit codes, reruns until success."""

    seed: int | None
    kills_at: list[float | str] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)
    finished_in: float | None = None
    """Seconds the first run took when it ended before its kill instant."""
    unfinished: list[bool] = field(default_factory=list)
    """Per kill: the killed run had not written its final output (``finished`` was false)."""

    @property
    def killed(self) -> int:
        """How many of the runs were SIGKILLed (before they exited by themselves)."""
        return sum(rc == -9 for rc in self.exit_codes)

    @property
    def killed_unfinished(self) -> int:
        """How many SIGKILLs landed before the run had finished its work."""
        return sum(self.unfinished)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_and_resume(
    server: ForkServer,
    first: list[str],
    rerun: list[str],
    cwd: Path,
    duration: float,
    seed: int,
    env: dict[str, str | None] | None = None,
    kills: int = 1,
    prepare: Callable[[], None] | None = None,
    finished: Callable[[], bool] | None = None,
) -> Trial:
    """Run ``first``, SIGKILL it after a seeded random 2-95 % of ``duration`` seconds (``kills``
    times, each on the rerun), then run ``rerun`` to completion; raises if that fails. A run
    that ends before its kill time is not killed (``Trial.killed`` counts the kills);
    ``finished`` (read just after each kill) says whether the run had written its final output,
    so that a kill landing after the work (``Trial.killed_unfinished``) does not count as one."""
    rng = random.Random(seed)
    trial = Trial(seed)
    log = cwd / "log.txt"
    if prepare is not None:
        prepare()
    argv = first
    for _ in range(kills):
        pid = server.spawn(argv, cwd, log, env)
        t0 = time.monotonic()
        delay = rng.uniform(0.02, 0.95) * duration
        while time.monotonic() < t0 + delay and _alive_not_reaped(server, pid):
            time.sleep(0.01)
        if trial.finished_in is None and not _alive_not_reaped(server, pid):
            trial.finished_in = time.monotonic() - t0
        server.kill(pid)
        trial.kills_at.append(round(delay, 3))
        trial.exit_codes.append(server.wait(pid))
        if finished is not None:
            trial.unfinished.append(trial.exit_codes[-1] == -9 and not finished())
        argv = rerun
    rc = server.run(rerun, cwd, log, env)
    trial.exit_codes.append(rc)
    if rc != 0:
        raise AssertionError(
            f"rerun after kill failed (seed {seed}, rc {rc}):\n{log.read_text()[-4000:]}"
        )
    return trial


def kill_at(
    server: ForkServer,
    killed: list[list[str]],
    rerun: list[str],
    cwd: Path,
    finished: Callable[[], bool],
    env: dict[str, str | None] | None = None,
    points: list[str] | None = None,
) -> Trial:
    """Run each command of ``killed`` in turn, each of which SIGKILLs itself at a chosen batch
    (:mod:`kill_points`), checking that it was killed and had not finished (``finished``
    false: a kill after the work would prove nothing), then run ``rerun`` to completion;
    raises if any of that fails."""
    log = cwd / "log.txt"
    points = points or [f"kill {i}" for i in range(len(killed))]
    trial = Trial(None, kills_at=list(points))
    for argv, point in zip(killed, points, strict=True):
        trial.exit_codes.append(server.run(argv, cwd, log, env))
        if trial.exit_codes[-1] != -9:
            raise AssertionError(
                f"not killed at {point} (rc {trial.exit_codes[-1]}):\n{log.read_text()[-4000:]}"
            )
        trial.unfinished.append(not finished())
        if not trial.unfinished[-1]:
            raise AssertionError(f"the run killed at {point} had already finished its work")
    rc = server.run(rerun, cwd, log, env)
    trial.exit_codes.append(rc)
    if rc != 0:
        raise AssertionError(f"rerun after the kills failed (rc {rc}):\n{log.read_text()[-4000:]}")
    return trial


def _alive_not_reaped(server: ForkServer, pid: int) -> bool:
    # a finished child is a zombie until the server reaps it: /proc says which
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return _alive(pid)
    return state != "Z"
