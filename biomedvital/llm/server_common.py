"""What the two local servers (llama.cpp in :mod:`~biomedvital.llm.local_server`, ``transformers
serve`` in :mod:`~biomedvital.llm.hf_server`) share: their error and a free port (a module of its
own, so that neither server module imports the other at import time or through a function)."""

from __future__ import annotations

import contextlib
import socket
import subprocess


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
