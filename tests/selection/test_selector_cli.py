"""End to end through ``python -m biomedvital``: fit, predict, select, tracked in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from biomedvital.cli import main


def _config(tmp: Path, pool: dict[str, Path], **model: object) -> Path:
    out = tmp / "out"
    cfg = {
        "seed_everything": 0,
        "model": {
            "class_path": "biomedvital.selection.SelectorModule",
            "init_args": {
                "backbone": "tiny:tiny-clip",
                "head_hidden": [64, 64],
                "lr": 1e-4,
                "head_lr": 1e-3,
                "cache_dir": str(tmp / "cache"),
                **model,
            },
        },
        "data": {
            "class_path": "biomedvital.selection.SelectorDataModule",
            "init_args": {
                "pool": {
                    "class_path": "biomedvital.data.pool.FilePool",
                    "init_args": {k: str(v) for k, v in pool.items()},
                },
                "model_pairs": 128,
                "val_model_pairs": 32,
                "batch_size": 32,
                "num_workers": 0,
            },
        },
        "trainer": {
            "max_epochs": 2,
            "log_every_n_steps": 1,
            "accelerator": "cpu",
            "default_root_dir": str(out),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "biomedvital.tracking.MLflowLogger",
                "init_args": {"store": str(tmp / "mlruns"), "run_name": "t"},
            },
            "callbacks": [
                {
                    "class_path": "biomedvital.tracking.Checkpoints",
                    "init_args": {"save_last": True},  # -> <default_root_dir>/checkpoints
                },
                {
                    "class_path": "biomedvital.selection.ScoreWriter",  # -> <root>/scores.jsonl
                },
            ],
        },
    }
    path = tmp / "selector.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _runs(store: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("selection")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    for verb in (
        "fit",
        "validate",
        "test",
        "predict",
        "select",
        "score-vqa",
        "score-chat",
        "win-rate",
        "demo",
        "fetch-figures",
    ):
        assert f"  {verb} " in out, verb


def test_unknown_verb_exits_2() -> None:
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_fit_predict_select_tracked(tmp_path: Path, pool: dict[str, Path]) -> None:
    cfg = _config(tmp_path, pool)
    out = tmp_path / "out"
    main(["fit", "--config", str(cfg)])
    assert (out / "checkpoints" / "last.ckpt").is_file()
    run_record = json.loads((out / "run.fit.json").read_text())
    assert run_record["data"]["pairs"]["train"] > 0
    assert len(run_record["data"]["inputs"]["candidates"]["sha256"]) == 64
    assert run_record["git"]["git_sha"]

    client, runs = _runs(tmp_path / "mlruns")
    assert len(runs) == 1
    run = runs[0]
    for key in (
        "val/pair_acc",
        "val/align_rate",
        "val/auroc",
        "val/map",
        "val/mean_rank",
        "train/loss",
    ):
        assert key in run.data.metrics, key
    assert "git_sha" in run.data.tags and "git_dirty" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.fit.yaml", "run.fit.json"} <= artifacts

    main(["predict", "--config", str(cfg), "--ckpt_path", str(out / "checkpoints" / "last.ckpt")])
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    n_cands = len(pool["candidates"].read_text().splitlines())
    assert len(scores) == n_cands
    assert all(0.0 <= s["score"] <= 1.0 for s in scores)
    manifest = json.loads((out / "scores.jsonl.manifest.json").read_text())
    assert manifest["scored"] == n_cands and manifest["skipped"] == 0
    _, runs = _runs(tmp_path / "mlruns")
    assert runs[-1].info.run_id == manifest["mlflow_run_id"]
    assert (
        runs[-1].data.tags["upstream_run"] == run.info.run_id
    )  # predict -> the fit that trained it

    main(
        [
            "select",
            "--scores", str(out / "scores.jsonl"),
            "--candidates", str(pool["candidates"]),
            "--out", str(out / "selected"),
            "--top_percent", "50",
            "--store", str(tmp_path / "mlruns"),
        ]
    )  # fmt: skip
    selected = json.loads((out / "selected" / "selected.json").read_text())
    assert len(selected) == n_cands // 2
    best = sorted(scores, key=lambda s: -s["score"])[: n_cands // 2]
    assert {c["id"] for c in selected} == {s["id"] for s in best}
    assert selected[0]["conversations"][0]["from"] == "human"
    sel_manifest = json.loads((out / "selected" / "manifest.json").read_text())
    assert sel_manifest["kept"] == n_cands // 2
    assert sel_manifest["dropped"] == n_cands - n_cands // 2
    assert sel_manifest["upstream_run"] == manifest["mlflow_run_id"]
    _, runs = _runs(tmp_path / "mlruns")
    assert runs[-1].data.tags["upstream_run"] == manifest["mlflow_run_id"]


def test_overlay_changes_w(tmp_path: Path, pool: dict[str, Path], capsys) -> None:
    cfg = _config(tmp_path, pool)
    overlay = Path(__file__).resolve().parents[2] / "conf" / "ablation" / "w10.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg), "--config", str(overlay), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["w"] == 10.0
    assert printed["model"]["init_args"]["backbone"] == "tiny:tiny-clip"


@pytest.mark.heavy
def test_same_seed_same_scores(tmp_path: Path, pool: dict[str, Path]) -> None:
    outputs = []
    for i in range(2):
        d = tmp_path / f"run{i}"
        d.mkdir()
        cfg = _config(d, pool)
        main(["fit", "--config", str(cfg)])
        main(
            [
                "predict",
                "--config",
                str(cfg),
                "--ckpt_path",
                str(d / "out" / "checkpoints" / "last.ckpt"),
            ]
        )
        outputs.append((d / "out" / "scores.jsonl").read_text())
    assert outputs[0] == outputs[1]


def test_predict_last_uses_the_checkpoints_hyper_parameters(
    tmp_path: Path, pool: dict[str, Path]
) -> None:
    """``predict --ckpt_path last`` (the documented command) builds the model the checkpoint
    was trained as, like the explicit path: a frozen fit is not rebuilt as a finetuned one."""
    cfg = _config(tmp_path, pool)
    out = tmp_path / "out"
    main(
        ["fit", "--config", str(cfg), "--trainer.max_epochs", "1"]
        + ["--model.init_args.backbone_mode", "frozen", "--model.init_args.init_seed", "3"]
    )
    scores = []
    for ckpt in (str(out / "checkpoints" / "last.ckpt"), "last"):
        main(["predict", "--config", str(cfg), "--ckpt_path", ckpt])
        scores.append((out / "scores.jsonl").read_text())
    assert scores[0] == scores[1] and scores[0]


@pytest.mark.heavy
def test_resume_from_last(tmp_path: Path, pool: dict[str, Path]) -> None:
    """``--ckpt_path last`` continues an interrupted run to the same weights as an uninterrupted one."""
    import torch

    straight, resumed = tmp_path / "a", tmp_path / "b"
    for d in (straight, resumed):
        d.mkdir()
    cfg_a = _config(straight, pool)
    main(["fit", "--config", str(cfg_a), "--trainer.max_epochs", "2"])
    cfg_b = _config(resumed, pool)
    main(["fit", "--config", str(cfg_b), "--trainer.max_epochs", "1"])
    main(["fit", "--config", str(cfg_b), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    a = torch.load(straight / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)


def test_truncation_that_hides_answers_is_reported(tmp_path: Path, pool: dict[str, Path]) -> None:
    """Captions longer than the context push the answers out: the run says so."""
    import lightning as L

    from biomedvital.data.pool import FilePool
    from biomedvital.selection import SelectorDataModule, SelectorModule

    lines = pool["figures"].read_text().splitlines()
    long = [json.dumps({**json.loads(x), "fig_caption": "word " * 400}) for x in lines]
    pool["figures"].write_text("\n".join(long) + "\n")
    dm = SelectorDataModule(
        FilePool(**{k: str(v) for k, v in pool.items()}),
        model_pairs=64,
        val_model_pairs=16,
        num_workers=0,
    )
    model = SelectorModule(head_hidden=[8], cache_dir=str(tmp_path / "c"))
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=1,
        limit_val_batches=1,
    )
    with pytest.warns(UserWarning, match="identical after truncation"):
        trainer.fit(model, dm)
    report = dm.describe()["truncation"]
    # clinician pairs share their image: all of them collapse; model pairs only within an image
    assert (
        report["val_clinician"]["identical_after_truncation"]
        == report["val_clinician"]["checked"]
        > 0
    )
    assert 0 < report["train"]["identical_after_truncation"] < report["train"]["checked"]


def test_fresh_fit_sets_earlier_checkpoints_aside(tmp_path: Path, pool: dict[str, Path]) -> None:
    """A fit from scratch into a folder with an earlier run's checkpoints must leave its own
    ``last.ckpt`` (not Lightning's ``last-v1.ckpt`` beside a stale one); the earlier files are
    moved aside, never deleted. A resume keeps them."""
    import torch

    cfg = _config(tmp_path, pool)
    ckpts = tmp_path / "out" / "checkpoints"
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "1"])
    first = sorted(p.name for p in ckpts.glob("*.ckpt"))
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "2"])
    assert not list(ckpts.glob("*-v1.ckpt"))
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 1
    (aside,) = ckpts.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == first
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert len(list(ckpts.glob("superseded-*"))) == 1  # a resume sets nothing aside
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 2


def test_leftover_of_a_killed_attempt_is_replaced_not_versioned(
    tmp_path: Path, pool: dict[str, Path]
) -> None:
    """A run killed between its best and its ``last`` save leaves ``epoch=0-step=N.ckpt`` and
    no ``last.ckpt``; the rerun writes that name again and must replace it (Lightning's
    version counter would add ``epoch=0-step=N-v1.ckpt``: a folder unlike an uninterrupted
    run's, and a stale best checkpoint)."""
    import torch

    cfg = _config(tmp_path, pool)
    ckpts = tmp_path / "out" / "checkpoints"
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "1"])
    uninterrupted = sorted(p.name for p in ckpts.glob("*.ckpt"))
    (best,) = [ckpts / n for n in uninterrupted if n != "last.ckpt"]
    (ckpts / "last.ckpt").unlink()
    best.write_bytes(b"a torn checkpoint of the killed attempt")
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "1"])
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == uninterrupted
    assert torch.load(best, weights_only=True)["epoch"] == 0
    assert not list(ckpts.glob("superseded-*"))


def test_resumed_fit_continues_its_mlflow_run(tmp_path: Path, pool: dict[str, Path]) -> None:
    """``fit --ckpt_path last`` logs into the run that wrote the checkpoint: one training, one
    MLflow run with the metrics of every epoch, finished once the training is."""
    import torch

    cfg = _config(tmp_path, pool)
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "1"])
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    client, runs = _runs(tmp_path / "mlruns")
    fits = [r for r in runs if r.info.run_name == "t"]
    assert len(fits) == 1
    run = fits[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    history = client.get_metric_history(run.info.run_id, "val/align_rate")
    assert len(history) == 2  # epoch 0 from the first process, epoch 1 from the resumed one
    last = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["mlflow_run_id"] == run.info.run_id


@pytest.mark.heavy
def test_resume_mid_epoch_trains_the_rest_of_that_epoch(
    tmp_path: Path, pool: dict[str, Path]
) -> None:
    """A run stopped between step checkpoints in its second epoch and resumed with
    ``--ckpt_path last`` ends with the weights of a run that never stopped (the epoch's first
    batches are not trained again)."""
    import torch

    ends = []
    for name, stop in (("straight", None), ("stopped", 7)):  # 5 batches an epoch: epoch 1, batch 2
        d = tmp_path / name
        d.mkdir()
        cfg = _config(d, pool)
        raw = yaml.safe_load(cfg.read_text())
        raw["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
        cfg.write_text(yaml.safe_dump(raw))
        if stop is not None:
            main(["fit", "--config", str(cfg), "--trainer.max_steps", str(stop)])
            ckpt = torch.load(d / "out" / "checkpoints" / "last.ckpt", weights_only=True)
            assert (ckpt["epoch"], ckpt["global_step"]) == (1, stop)
            main(["fit", "--config", str(cfg), "--ckpt_path", "last"])
        else:
            main(["fit", "--config", str(cfg)])
        ends.append(torch.load(d / "out" / "checkpoints" / "last.ckpt", weights_only=True))
    a, b = ends
    assert a["global_step"] == b["global_step"] == 10
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)


def test_step_checkpoints_keep_the_validation_that_ends_their_epoch(
    tmp_path: Path, pool: dict[str, Path]
) -> None:
    """With a checkpoint every step, the epoch's last one is written before the epoch's
    validation, at the step it ends on: ``last`` is written again after it, holding what the
    validation found (the run record's metrics), and a rerun that finds the fit finished records
    the same."""
    import json

    import torch

    cfg = _config(tmp_path, pool, lr=0.05, head_lr=0.5)  # validations that differ
    raw = yaml.safe_load(cfg.read_text())
    raw["trainer"]["callbacks"][0]["init_args"].update(
        every_n_train_steps=1, monitor="val/align_rate", mode="max"
    )
    cfg.write_text(yaml.safe_dump(raw))
    main(["fit", "--config", str(cfg)])
    out = tmp_path / "out"
    record = json.loads((out / "run.fit.json").read_text())
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["biomedvital_fit_metrics"] == record["metrics"]
    main(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    assert json.loads((out / "run.fit.json").read_text())["metrics"] == record["metrics"]
