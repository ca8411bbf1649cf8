"""``python -m biomedvital ui``: MLflow's web UI on the suite's store (``make ui``).

The store is checked before the server starts: one written by another MLflow schema is refused
in one line naming both versions (:mod:`biomedvital.tracking.store_version`), where MLflow's own
server would start and then fail on every page with a traceback in its log.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from biomedvital.tracking.store_version import check_store


def ui_command(store: Path, host: str, port: int) -> list[str]:
    """MLflow's ``ui`` command serving ``store``: runs and artifacts as the verbs wrote them."""
    root = store.resolve()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        (root / "artifacts").as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",  # one user: MLflow's default 4 cost 4 imports of the server on 2 cores
        "1",
    ]


def ui(store: str = "mlruns", host: str = "127.0.0.1", port: int = 5000) -> None:
    """Serve the MLflow UI on the store until stopped (Ctrl-C).

    Args:
        store: the store folder the verbs write (``mlruns``: its ``mlflow.db`` and artifacts).
        host: where to listen (loopback: the UI has no login).
        port: the port (``make ui UI_PORT=5001`` when 5000 is taken).
    """
    root = Path(store)
    db = root.resolve() / "mlflow.db"
    if not db.is_file():
        raise FileNotFoundError(f"{db}: no MLflow store here yet (make demo writes one)")
    check_store(root.resolve())
    print(f"MLflow UI on {db}: http://{host}:{port} (Ctrl-C stops it)", flush=True)
    command = ui_command(root, host, port)
    env = dict(os.environ)
    # MLflow's job runner (GenAI evaluation jobs: 8 more processes) has no use on a store of runs
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execve(command[0], command, env)
