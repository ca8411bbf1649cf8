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

import importlib.util
import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from biomedvital.llm.server_common import ChildServer, LocalServerError, die_with_parent

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


class HFServer(ChildServer):
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

    scratch_prefix = "biomedvital-hf-serve-"
    stop_timeout_s = 15.0
    poll_s = 0.2

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
        super().__init__(host, port, startup_timeout_s)
        self.folder = model_folder(folder)
        self.served_name = served_name
        self.device, self.dtype = device, dtype
        self.continuous_batching = continuous_batching

    def describe(self) -> str:
        return f"transformers serve for {self.folder}"

    def command(self) -> list[str]:
        """The server's command line (run in the scratch folder holding the served name)."""
        cmd = [sys.executable, "-m", "biomedvital.llm.hf_server", self.served_name]
        cmd += ["--host", self.host, "--port", str(self.port), "--device", self.device]
        cmd += ["--dtype", self.dtype, "--log-level", "warning"]
        if self.continuous_batching:
            cmd.append("--continuous-batching")
        return cmd

    def check_installed(self) -> None:
        for name in ("fastapi", "uvicorn"):
            if importlib.util.find_spec(name) is None:
                raise LocalServerError(
                    f"{LOCAL_HF_PREFIX} endpoints run `transformers serve`, which needs {name}: "
                    "pip install -e '.[dev]' (or pip install fastapi uvicorn)"
                )

    def prepare(self, scratch: Path) -> Path:
        """``transformers serve`` names a model by its path: the served name is a link to the
        model folder in the server's working folder."""
        link = scratch / "models" / self.served_name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(self.folder, target_is_directory=True)
        return scratch / "models"

    def child_env(self) -> dict[str, str]:
        env = {**super().child_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # the package must import from the child's folder as from ours (an editable checkout)
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        return env

    def ready(self) -> bool:
        """``/v1/models`` lists the served name as loaded."""
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
