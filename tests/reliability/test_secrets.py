"""The API key never leaves the environment: the stages run with a recognisable key set (the
session's reference chain: selector fit, predict, select, tuner fit, test; then ``generate`` and
``rate`` against the fake chat API, which must receive it), and every log, saved config, output
file, MLflow param, tag, metric key and artifact is scanned: the key appears nowhere."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

import pytest
from reliability_helpers import KEY_ENVS, SECRET, Chain

from biomedvital.cli import main

FAKEAPI = Path(__file__).resolve().parents[1] / "generation" / "fakeapi.py"


def _fakeapi() -> ModuleType:
    if "fakeapi" in sys.modules:
        return sys.modules["fakeapi"]
    spec = importlib.util.spec_from_file_location("fakeapi", FAKEAPI)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fakeapi"] = module
    spec.loader.exec_module(module)
    return module


def _needles() -> list[bytes]:
    """The key as written anywhere: plain, and its distinctive tail (a truncated or escaped
    copy still holds it)."""
    return [SECRET.encode(), SECRET[-12:].encode()]


def _files_holding_key(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(n in data for n in _needles()):
                hits.append(str(path.relative_to(root)))
    return hits


def _store_rows_holding_key(db: Path) -> list[str]:
    """Every text cell of the MLflow database: params, tags, metric keys, run names, artifact
    locations..."""
    hits = []
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - table names from sqlite
                for cell in row:
                    text = cell if isinstance(cell, str | bytes) else str(cell)
                    if isinstance(text, str):
                        text = text.encode()
                    if any(n in text for n in _needles()):
                        hits.append(f"{table}: {row!r}"[:200])
    return hits


def test_api_key_appears_nowhere(
    chain: Chain,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    fakeapi = _fakeapi()
    api_iter = fakeapi.running_api(monkeypatch)
    api = next(api_iter)
    try:
        for name in KEY_ENVS:
            monkeypatch.setenv(name, SECRET)
        inputs = fakeapi.write_inputs(tmp_path / "in", n_figures=3)
        common = [
            "--client.base_url", api.base_url, "--client.model", "fake",
            "--client.api_key_env", "BIOMEDVITAL_TEST_KEY", "--client.max_attempts", "1",
            "--store", str(chain.store), "--progress", "false",
        ]  # fmt: skip
        gen = tmp_path / "generated"
        main(
            [
                "generate",
                "--figures", str(inputs["figures"]),
                "--image_root", str(inputs["image_root"]),
                "--demonstrations", str(inputs["demonstrations"]),
                "--out", str(gen),
                "--min_exchanges", "2",
                *common,
            ]
        )  # fmt: skip
        main(
            [
                "rate",
                "--candidates",
                str(gen / "candidates.jsonl"),
                "--out",
                str(tmp_path / "rated"),
                *common,
            ]
        )
        assert (tmp_path / "rated" / "ratings.jsonl").is_file()
        # the key was really used: it went to the API, in the Authorization header only
        assert api.auth and all(a == f"Bearer {SECRET}" for a in api.auth)
    finally:
        api_iter.close()

    out, err = capfd.readouterr()
    assert SECRET not in out and SECRET not in err, "the key was printed"
    assert _files_holding_key(chain.ref) == [], (
        "an output, config or log of the chain holds the key"
    )
    assert _files_holding_key(tmp_path) == [], "a generate/rate output holds the key"
    assert _files_holding_key(chain.store) == [], "an MLflow artifact holds the key"
    assert _store_rows_holding_key(chain.store / "mlflow.db") == [], "an MLflow row holds the key"
    # the scan does see what it looks for
    probe = tmp_path / "probe.txt"
    probe.write_text(f"key={SECRET}")
    assert _files_holding_key(tmp_path) == ["probe.txt"]
