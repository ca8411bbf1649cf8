"""What the two local servers (llama.cpp in :mod:`~biomedvital.llm.local_server`, ``transformers
serve`` in :mod:`~biomedvital.llm.hf_server`) share: a child process on a free loopback port with
its log in a scratch folder, started with retries when the port is taken, waited for until it
answers, stopped with the run, at interpreter exit, and (Linux) when the process that started it
dies. A module of its own, so that neither server module imports the other."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any

PARENT_ENV = "BIOMEDVITAL_SERVER_PARENT"
"""Set for a server process: the pid it must not outlive (:func:`die_with_parent`)."""


class LocalServerError(RuntimeError):
    """The local server could not be started (missing model or package, early exit, timeout)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at the moment (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen | None, timeout_s: float) -> None:
    """Terminate a server process still running, kill it after ``timeout_s``, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def die_with_parent() -> None:
    """In a server process, on Linux: have the kernel SIGTERM it when the process that started it
    dies (``PR_SET_PDEATHSIG``), and leave now if it already has: a killed verb leaves no
    orphan."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        sys.exit("the process that started this server is gone")


LIVE_SERVERS: weakref.WeakSet[ChildServer] = weakref.WeakSet()
"""The servers started and not yet stopped (stopped at interpreter exit)."""


@atexit.register
def _stop_all() -> None:
    for server in list(LIVE_SERVERS):
        server.stop()


class ChildServer:
    """An OpenAI-compatible server as a child process of this one, on ``host:port``
    (``port=0``: a free one, drawn again if another process takes it before the server binds).

    ``with Server(...) as srv:`` starts it and waits until :meth:`ready`; leaving the block stops
    it, also on exceptions. A subclass gives its :meth:`command`, its :meth:`ready` check, and
    may add to :meth:`child_env`, :meth:`prepare` and :meth:`check_installed`.
    """

    scratch_prefix = "biomedvital-server-"
    stop_timeout_s = 10.0
    poll_s = 0.1

    def __init__(self, host: str, port: int, startup_timeout_s: float) -> None:
        self.host, self.port = host, port
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._scratch: Path | None = None
        self._log: IO[bytes] | None = None

    # -- what a subclass gives ---------------------------------------------------------------

    def describe(self) -> str:
        """The server, as error messages name it."""
        return "the local server"

    def command(self) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the server answers as it should once started (polled until true)."""
        raise NotImplementedError

    def check_installed(self) -> None:
        """Raise :class:`LocalServerError` naming what to install when the server cannot run."""

    def child_env(self) -> dict[str, str]:
        """The server's environment: ours, idle threads asleep, tied to this process's life."""
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep instead of spinning
        env.pop(PARENT_ENV, None)
        if threading.current_thread() is threading.main_thread():
            # the server dies with this process (Linux; not tied to a thread that may end first)
            env[PARENT_ENV] = str(os.getpid())
        return env

    def prepare(self, scratch: Path) -> Path | None:
        """Set up the scratch folder before the start; the server's working folder (``None``:
        ours)."""
        return None

    # -- the life of the process ------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``http://127.0.0.1:PORT/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> Any:
        """Start the server and wait until it is ready; a clear error (with the server's last
        output) if it is not."""
        if self.alive:
            return self
        self.check_installed()
        chosen = self.port
        for attempt in range(3):  # a free port can be taken between our probe and its bind
            self.port = chosen or free_port(self.host)
            try:
                self._spawn()
                self._wait_ready()
                return self
            except LocalServerError as err:
                self.stop()
                in_use = "address already in use" in str(err).lower()
                if not in_use or chosen or attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout_s: float | None = None) -> None:
        """Terminate the server (kill it after ``timeout_s``) and remove its scratch folder."""
        proc, self.proc = self.proc, None
        stop_process(proc, self.stop_timeout_s if timeout_s is None else timeout_s)
        LIVE_SERVERS.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines the server wrote (stdout and stderr)."""
        path = self._scratch / "server.log" if self._scratch is not None else None
        if path is None or not path.is_file():
            return ""
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])

    def _spawn(self) -> None:
        self._scratch = Path(tempfile.mkdtemp(prefix=self.scratch_prefix))
        cwd = self.prepare(self._scratch)
        env = self.child_env()
        self._log = open(self._scratch / "server.log", "wb")  # noqa: SIM115 - the child's output
        self.proc = subprocess.Popen(
            self.command(),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        LIVE_SERVERS.add(self)

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise LocalServerError(
                    f"{self.describe()} exited with code {code} before it was ready; "
                    f"its last output:\n{self.log_tail()}"
                )
            if self.ready():
                return
            if time.monotonic() > deadline:
                raise LocalServerError(
                    f"{self.describe()} was not ready on {self.base_url} within "
                    f"{self.startup_timeout_s:.0f}s; its last output:\n{self.log_tail()}"
                )
            time.sleep(self.poll_s)
