"""The tuner's argument groups: checked before any weight loads, old flat keys refused naming
their new place, old checkpoints' flat hyper-parameters read into the groups."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from cli_process import REPO, cli_command, cli_env

from biomedvital.cli import ConfigError, main
from biomedvital.tuning import LlavaTuner, LoraArgs, MemoryArgs, OptimArgs
from biomedvital.tuning.args import MOVED_ARGS, grouped_hparams
from biomedvital.tuning.models import tuner_from_checkpoint


@pytest.mark.parametrize(
    ("group", "bad", "message"),
    [
        ("lora", {"r": 0}, "lora.r must be >= 1"),
        ("lora", {"dropout": 1.0}, r"lora.dropout must be in \[0, 1\)"),
        ("lora", {"scope": "tower"}, "lora.scope must be one of"),
        ("optim", {"warmup_ratio": 1.0}, "optim.warmup_ratio"),
        ("optim", {"betas": [0.9]}, "optim.betas must be two numbers"),
        ("optim", {"projector_lr": 0.0}, "optim.projector_lr must be > 0"),
        ("memory", {"checkpoint_every": 0}, "memory.checkpoint_every must be >= 1"),
        ("memory", {"fsdp_unit": "block"}, "memory.fsdp_unit must be one of"),
        ("vision", {"freeze_vision_tower": False}, "VisionArgs has no field 'freeze_vision_tower'"),
    ],
)
def test_a_bad_group_value_stops_before_the_model_loads(
    group: str, bad: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a config gives them (mappings): refused naming the field, and no weight is loaded."""

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("biomedvital.tuning.module.create_llava", no_load)
    with pytest.raises(ValueError, match=message):
        LlavaTuner("tiny:tiny-llava", **{group: bad})


def test_every_moved_key_has_a_place_in_a_group() -> None:
    from dataclasses import fields

    from biomedvital.tuning.args import GROUPS

    for old, new in MOVED_ARGS.items():
        group, name = new.split(".")
        assert name in {f.name for f in fields(GROUPS[group])}, old


def test_an_old_flat_key_is_refused_through_the_cli(tmp_path: Path) -> None:
    """``python -m biomedvital fit`` with a config of the flat era: one line naming the key's
    new place, exit status 2 (a config error), nothing built; the same for a flag."""
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"model": {"init_args": {"lora_r": 8}}}))
    done = subprocess.run(
        cli_command("fit", "--config", "conf/demo/tuner.yaml", "--config", old),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"biomedvital: error: fit: {old}: model.init_args.lora_r moved to model.init_args.lora.r"
    ]
    conf = str(REPO / "conf" / "demo" / "tuner.yaml")
    with pytest.raises(ConfigError) as err:
        main(["fit", "--config", conf, "--model.init_args.checkpoint_every=2"])
    assert str(err.value) == (
        "fit: the command line: model.init_args.checkpoint_every moved to "
        "model.init_args.memory.checkpoint_every"
    )
    # a group's bad value: one line naming the key and where it was set, nothing loaded
    with pytest.raises(ConfigError) as err:
        main(["fit", "--config", conf, "--model.init_args.lora.r=0"])
    assert str(err.value) == "fit: the command line: model.init_args.lora.r must be >= 1, got 0"


def test_a_checkpoint_of_flat_hyper_parameters_is_rebuilt_in_groups() -> None:
    """A checkpoint written before the groups (flat ``lora_r``..., Lightning's ``_class_path``)
    rebuilds the same tuner: the evaluator can still read it."""
    tuner = LlavaTuner("tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8, dropout=0.0))
    flat = {
        "model": "tiny:tiny-llava",
        "mode": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lr": 1e-3,
        "gradient_checkpointing": False,
        "_class_path": "biomedvital.tuning.LlavaTuner",
    }
    assert grouped_hparams(flat) == {
        "model": "tiny:tiny-llava",
        "mode": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"lr": 1e-3},
        "memory": {"gradient_checkpointing": False},
    }
    keep = tuner.trainable_keys()
    state = {k: v for k, v in tuner.state_dict().items() if k in keep}
    rebuilt = tuner_from_checkpoint({"hyper_parameters": flat, "state_dict": state})
    assert rebuilt.lora == LoraArgs(r=4, alpha=8, dropout=0.0)
    assert rebuilt.optim == OptimArgs(lr=1e-3) and rebuilt.memory == MemoryArgs()
    rebuilt.load_state_dict(state, strict=False)
    for key, value in state.items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value, rtol=0, atol=0)
