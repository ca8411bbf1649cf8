"""FSDP2 on CPU (2 gloo processes) against one process: same losses, same export, loadable
checkpoints; and FSDP (v1) refused on CPU with a pointer to the FSDP2 overlay."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_process import REPO, cli_command, cli_env, run_cli
from tuning_helpers import selected_from_demo, tuner_config

from biomedvital.cli import main
from biomedvital.data.images import ImageRoot

QUESTION = "What does this image show?"


def _config(tmp: Path, data: Path, images: Path, devices: int) -> Path:
    """Tiny LoRA run, 1 epoch of 3 global batches of 4 (4 x 1 process or 2 x 2), no dropout
    (its masks depend on the batch split), a CSV log of every step."""
    path = tuner_config(tmp, data, images, lora={"dropout": 0.0})
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["init_args"]["batch_size"] = 4 // devices
    cfg["trainer"].update(
        max_epochs=1,
        devices=devices,
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp / "logs"), "name": "", "version": ""},
        },
    )
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(tmp: Path) -> list[float]:
    with (tmp / "logs" / "metrics.csv").open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _greedy(model, processor, image, n: int = 12) -> tuple[list[int], torch.Tensor]:
    from biomedvital.tuning.conversation import prompt

    inputs = processor(text=prompt(QUESTION), images=image, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist(), logits


@pytest.mark.heavy
def test_fsdp2_two_processes_match_one(tmp_path: Path, demo_root: Path) -> None:
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from biomedvital.tuning import LlavaTuner
    from biomedvital.tuning.consolidate import consolidate_checkpoint, is_sharded_checkpoint
    from biomedvital.tuning.models import create_llava

    data = selected_from_demo(demo_root, tmp_path / "selected" / "selected.json", n=12)
    images = demo_root / "images"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    cfg_two = _config(two, data, images, devices=2)
    sharded = subprocess.Popen(
        cli_command("fit", "--config", cfg_two, "--config", "conf/strategy/fsdp2.yaml",
                    "--trainer.devices", "2"),
        cwd=REPO, env=cli_env(PYTHONPATH=str(Path(__file__).parent)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        main(["fit", "--config", str(_config(one, data, images, devices=1))])
        log, _ = sharded.communicate(timeout=120)
    finally:
        if sharded.poll() is None:
            sharded.kill()
    assert sharded.returncode == 0, log[-4000:]

    # per-step loss: the global batch's token-weighted mean in both runs
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=2e-5)

    # the sharded export loads in one process and answers as the single-process export
    image = ImageRoot(images).load("ct_small.dcm")
    merged = {
        k: LlavaForConditionalGeneration.from_pretrained(d / "out" / "export" / "merged").eval()
        for k, d in (("one", one), ("two", two))
    }
    processor = AutoProcessor.from_pretrained(two / "out" / "export" / "merged")
    want, want_logits = _greedy(merged["one"], processor, image)
    got, got_logits = _greedy(merged["two"], processor, image)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)
    adapted = PeftModel.from_pretrained(
        create_llava("tiny:tiny-llava", seed=0).model, two / "out" / "export" / "adapter"
    ).eval()
    assert _greedy(adapted, processor, image)[0] == want

    # the sharded Lightning checkpoint: a folder, consolidated into the single-process layout
    folder = two / "out" / "ckpt" / "last.ckpt"
    assert is_sharded_checkpoint(folder)
    full = consolidate_checkpoint(folder, two / "last.full.ckpt")
    ref = torch.load(one / "out" / "ckpt" / "last.ckpt", weights_only=False)
    ckpt = torch.load(full, weights_only=False)
    assert ckpt["global_step"] == ref["global_step"] == 3
    assert ckpt["state_dict"].keys() == ref["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=1e-4, msg=key)
    (opt,), (ref_opt,) = ckpt["optimizer_states"], ref["optimizer_states"]
    assert [g["params"] for g in opt["param_groups"]] == [
        g["params"] for g in ref_opt["param_groups"]
    ]
    for i, state in ref_opt["state"].items():
        torch.testing.assert_close(opt["state"][i]["exp_avg"], state["exp_avg"], atol=1e-5, rtol=0)
    tuner = LlavaTuner.load_from_checkpoint(full).eval()
    assert tuner.generate_ids(image, QUESTION, max_new_tokens=12) == want


def test_fsdp_v1_refused_on_cpu_pointing_at_fsdp2(
    tmp_path: Path, selected: Path, demo_root: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: FSDP (v1) is allowed")
    cfg = tuner_config(tmp_path, selected, demo_root / "images")
    overlay = str(REPO / "conf" / "strategy" / "fsdp.yaml")
    for extra in ([], ["--trainer.accelerator", "cpu"]):
        with pytest.raises(Exception, match=r"conf/strategy/fsdp2\.yaml") as info:
            main(["fit", "--config", str(cfg), "--config", overlay, *extra])
        assert "FSDP (v1" in str(info.value)


@pytest.mark.slow
def test_fsdp2_with_the_lean_options_matches_one_eager_process(
    tmp_path: Path, demo_root: Path
) -> None:
    """conf/perf/lean.yaml's options (regional compile, recomputed adapter dropout, every
    other layer checkpointed) under FSDP2 on 2 processes: the losses of one plain process.
    Dropout is 0 here (see ``_config``); the recompute's gradients are tested in
    test_tuner_units.py and test_lora_memory.py."""
    data = selected_from_demo(demo_root, tmp_path / "selected" / "selected.json", n=12)
    images = demo_root / "images"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run_cli(
        "fit", "--config", _config(two, data, images, 2), "--config", "conf/strategy/fsdp2.yaml",
        "--config", "conf/perf/lean.yaml", "--trainer.devices", "2",
        timeout=600, env=cli_env(PYTHONPATH=str(Path(__file__).parent)),
    )  # fmt: skip
    main(["fit", "--config", str(_config(one, data, images, devices=1))])
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=1e-4)


@pytest.mark.heavy
def test_fsdp2_trains_bf16_weights_with_float32_trainables(tmp_path: Path, demo_root: Path) -> None:
    """The paper config's precision path on 2 processes: weights loaded in bf16, ``bf16-mixed``,
    FSDP2 units of bf16 frozen weights beside float32 adapters and projector (FSDP v1 would
    refuse the mix); training runs, the loss is finite and the checkpoint's trainable tensors
    are float32."""
    from biomedvital.tuning.consolidate import consolidate_checkpoint

    data = selected_from_demo(demo_root, tmp_path / "selected" / "selected.json", n=8)
    two = tmp_path / "two"
    two.mkdir()
    run_cli(
        "fit", "--config", _config(two, data, demo_root / "images", 2),
        "--config", "conf/strategy/fsdp2.yaml", "--trainer.devices", "2",
        "--trainer.precision", "bf16-mixed", "--model.init_args.dtype", "bfloat16",
        timeout=600, env=cli_env(PYTHONPATH=str(Path(__file__).parent)),
    )  # fmt: skip
    losses = _losses(two)
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    full = consolidate_checkpoint(two / "out" / "ckpt" / "last.ckpt", tmp_path / "full.ckpt")
    state = torch.load(full, weights_only=True)["state_dict"]
    assert state and {v.dtype for v in state.values()} == {torch.float32}


@pytest.mark.heavy
def test_a_rank_whose_whole_batch_lost_its_images_still_steps(
    tmp_path: Path, demo_root: Path
) -> None:
    """2 processes, 1 sample each per step, one image corrupt (skip mode): the rank that draws
    it has nothing to learn from but must still join the step's gathers and reductions (before,
    it skipped the step and the other rank waited forever). The run ends; the export's manifest
    names the sample once, though both epochs met it."""
    import json
    import shutil

    images = tmp_path / "images"
    shutil.copytree(demo_root / "images", images)
    (images / "retina.jpg").write_bytes(b"not a jpeg")
    data = selected_from_demo(demo_root, tmp_path / "selected" / "selected.json", n=6)
    bad = [r["id"] for r in json.loads(data.read_text()) if r["image"] == "retina.jpg"]
    two = tmp_path / "two"
    two.mkdir()
    path = _config(two, data, images, 2)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["init_args"].update(batch_size=1, on_bad_record="skip")
    cfg["trainer"]["max_epochs"] = 2
    path.write_text(yaml.safe_dump(cfg))
    run_cli(
        "fit", "--config", path, "--config", "conf/strategy/fsdp2.yaml",
        "--trainer.devices", "2", "--model.init_args.lora.dropout", "0.05",
        timeout=300, env=cli_env(PYTHONPATH=str(Path(__file__).parent)),
    )  # fmt: skip
    manifest = json.loads((two / "out" / "export" / "data_manifest.json").read_text())
    assert bad and manifest["bad_images_during_training"] == {"count": len(bad), "ids": bad}


@pytest.mark.heavy
def test_fsdp_v1_export_gathers_every_rank(tmp_path: Path) -> None:
    """FSDP (v1) on 2 CPU processes (torch's FSDP as Lightning's FSDPStrategy wraps the
    module; Lightning itself refuses CPU): every rank takes part in export, rank 0 writes whole
    tensors (the root unit's embeddings and projector too, not its local shard) and the merged
    model loads in one process. Before, rank 0 exported alone and hung in the layers' gathers."""
    import socket

    from transformers import LlavaForConditionalGeneration

    from biomedvital.tuning.models import create_llava

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "fsdp1_export.py"), str(tmp_path), port],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    fresh = create_llava("tiny:tiny-llava", seed=0).model  # the tuner's initial weights
    want = {k: v.shape for k, v in fresh.state_dict().items()}
    got = {k: v.shape for k, v in merged.state_dict().items()}
    assert got == want
    # the step moved the projector (trained, in the root unit) away from its initial weights
    key = next(k for k in want if "multi_modal_projector" in k and k.endswith("weight"))
    assert not torch.equal(merged.state_dict()[key], fresh.state_dict()[key])
