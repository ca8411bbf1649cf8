"""The tuner end to end through ``python -m biomedvital fit``: tracked, resumable, exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tuning_helpers import tuner_config

from biomedvital.cli import main
from biomedvital.data.images import ImageRoot
from biomedvital.tuning import LlavaTuner


def test_fit_logs_exports_and_reloads(tmp_path: Path, selected: Path, demo_root: Path) -> None:
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from biomedvital.tuning.conversation import prompt
    from biomedvital.tuning.models import create_llava

    cfg = tuner_config(tmp_path, selected, demo_root / "images")
    main(["fit", "--config", str(cfg)])
    out = tmp_path / "out"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tuning")
    (run,) = client.search_runs([exp.experiment_id])
    assert "train/loss" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 4  # 8 samples, batch 4, 2 epochs
    assert "train/lr_projector" in run.data.metrics

    export = out / "export"
    meta = json.loads((export / "run.json").read_text())
    assert meta["mlflow_run_id"] == run.info.run_id
    manifest = json.loads((export / "data_manifest.json").read_text())
    assert manifest["records"]["data"]["kept"] == 8
    assert manifest["inputs"]["data"]["sha256"]
    assert "truncated" in manifest and manifest["tokens"]["train"]["supervised_tokens"] > 0
    assert "LlavaTuner" in (export / "config.yaml").read_text()

    # the suite's own model: the last checkpoint, reloaded (frozen weights rebuilt from the name)
    ours = LlavaTuner.load_from_checkpoint(out / "ckpt" / "last.ckpt").eval()
    image = ImageRoot(demo_root / "images").load("ct_small.dcm")
    question = "What does this image show?"
    want = ours.generate_ids(image, question, max_new_tokens=12)

    merged = LlavaForConditionalGeneration.from_pretrained(export / "merged").eval()
    processor = AutoProcessor.from_pretrained(export / "merged")
    inputs = processor(text=prompt(question), images=image, return_tensors="pt")
    got = merged.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert got[0, inputs["input_ids"].shape[1] :].tolist() == want

    base = create_llava("tiny:tiny-llava", seed=0).model
    adapted = PeftModel.from_pretrained(base, export / "adapter").eval()
    got = adapted.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert got[0, inputs["input_ids"].shape[1] :].tolist() == want
    # training moved the weights away from the base model's
    with torch.no_grad():
        fresh = create_llava("tiny:tiny-llava", seed=0).model.eval()
        assert not torch.equal(fresh(**inputs).logits, merged(**inputs).logits)


@pytest.mark.heavy
def test_resume_from_last(tmp_path: Path, selected: Path, demo_root: Path) -> None:
    """``--ckpt_path last`` continues an interrupted run to the same weights as an uninterrupted one."""
    straight, resumed = tmp_path / "a", tmp_path / "b"
    for d in (straight, resumed):
        d.mkdir()
    images = demo_root / "images"
    main(["fit", "--config", str(tuner_config(straight, selected, images))])
    interrupted = tuner_config(resumed, selected, images, stop_after=0)
    main(["fit", "--config", str(interrupted)])
    assert torch.load(resumed / "out" / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 0
    main(["fit", "--config", str(tuner_config(resumed, selected, images)), "--ckpt_path", "last"])
    a = torch.load(straight / "out" / "ckpt" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "out" / "ckpt" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all("lora_" in k or "multi_modal_projector" in k for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)


@pytest.mark.heavy
def test_resume_mid_epoch_trains_the_rest_of_the_epoch(
    tmp_path: Path, selected: Path, demo_root: Path
) -> None:
    """A crash after 3 of 4 steps (mid-epoch 1; checkpoints every step): ``--ckpt_path last``
    trains the epoch's remaining batch, not the epoch's first again, and ends at the
    uninterrupted run's weights. Each epoch has its own batch order (the sampler's epoch)."""
    straight, resumed = tmp_path / "a", tmp_path / "b"
    images = demo_root / "images"
    log = {d: d / "batches.jsonl" for d in (straight, resumed)}
    for d in (straight, resumed):
        d.mkdir()

    def config(d: Path, *extra: dict) -> str:
        record = {"class_path": "tuning_helpers.RecordBatches", "init_args": {"path": str(log[d])}}
        return str(
            tuner_config(d, selected, images, callbacks=[*extra, record], every_n_train_steps=1)
        )

    main(["fit", "--config", config(straight)])
    crash = {"class_path": "tuning_helpers.CrashAtStep", "init_args": {"step": 3}}
    with pytest.raises(RuntimeError, match="simulated crash before step 3"):
        main(["fit", "--config", config(resumed, crash)])
    main(["fit", "--config", config(resumed), "--ckpt_path", "last"])

    def batches(d: Path) -> list[list]:
        return [json.loads(x) for x in log[d].read_text().splitlines()]

    want = batches(straight)
    assert [(e, b) for e, b, _ in want] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [i for *_, i in want[:2]] != [i for *_, i in want[2:]]  # not epoch 0 replayed
    got = batches(resumed)
    assert got[:3] == want[:3]  # the crashed run: its first 3 steps, then the crash at the 4th
    assert got[3:] == want[3:]  # resumed: only the epoch's last batch, with its own samples
    a = torch.load(straight / "out" / "ckpt" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "out" / "ckpt" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)
