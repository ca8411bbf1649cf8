"""Strategy classes named by ``conf/strategy/*.yaml`` where Lightning's own need a guard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

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


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2, ``conf/strategy/fsdp2.yaml``) that resumes
    from a sharded checkpoint holding only the trainable tensors.

    The tuner writes only those (``checkpoint_trainable_only``; the frozen weights come from the
    base model). Lightning asks ``torch.distributed.checkpoint`` for every tensor of the model,
    and a folder without the frozen ones stopped ``--ckpt_path last`` with "Missing key in
    checkpoint state_dict". Here a module that loads non-strictly (``strict_loading`` false)
    reads the tensors the folder has; one it lacks must be frozen, else the load fails naming
    it. Every argument is ``ModelParallelStrategy``'s.
    """

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        module = self.lightning_module
        path = Path(self.broadcast(checkpoint_path))
        if module is None or module.strict_loading or not (path / ".metadata").is_file():
            return super().load_checkpoint(checkpoint_path, weights_only)
        held = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        model = self.model
        state = {"state_dict": get_model_state_dict(model)}
        absent = [k for k in state["state_dict"] if f"state_dict.{k}" not in held]
        # state-dict names of the trainable tensors (the tuner's drop wrapper prefixes)
        names = getattr(module, "trainable_keys", None)
        trainable = (
            names() if names else {n for n, p in model.named_parameters() if p.requires_grad}
        )
        lacking = [k for k in absent if k in trainable]
        if lacking:
            raise KeyError(
                f"{path} lacks {len(lacking)} trainable tensor(s), e.g. {lacking[0]}: written by "
                "a different mode or target list?"
            )
        load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        model.load_state_dict(state["state_dict"], strict=False)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim = {key: get_optimizer_state_dict(model, optimizer)}
            load(optim, checkpoint_id=path)
            set_optimizer_state_dict(
                model,
                optimizer,
                optim_state_dict=optim[key],
                options=StateDictOptions(cpu_offload=True),
            )
        # the rest (epoch, step, loops, schedulers, callbacks, hyper-parameters): Lightning's file
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=weights_only)
