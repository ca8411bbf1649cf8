"""On a CUDA device: the tuner trains in bf16 under FSDP (v1, auto-wrapped layers) and FSDP2,
with activation checkpointing, plainly and with conf/perf/lean.yaml's options (regional
compile, recomputed adapter dropout), and its checkpoint reloads without pickle.

Opt in: ``python -m pytest -m gpu tests/tuning/test_tuner_gpu.py`` on a machine with a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback

from biomedvital.tracking.checkpoints import load_checkpoint
from biomedvital.tuning import LlavaTuner, LoraArgs, MemoryArgs, OptimArgs, TunerDataModule
from biomedvital.tuning.consolidate import consolidate_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.values.append(float(outputs["loss"]))


def _fit(
    strategy,
    selected: Path,
    demo_root: Path,
    tmp_path: Path,
    lean: bool = False,  # noqa: ANN001
) -> tuple[L.Trainer, list]:
    L.seed_everything(0, verbose=False)
    model = LlavaTuner(
        "tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8), optim=OptimArgs(lr=1e-3, projector_lr=1e-4),
        memory=MemoryArgs(
            gradient_checkpointing=True, checkpoint_every=2,
            compile=lean, lora_dropout_recompute=lean,
        ),
    )  # fmt: skip
    data = TunerDataModule(
        str(selected), str(demo_root / "images"), max_length=192, batch_size=4, num_workers=0,
        batch_split="min_padding",
    )  # fmt: skip
    losses = Losses()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed", max_epochs=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), use_distributed_sampler=False,
        callbacks=[losses],
    )  # fmt: skip
    trainer.fit(model, data)
    return trainer, losses.values


def _check(trainer: L.Trainer, losses: list[float], tmp_path: Path) -> None:
    assert trainer.global_step > 0 and losses
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0]  # it learns
    path = tmp_path / "tuner.ckpt"
    trainer.save_checkpoint(path)
    if path.is_dir():  # FSDP2 writes a sharded (distributed) checkpoint: consolidate it
        path = consolidate_checkpoint(path, tmp_path / "consolidated.ckpt")
    ckpt = load_checkpoint(str(path))  # weights_only: no pickled objects needed
    lora = [k for k in ckpt["state_dict"] if "lora_" in k]
    assert lora and all(torch.isfinite(ckpt["state_dict"][k].float()).all() for k in lora)


LEAN = pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])


@LEAN
def test_fsdp_v1_bf16_on_gpu(selected: Path, demo_root: Path, tmp_path: Path, lean: bool) -> None:
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from biomedvital.tuning.strategies import GPUFSDPStrategy

    strategy = GPUFSDPStrategy(
        sharding_strategy="FULL_SHARD", auto_wrap_policy={LlamaDecoderLayer, CLIPEncoderLayer}
    )
    trainer, losses = _fit(strategy, selected, demo_root, tmp_path, lean)
    _check(trainer, losses, tmp_path)


@LEAN
def test_fsdp2_bf16_on_gpu(selected: Path, demo_root: Path, tmp_path: Path, lean: bool) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer, losses = _fit(strategy, selected, demo_root, tmp_path, lean)
    _check(trainer, losses, tmp_path)
