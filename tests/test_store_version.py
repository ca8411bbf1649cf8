"""A store another MLflow schema wrote is refused in one line naming both versions, by the verbs
(pipeline and trainer) and by the UI, before MLflow touches it; the suite's own store opens."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from biomedvital.cli import main
from biomedvital.tracking.mlflow import tracking_uri
from biomedvital.tracking.store_version import (
    RECORD,
    StoreVersionError,
    check_store,
    installed_schema,
)

REPO = Path(__file__).resolve().parents[1]
GOOD = REPO / "tests" / "bad_inputs" / "_good"
NEWER = "ffffffffffff"  # a schema revision no installed MLflow knows


def _store(path: Path) -> Path:
    """A store as the suite writes it (tables at the installed schema, writer recorded)."""
    tracking_uri(path)
    return path


def _as_written_by(store: Path, revision: str, mlflow_version: str | None) -> None:
    """Make the store look written by another MLflow: its schema revision, and the writer a
    suite of that MLflow would have recorded (``None``: a store no suite recorded)."""
    with sqlite3.connect(store / "mlflow.db") as con:
        con.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    record = store / RECORD
    if mlflow_version is None:
        record.unlink()
    else:
        record.write_text(json.dumps({"mlflow": mlflow_version, "schema": revision}))


def test_suite_store_opens_and_records_its_writer(tmp_path: Path) -> None:
    store = _store(tmp_path / "mlruns")
    version, head, known = installed_schema()
    assert head in known and len(known) > 10
    assert json.loads((store / RECORD).read_text()) == {"mlflow": version, "schema": head}
    check_store(store)  # no error


def test_newer_store_is_one_line_naming_both_versions(tmp_path: Path) -> None:
    store = _store(tmp_path / "mlruns")
    _as_written_by(store, NEWER, "99.1.0")
    version = installed_schema()[0]
    with pytest.raises(StoreVersionError) as info:
        check_store(store)
    msg = str(info.value)
    assert msg.startswith(
        f"{store / 'mlflow.db'}: this store was written by MLflow 99.1.0; the suite has {version}: "
    )
    assert "\n" not in msg
    _as_written_by(store, NEWER, None)
    with pytest.raises(StoreVersionError, match=f"a newer MLflow \\(schema {NEWER}\\)"):
        check_store(store)


def test_older_store_names_mlflows_upgrade(tmp_path: Path) -> None:
    store = _store(tmp_path / "mlruns")
    version, head, known = installed_schema()
    older = sorted(known - {head})[0]
    _as_written_by(store, older, "2.9.0")
    with pytest.raises(StoreVersionError) as info:
        check_store(store)
    assert str(info.value).startswith(
        f"{store / 'mlflow.db'}: this store was written by MLflow 2.9.0; the suite has {version}: "
    )
    assert f"mlflow db upgrade sqlite:///{store / 'mlflow.db'}" in str(info.value)


def test_pipeline_and_trainer_verbs_refuse_a_newer_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "written"
    subprocess.run(  # written in another process, as a store from another checkout would be
        [
            sys.executable,
            "-c",
            f"from biomedvital.tracking.mlflow import tracking_uri as t; t({str(store)!r})",
        ],
        check=True,
        cwd=REPO,
    )
    _as_written_by(store, NEWER, "99.1.0")
    select = ["select", "--scores", str(GOOD / "scores.jsonl")]
    select += [
        "--candidates",
        str(GOOD / "candidates.jsonl"),
        "--out",
        "sel",
        "--store",
        str(store),
    ]
    with pytest.raises(StoreVersionError, match="written by MLflow 99.1.0"):
        main(select)
    config = yaml.safe_load((REPO / "conf" / "demo" / "selector.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["store"] = str(store)
    config["trainer"]["default_root_dir"] = "fit"
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(StoreVersionError, match="written by MLflow 99.1.0"):
        main(["fit", "--config", "fit.yaml"])


def test_ui_refuses_a_newer_store_in_one_line(tmp_path: Path) -> None:
    store = _store(tmp_path / "mlruns")
    _as_written_by(store, NEWER, "99.1.0")
    done = subprocess.run(
        [sys.executable, "-m", "biomedvital", "ui", "--store", str(store), "--port", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"biomedvital: error: {store / 'mlflow.db'}: this store was written by MLflow 99.1.0; "
        f"the suite has {installed_schema()[0]}: install the locked environment that wrote it "
        "(make setup from that checkout), or point --store at another folder"
    ]
