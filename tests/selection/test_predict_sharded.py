"""Scoring on 2 processes (DDP, gloo) writes what one process writes: alternate chunks per
rank, parts merged in chunk order, an id held by chunks of two ranks scored once (the first),
bad records counted once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_process import run_cli
from test_selector_cli import _config

from biomedvital.cli import main


def _files(root: Path) -> tuple[bytes, dict]:
    manifest = json.loads((root / "scores.jsonl.manifest.json").read_text())
    for key in ("mlflow_run_id", "output"):
        manifest.pop(key)
    return (root / "scores.jsonl").read_bytes(), manifest


@pytest.mark.heavy
def test_two_processes_score_what_one_scores(tmp_path: Path, pool: dict[str, Path]) -> None:
    cfg = _config(tmp_path, pool)
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "1"])
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    # after the fit, in chunks of 5: an unreadable line; in chunk 5 (rank 1's) the id of line 0
    # (chunk 0, rank 0's: found at the merge), then that of line 5 (chunk 1: found by rank 1)
    lines = pool["candidates"].read_text().splitlines()
    extra = ["{not json", lines[0], lines[5]]
    pool["candidates"].write_text("\n".join(lines + extra) + "\n")
    n = len(lines) + len(extra)
    assert [i // 5 for i in range(len(lines), n)] == [4, 5, 5]
    args = [
        "--config", str(cfg), "--ckpt_path", str(ckpt),
        "--data.init_args.on_bad_record", "skip", "--data.init_args.predict_chunk", "5",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 processes on 2 cores: the same float sums
    try:
        main(["predict", *args, "--trainer.default_root_dir", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    run_cli(
        "predict", *args, "--trainer.default_root_dir", tmp_path / "two",
        "--trainer.devices", "2", "--trainer.strategy", "ddp",
    )  # fmt: skip

    scores, manifest = _files(tmp_path / "one")
    assert _files(tmp_path / "two") == (scores, manifest)
    assert manifest["scored"] == n - 3
    assert manifest["skipped_by_reason"] == {"invalid_json": 1, "duplicate_id": 2}
    assert sum(manifest["score_histogram"].values()) == n - 3
    dups = [e for e in manifest["skipped_examples"] if "duplicate id" in e]  # in file order
    assert [json.loads(x)["id"] in e for x, e in zip(extra[1:], dups, strict=True)] == [True] * 2
    assert [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".")] == []


def test_scores_are_written_not_kept(tmp_path: Path, pool: dict[str, Path]) -> None:
    """The writer streams every score to disk; Lightning's copy of every batch's output (its
    default for ``predict``) would grow with the pool, so it is turned off."""
    from lightning.pytorch import Trainer

    from biomedvital.data.pool import FilePool
    from biomedvital.selection import ScoreWriter, SelectorDataModule, SelectorModule

    model = SelectorModule(backbone="tiny:tiny-clip", head_hidden=[16], cache_dir=str(tmp_path))
    dm = SelectorDataModule(FilePool(**{k: str(v) for k, v in pool.items()}), num_workers=0)
    out = tmp_path / "scores.jsonl"
    trainer = Trainer(
        accelerator="cpu", logger=False, callbacks=[ScoreWriter(str(out))],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    assert trainer.predict(model, datamodule=dm) is None
    assert len(out.read_text().splitlines()) == len(pool["candidates"].read_text().splitlines())
