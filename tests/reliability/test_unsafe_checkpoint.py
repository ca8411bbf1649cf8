"""Checkpoints are read with ``weights_only=True``: a checkpoint carrying a pickled payload (an
object whose ``__reduce__`` runs a command) is refused with a clear error, and the payload never
runs, through every loader: the CLI's ``--ckpt_path`` (a file, or ``last`` found by Lightning),
the evaluator's ``checkpoint=`` and the run-lineage lookup. Only ``--weights_only false``, the
user's explicit flag, unpickles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from reliability_helpers import selector_config

from biomedvital.cli import main
from biomedvital.tracking.checkpoints import UnsafeCheckpointError, load_checkpoint


class Payload:
    """Pickles as a call to ``os.system`` that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "epoch": 0, "hyper_parameters": {"x": Payload(marker)}}, path)
    return path


def _config(tmp: Path) -> Path:
    cfg = selector_config(tmp / "demo", tmp / "mlruns", epochs=1)
    cfg["trainer"]["default_root_dir"] = str(tmp / "out")
    path = tmp / "selector.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_load_checkpoint_refuses_a_payload(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(evil)
    assert str(evil) in str(e.value) and "system" in str(e.value)
    assert "--weights_only false" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("verb", ["predict", "fit", "validate"])
def test_cli_ckpt_path_file_refused(tmp_path: Path, verb: str) -> None:
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        main([verb, "--config", str(_config(tmp_path)), "--ckpt_path", str(evil)])
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # refused before anything was built or written


def test_cli_ckpt_path_last_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--ckpt_path last`` is resolved and loaded by Lightning itself: still weights_only."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    _evil(tmp_path / "out" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="last.ckpt: refused to load"):
        main(["fit", "--config", str(_config(tmp_path)), "--ckpt_path", "last"])
    assert not marker.exists()


def test_evaluator_checkpoint_refused(tmp_path: Path) -> None:
    from biomedvital.evaluation.vqa_eval import VQAEvaluator

    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        VQAEvaluator(checkpoint=str(evil)).build()
    assert not marker.exists()


def test_lineage_lookup_refuses(tmp_path: Path) -> None:
    from biomedvital.tracking.callbacks import _trained_by

    marker = tmp_path / "pwned"
    with pytest.raises(UnsafeCheckpointError):
        _trained_by(str(_evil(tmp_path / "evil.ckpt", marker)))
    assert not marker.exists()


def test_only_the_explicit_flag_unpickles(tmp_path: Path) -> None:
    """``trusted=True`` (``--weights_only false``) is the one way to a full unpickle."""
    marker = tmp_path / "ran"
    load_checkpoint(_evil(tmp_path / "trusted.ckpt", marker), trusted=True)
    assert marker.exists()
