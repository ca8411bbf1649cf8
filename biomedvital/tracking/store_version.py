"""Which MLflow wrote the store, checked before the suite (a verb or the UI) opens it.

MLflow's sqlite schema only moves forward: a store written by a newer MLflow carries an alembic
revision the installed one has never heard of, and MLflow then stops deep inside SQLAlchemy
(``Detected out-of-date database schema``) with a traceback. The suite records, beside the
database, the MLflow version that last opened the store at its schema (``mlflow-version.json``),
so the refusal can name both versions in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

RECORD = "mlflow-version.json"


class StoreVersionError(RuntimeError):
    """The store's schema is not the installed MLflow's (written by a newer one, or older)."""


def _store_revision(db: Path) -> str | None:
    """The alembic revision of an existing sqlite store (``None``: no file, no tables yet)."""
    if not db.is_file() or db.stat().st_size == 0:
        return None
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    return str(row[0]) if row else None


def installed_schema() -> tuple[str, str, set[str]]:
    """The installed MLflow's version, its schema head revision and every revision it knows."""
    import mlflow
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config("sqlite://"))
    known = {rev.revision for rev in script.walk_revisions()}
    return mlflow.__version__, str(script.get_current_head()), known


def _recorded_writer(root: Path, revision: str) -> str | None:
    """The MLflow version recorded for ``revision`` by the suite that wrote the store."""
    try:
        record = json.loads((root / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("schema") == revision:
        return str(record.get("mlflow") or "") or None
    return None


def check_store(root: Path) -> None:
    """Refuse a store whose schema the installed MLflow cannot open, naming both versions.

    A newer store: install the environment that wrote it (or use another ``--store``); an older
    one: MLflow's own ``mlflow db upgrade`` migrates it (after a backup)."""
    db = root / "mlflow.db"
    revision = _store_revision(db)
    if revision is None:
        return
    version, head, known = installed_schema()
    if revision == head:
        return
    if revision not in known:
        writer = _recorded_writer(root, revision)
        who = f"MLflow {writer}" if writer else f"a newer MLflow (schema {revision})"
        raise StoreVersionError(
            f"{db}: this store was written by {who}; the suite has {version}: install the "
            "locked environment that wrote it (make setup from that checkout), or point "
            "--store at another folder"
        )
    writer = _recorded_writer(root, revision)
    who = f"MLflow {writer}" if writer else f"an older MLflow (schema {revision})"
    raise StoreVersionError(
        f"{db}: this store was written by {who}; the suite has {version}: back it up, "
        f"then migrate it with: mlflow db upgrade sqlite:///{db}"
    )


def record_writer(root: Path) -> None:
    """Note the installed MLflow as the store's writer (the store is at its schema head)."""
    version, head, _ = installed_schema()
    if _store_revision(root / "mlflow.db") != head:
        return
    record = {"mlflow": version, "schema": head}
    path = root / RECORD
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text(encoding="utf-8")) == record:
            return
    tmp = path.with_name(f".{RECORD}.{os.getpid()}")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        tmp.replace(path)
