"""Scoring on 2 processes (DDP, gloo) writes what one process writes: alternate chunks per
rank, parts merged in chunk order, an id held by chunks of two ranks scored once (the first),
bad records counted once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_selector_cli import _config

from biomedvital.cli import main

REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> tuple[bytes, dict]:
    manifest = json.loads((root / "scores.jsonl.manifest.json").read_text())
    for key in ("mlflow_run_id", "output"):
        manifest.pop(key)
    return (root / "scores.jsonl").read_bytes(), manifest


def test_two_processes_score_what_one_scores(tmp_path: Path, pool: dict[str, Path]) -> None:
    cfg = _config(tmp_path, pool)
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "1"])
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    # after the fit: an id again 3 chunks later (another rank's chunk) and an unreadable line
    lines = pool["candidates"].read_text().splitlines()
    first = json.loads(lines[0])
    with pool["candidates"].open("a") as f:
        f.write(
            "{not json\n"
            + json.dumps({**first, "conversations": first["conversations"][:2]})
            + "\n"
        )
    n = len(lines) + 2
    assert ((n - 1) // 5) % 2 == 1  # the repeat is in a chunk of rank 1, its first of rank 0
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
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    two = subprocess.run(
        [sys.executable, "-m", "biomedvital", "predict", *args,
         "--trainer.default_root_dir", str(tmp_path / "two"),
         "--trainer.devices", "2", "--trainer.strategy", "ddp"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    scores, manifest = _files(tmp_path / "one")
    assert _files(tmp_path / "two") == (scores, manifest)
    assert manifest["scored"] == n - 2
    assert manifest["skipped_by_reason"] == {"invalid_json": 1, "duplicate_id": 1}
    assert sum(manifest["score_histogram"].values()) == n - 2
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
