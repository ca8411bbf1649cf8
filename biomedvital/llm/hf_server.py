"""``local-hf:DIR`` endpoints: ``transformers serve`` with a Hugging Face model folder on loopback.

``client: {base_url: local-hf:outputs/demo/tuner/export, model: biomedvital-demo}`` means "serve
this folder for the run, send the requests to it, stop it": ``transformers serve`` (it ships
with transformers; FastAPI and uvicorn come with the dev extra) answers image + text chat
completions with the folder's processor and chat template, on the GPU when there is one, else
on the CPU. ``DIR`` is a model folder (``config.json``) or an export folder whose ``merged/``
is one. The model is served under ``client.model``: ``transformers serve`` names a model by the
path it loads it from, so the server runs in a scratch folder where ``client.model`` is a
symbolic link to the model folder.

As with ``local:`` (llama.cpp) servers, the server listens on a free 127.0.0.1 port, is stopped
(terminate, then kill) when the run ends or fails, at interpreter exit, and (Linux) when the
process that started it dies; it reads no API key (loopback only) and downloads nothing
(``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Any

from biomedvital.llm.llama_server import PARENT_ENV, die_with_parent
from biomedvital.llm.server_common import LocalServerError, free_port, stop_process

LOCAL_HF_PREFIX = "local-hf:"
SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
"""Names a model can be served under (a relative path in the server's scratch folder)."""


def is_local_hf(base_url: str) -> bool:
    """Whether ``base_url`` names a model folder to serve (``local-hf:DIR``)."""
    return str(base_url).startswith(LOCAL_HF_PREFIX)


def model_folder(spec: str | Path) -> Path:
    """The model folder ``local-hf:DIR`` names: ``DIR`` with a ``config.json``, or its
    ``merged/`` (an export folder); an error naming ``DIR`` otherwise."""
    folder = Path(str(spec).removeprefix(LOCAL_HF_PREFIX)).expanduser()
    for candidate in (folder, folder / "merged"):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise LocalServerError(
        f"client.base_url {LOCAL_HF_PREFIX}{folder}: no model there (neither {folder}/config.json "
        f"nor {folder}/merged/config.json); point it at an export folder or its merged/ folder"
    )


_LIVE: weakref.WeakSet[HFServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


class HFServer:
    """``transformers serve`` for one model folder, as a child process.

    ``with HFServer(folder, "name") as srv:`` starts it on a free loopback port and waits until
    ``/v1/models`` lists the model as loaded; the server is stopped on leaving the block.

    Args:
        folder: the model folder (or ``local-hf:DIR``, see :func:`model_folder`).
        served_name: the model name requests carry (``client.model``).
        host / port: where to listen; ``port=0`` picks a free port.
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``auto`` (the weights' own) or a torch dtype name.
        continuous_batching: ``transformers serve --continuous-batching`` (text-only models;
            vision models fall back to one request at a time).
        startup_timeout_s: how long to wait for the model to load.
    """

    def __init__(
        self,
        folder: str | Path,
        served_name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        device: str = "auto",
        dtype: str = "auto",
        continuous_batching: bool = False,
        startup_timeout_s: float = 600.0,
    ) -> None:
        if not SERVED_NAME.fullmatch(served_name) or ".." in served_name.split("/"):
            raise LocalServerError(
                f"client.model {served_name!r}: a {LOCAL_HF_PREFIX} model is served under a name "
                "of letters, digits, '.', '_', '-' (and '/' between parts)"
            )
        self.folder = model_folder(folder)
        self.served_name = served_name
        self.host, self.port = host, port
        self.device, self.dtype = device, dtype
        self.continuous_batching = continuous_batching
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._scratch: Path | None = None
        self._log: Any = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``http://127.0.0.1:PORT/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> HFServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def command(self) -> list[str]:
        """The server's command line (run in the scratch folder holding the served name)."""
        cmd = [sys.executable, "-m", "biomedvital.llm.hf_server", self.served_name]
        cmd += ["--host", self.host, "--port", str(self.port), "--device", self.device]
        cmd += ["--dtype", self.dtype, "--log-level", "warning"]
        if self.continuous_batching:
            cmd.append("--continuous-batching")
        return cmd

    def start(self) -> HFServer:
        """Start the server and wait until the model is loaded; a clear error (with the
        server's last output) if it is not."""
        if self.alive:
            return self
        for name in ("fastapi", "uvicorn"):
            if importlib.util.find_spec(name) is None:
                raise LocalServerError(
                    f"{LOCAL_HF_PREFIX} endpoints run `transformers serve`, which needs {name}: "
                    "pip install -e '.[dev]' (or pip install fastapi uvicorn)"
                )
        chosen = self.port
        for attempt in range(3):  # a free port can be taken between our probe and its bind
            self.port = chosen or free_port(self.host)
            try:
                self._spawn()
                self._wait_ready()
                return self
            except LocalServerError as err:
                self.stop()
                if "address already in use" not in str(err).lower() or chosen or attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate the server (kill it after ``timeout_s``) and remove its scratch folder."""
        proc, self.proc = self.proc, None
        stop_process(proc, timeout_s)
        _LIVE.discard(self)
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
        self._scratch = Path(tempfile.mkdtemp(prefix="biomedvital-hf-serve-"))
        link = self._scratch / "models" / self.served_name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(self.folder, target_is_directory=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.pop(PARENT_ENV, None)
        if threading.current_thread() is threading.main_thread():
            env[PARENT_ENV] = str(os.getpid())  # the server dies with this process (Linux)
        # the package must import from the child's folder as from ours (an editable checkout)
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        self._log = open(self._scratch / "server.log", "wb")  # noqa: SIM115 - the child's output
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self._scratch / "models",
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        _LIVE.add(self)

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise LocalServerError(
                    f"transformers serve for {self.folder} exited with code {code} before the "
                    f"model was loaded; its last output:\n{self.log_tail()}"
                )
            if self._loaded():
                return
            if time.monotonic() > deadline:
                raise LocalServerError(
                    f"transformers serve did not load {self.folder} within "
                    f"{self.startup_timeout_s:.0f}s; its last output:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def _loaded(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                body = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        for entry in body.get("data") or [] if isinstance(body, dict) else []:
            if isinstance(entry, dict) and entry.get("id") == self.served_name:
                status = entry.get("status")
                return not isinstance(status, dict) or status.get("value") == "loaded"
        return False


def _serve(argv: list[str]) -> None:
    """``transformers serve NAME ARGS`` in this process (the scratch folder is the cwd)."""
    from transformers.cli.transformers import app  # main() would look for CLI updates online

    app(args=["serve", *argv], prog_name="transformers")


if __name__ == "__main__":
    die_with_parent()
    _serve(sys.argv[1:])
