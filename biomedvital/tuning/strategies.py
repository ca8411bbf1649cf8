"""Strategy classes named by ``conf/strategy/*.yaml`` where Lightning's own need a guard."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy

FSDP_CPU_MESSAGE = (
    "FSDP (v1, conf/strategy/fsdp.yaml) runs on CUDA GPUs only and {why}. On CPU (gloo), "
    "or to check sharding without a GPU, use FSDP2 instead: "
    "--config conf/strategy/fsdp2.yaml --trainer.accelerator cpu --trainer.devices N"
)


class FSDPNeedsGPU(RuntimeError):
    """FSDP (v1) asked for where there is no CUDA device; the message names the alternative
    (the CLI shows it among jsonargparse's "Union subtypes" errors)."""


class GPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` that refuses a machine or an accelerator without CUDA with
    a message pointing at the CPU-capable FSDP2 overlay (Lightning's own errors, "No supported
    gpu backend found!" or "requires a GPU accelerator", say nothing of the alternative).
    Every argument is ``FSDPStrategy``'s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not torch.cuda.is_available():
            raise FSDPNeedsGPU(FSDP_CPU_MESSAGE.format(why="no CUDA device is available here"))
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":
            raise FSDPNeedsGPU(
                FSDP_CPU_MESSAGE.format(why=f"the trainer's device is {self.root_device.type!r}")
            )
        super().setup_environment()
