"""Visual instruction tuning of LLaVA on selected data: LoRA or full fine-tuning."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import torch
from lightning.pytorch import LightningModule
from torch import nn

from biomedvital.tracking.hooks import PlansSupervisedTokens
from biomedvital.tuning.args import (
    MOVED_ARGS,
    LoraArgs,
    LoraScope,
    MemoryArgs,
    OptimArgs,
    VisionArgs,
    as_group,
    group_dicts,
)
from biomedvital.tuning.conversation import IGNORE_INDEX, VICUNA_V1_SYSTEM, prompt
from biomedvital.tuning.lora_memory import recompute_lora_dropout
from biomedvital.tuning.registry import create_llava

Mode = Literal["lora", "full"]
DType = Literal["float32", "bfloat16", "float16"]
DTYPES = get_args(DType)

# LLaVA-1.5's LoRA recipe adapts every linear layer of the language model (find_all_linear_names
# leaves out the vision tower, the projector and lm_head)
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROJECTOR = "multi_modal_projector"


def lora_target_regex(names: list[str], scope: LoraScope) -> str:
    """A full-match regex over module names: only ``model.language_model`` unless ``all``
    (the CLIP tower has ``q_proj``/``v_proj`` too, which a bare name list would also adapt)."""
    alt = "|".join(sorted(set(names)))
    if scope == "language_model":
        return rf"(.*\.)?language_model\..*\.({alt})"
    return rf".*\.({alt})"


class LlavaTuner(LightningModule):
    """LLaVA trained on LLaVA-format conversations, loss on the assistant's tokens only.

    Args:
        model: ``hf-hub:ID`` / ``local-dir:PATH`` / ``tiny:NAME`` (see ``registry.py``). Paper
            base: ``hf-hub:llava-hf/llava-1.5-13b-hf``.
        mode: ``lora`` (adapters on the language model; LLaVA-1.5's task LoRA recipe) or
            ``full`` (every language-model weight trains; LLaVA-Med stage 2).
        lora: the adapters (:class:`~.args.LoraArgs`: ``r``, ``alpha``, ``dropout``,
            ``target_modules``, ``scope``); ignored in ``full`` mode.
        vision: what trains on the image side (:class:`~.args.VisionArgs`:
            ``train_projector``, ``freeze_tower``).
        optim: AdamW and its schedule (:class:`~.args.OptimArgs`: ``lr``, ``projector_lr``,
            ``weight_decay``, ``betas``, ``warmup_ratio``, ``min_lr_ratio``,
            ``fp32_trainable``).
        memory: activation memory and sharding (:class:`~.args.MemoryArgs`:
            ``gradient_checkpointing``, ``checkpoint_every``, ``lora_dropout_recompute``,
            ``compile``, ``fsdp_unit``).
        dtype: dtype the weights are loaded in (``None``: the checkpoint's for ``hf-hub:``/
            ``local-dir:``, float32 for ``tiny:``). Mixed precision is the trainer's
            ``precision``; on CPU keep float32 (bf16 autocast is slow there).
        init_seed: seed of random weights (``tiny:``, adapters) and of per-step dropout.
        checkpoint_trainable_only: write only trainable tensors to Lightning checkpoints (the
            frozen weights are rebuilt from ``model``): a LoRA checkpoint is then the size of
            its adapters and projector, not of the whole model.
    """

    MOVED_ARGS: ClassVar[dict[str, str]] = MOVED_ARGS  # flat keys of old configs: refused

    def __init__(
        self,
        model: str = "tiny:tiny-llava",
        mode: Mode = "lora",
        # the groups are frozen dataclasses: a default instance is never changed
        lora: LoraArgs = LoraArgs(),  # noqa: B008
        vision: VisionArgs = VisionArgs(),  # noqa: B008
        optim: OptimArgs = OptimArgs(),  # noqa: B008
        memory: MemoryArgs = MemoryArgs(),  # noqa: B008
        dtype: DType | None = None,
        init_seed: int = 0,
        checkpoint_trainable_only: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("lora", "full"):
            raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} or null, got {dtype!r}")
        # built (and checked) before the weights load; Lightning and checkpoints give dicts
        self.lora = as_group(LoraArgs, lora)
        self.vision = as_group(VisionArgs, vision)
        self.optim = as_group(OptimArgs, optim)
        self.memory = as_group(MemoryArgs, memory)
        self.save_hyperparameters()
        self.hparams.update(group_dicts(self.arg_groups()))
        bundle = create_llava(model, seed=init_seed, dtype=getattr(torch, dtype) if dtype else None)
        self.processor = bundle.processor
        base = bundle.model
        base.config.use_cache = False
        if self.memory.gradient_checkpointing:
            enable_checkpointing(base, self.memory.checkpoint_every)
        base.requires_grad_(mode == "full")
        if mode == "lora":
            self.model = self._wrap_lora(base)
        else:
            self.model = base
        if self.memory.lora_dropout_recompute and mode == "lora":
            recompute_lora_dropout(self.model)
        self._set_trainable()
        if self.memory.compile:
            compile_layers(base)
        if checkpoint_trainable_only:
            self.strict_loading = False  # frozen tensors are left out; checked on load
        self.bad_image_ids: set[str] = set()  # this process's, and a resumed run's before it

    def arg_groups(self) -> dict[str, Any]:
        """The argument groups by name, as built and checked."""
        return {
            "lora": self.lora,
            "vision": self.vision,
            "optim": self.optim,
            "memory": self.memory,
        }

    # -- model -----------------------------------------------------------------------------

    def _wrap_lora(self, base: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        lora = self.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_target_regex(lora.target_modules or LLAMA_LINEAR, lora.scope),
            modules_to_save=[PROJECTOR] if self.vision.train_projector else None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hparams.init_seed + 1)
            return get_peft_model(base, config)

    def _set_trainable(self) -> None:
        """Projector per ``vision.train_projector``; the CLIP tower's own weights frozen in LoRA
        mode or with ``vision.freeze_tower``. Adapters always train, the tower's too
        (``lora.scope: all`` asks for them)."""
        frozen_tower = self.vision.freeze_tower or self.hparams.mode == "lora"
        for name, p in self.model.named_parameters():
            if PROJECTOR in name and "original_module" not in name:
                p.requires_grad_(self.vision.train_projector)
            elif "lora_" in name:
                continue  # peft made them trainable
            elif "vision_tower" in name and frozen_tower:
                p.requires_grad_(False)
            elif "vision_tower" in name:
                p.requires_grad_(True)

    def llava(self) -> nn.Module:
        """The ``LlavaForConditionalGeneration`` (inside its PEFT wrapper in LoRA mode)."""
        return self.model.get_base_model() if self.hparams.mode == "lora" else self.model

    def configure_model(self) -> None:
        """FSDP2 under ``ModelParallelStrategy``: each vision-encoder layer, each LoRA
        ``lora_A``/``lora_B`` and the projector are their own units, then each decoder layer
        and the root; so frozen and trainable tensors never share a unit (their gathers and
        reductions stay apart). Other strategies leave the model as is.

        First, under mixed precision, trainable parameters are made float32
        (``optim.fp32_trainable``); FSDP (v1), which flattens each wrapped layer into one tensor
        of one dtype, is refused a model that mixes dtypes within a layer, naming the fix."""
        trainer = self._trainer
        if self.optim.fp32_trainable and trainer is not None and "mixed" in str(trainer.precision):
            upcast_trainable(self.model)
        if trainer is not None:
            from lightning.pytorch.strategies import FSDPStrategy

            if isinstance(trainer.strategy, FSDPStrategy):
                check_fsdp1_dtypes(self.llava())
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        llava = self.llava()
        if self.memory.fsdp_unit == "layer":
            for layer in llava.model.vision_tower.encoder.layers:
                fully_shard(layer, mesh=dp)
            for name, module in self.model.named_modules():
                params = list(module.parameters())
                trainable_unit = params and all(p.requires_grad for p in params)
                if name.endswith(("lora_A.default", "lora_B.default")) or (
                    trainable_unit and name.endswith((PROJECTOR, "modules_to_save.default"))
                ):
                    fully_shard(module, mesh=dp)
            for layer in llava.model.language_model.layers:
                fully_shard(layer, mesh=dp)
        fully_shard(self.model, mesh=dp)

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters: the projector with its own learning rate, the rest with ``lr``.

        With ``weight_decay``, biases and norm weights are left undecayed, as LLaVA's trainer
        does (decay pulls an RMSNorm gain towards 0, i.e. scales the layer's input down): each
        group then has a ``*_no_decay`` twin with ``weight_decay`` 0."""
        hp = self.optim
        undecayed = no_decay_names(self.model) if hp.weight_decay else set()
        buckets: dict[str, list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                key = "projector" if PROJECTOR in name else "model"
                buckets.setdefault(key + ("_no_decay" if name in undecayed else ""), []).append(p)
        groups = []
        for key in ("model", "model_no_decay", "projector", "projector_no_decay"):
            if not buckets.get(key):
                continue
            lr = hp.lr
            if key.startswith("projector") and hp.projector_lr is not None:
                lr = hp.projector_lr
            group: dict[str, Any] = {"params": buckets[key], "lr": lr, "name": key}
            if key.endswith("_no_decay"):
                group["weight_decay"] = 0.0
            groups.append(group)
        return groups

    # -- training --------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].to(self.dtype_of_inputs()),
            labels=batch["labels"],
            use_cache=False,
        )

    def dtype_of_inputs(self) -> torch.dtype:
        return next(self.llava().model.vision_tower.parameters()).dtype

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # dropout (adapters) draws from the global RNG, consumed in a different order after a
        # restart: seeding per micro-batch makes a resumed run continue exactly; per rank too,
        # or every process would drop the same positions of its different samples
        p, rank = 1_000_003, self.global_rank
        seed = ((self.hparams.init_seed * p + self.current_epoch) * p + batch_idx) * p + rank
        torch.manual_seed(seed % 2**63)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.bad_image_ids.update(batch["bad_ids"])
        n = len(batch["ids"])
        world = self.trainer.world_size if self._trainer is not None else 1
        if n == 0 and world == 1:
            return None  # every image failed: nothing to learn, and no other rank to wait for
        # n == 0 with several ranks: the collate's placeholder (no supervised token) runs the
        # step, so this rank takes part in the gathers and reductions and adds 0 to the loss
        summed, count = self.supervised_loss(batch)
        loss, shown = self.scaled_loss(summed, count, batch_idx)
        # the step's token-weighted mean over all ranks (the mean of the ranks' ``shown``)
        self.log("train/loss", shown, prog_bar=True, batch_size=max(n, 1), sync_dist=world > 1)
        self.log(
            "train/supervised_tokens",
            (batch["labels"] != -100).sum().float(),
            reduce_fx="sum",
            batch_size=max(n, 1),
        )
        if self._trainer is not None and self.trainer.optimizers:
            for group in self.trainer.optimizers[0].param_groups:
                self.log(
                    f"train/lr_{group.get('name', 'model')}", group["lr"], batch_size=max(n, 1)
                )
        return loss

    def scaled_loss(
        self, summed: torch.Tensor, count: torch.Tensor, batch_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What to back-propagate, and this micro-batch's loss to log, from its summed loss.

        The gradient of an optimiser step is that of one large batch's token-weighted mean:
        each rank's summed loss is divided by the supervised tokens of the whole step, every
        rank's micro-batches of the accumulation window included, which the data module's
        batch plan knows in advance (``supervised_tokens``); Lightning divides by
        ``accumulate_grad_batches`` and DDP/FSDP average over ranks, so both are multiplied
        back. A mean per micro-batch or per rank (LLaVA's trainer) would weight the tokens of
        short batches more. Without a plan: each step's mean over ranks (one collective)."""
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        dm = getattr(trainer, "datamodule", None)
        plan = dm.supervised_tokens if isinstance(dm, PlansSupervisedTokens) else None
        if plan is not None:
            k = trainer.accumulate_grad_batches
            n_batches = trainer.num_training_batches
            micro, window = plan(
                self.current_epoch,
                batch_idx,
                k,
                None if n_batches == float("inf") else int(n_batches),
            )
            loss = summed * (world * k / max(window, 1))
            return loss, summed.detach() * (world / max(micro, 1))
        if world > 1:
            loss = self.distributed_share(summed, count, world)
            return loss, loss.detach()
        loss = summed / count.clamp_min(1).to(summed.dtype)
        return loss, loss.detach()

    def supervised_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-entropy summed over the batch's supervised tokens, and their count.

        Logits are computed only where a token is supervised (``logits_to_keep`` with a
        boolean mask): the image, system and user positions, often most of a LLaVA sequence,
        never go through ``lm_head`` nor the float32 softmax over the vocabulary. The mean is
        the same as Hugging Face's loss over the full logits (a test)."""
        import torch.nn.functional as F

        labels = batch["labels"]
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # token t predicts t + 1
        keep = targets != IGNORE_INDEX
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].to(self.dtype_of_inputs()),
            logits_to_keep=keep,
            use_cache=False,
        ).logits
        summed = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets[keep].to(logits.device),
            reduction="sum",
        )
        return summed, keep.sum()

    def distributed_share(
        self, summed: torch.Tensor, count: torch.Tensor, world: int
    ) -> torch.Tensor:
        """This rank's share of the global batch's loss: its summed loss divided by the global
        batch's supervised tokens / ``world``. Data-parallel gradient averaging then gives
        exactly the gradient of the global batch's token-weighted mean, as one process would
        compute it (a mean of per-rank means would weight the tokens of short ranks more)."""
        import torch.distributed as dist

        total = count.to(device=summed.device, dtype=torch.float64)
        dist.all_reduce(total)  # the global batch's supervised tokens
        return summed * world / total.clamp_min(1).to(summed.dtype)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        n = len(batch["ids"])
        world = self.trainer.world_size if self._trainer is not None else 1
        if n == 0 and world == 1:
            return
        summed, count = self.supervised_loss(batch)  # sharded: every rank runs the model
        if n:
            loss = summed / count.clamp_min(1).to(summed.dtype)
            self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)

    def bad_images_seen(self) -> list[str]:
        """Ids of the samples whose image failed to load while training, every process's
        (a collective with several processes: all must call it), each counted once however
        many epochs met it."""
        ids = set(self.bad_image_ids)
        if self._trainer is not None and self.trainer.world_size > 1:
            import torch.distributed as dist

            parts: list[Any] = [None] * self.trainer.world_size
            dist.all_gather_object(parts, sorted(ids))
            ids = {i for part in parts for i in part}
        return sorted(ids)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by norm under FSDP (v1) too, with the norm over every rank's shard.

        Lightning's FSDP precision plugin refuses norm clipping (it holds no reference to the
        root unit), so ``gradient_clip_val`` (the paper config's 1.0) with
        ``conf/strategy/fsdp.yaml`` would stop the run at its first optimiser step; the root
        unit's ``clip_grad_norm_`` reduces the norm across ranks. Other strategies (FSDP2's
        ``DTensor`` gradients included) keep Lightning's ``clip_grad_norm_``."""
        from lightning.pytorch.strategies import FSDPStrategy

        trainer = self._trainer
        by_norm = gradient_clip_algorithm in (None, "norm")  # GradClipAlgorithmType equals its str
        if trainer is not None and isinstance(trainer.strategy, FSDPStrategy) and by_norm:
            clip = gradient_clip_val if gradient_clip_val is not None else trainer.gradient_clip_val
            if clip:
                trainer.strategy.model.clip_grad_norm_(clip)  # collective: every rank calls
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.optim
        opt = torch.optim.AdamW(
            self.param_groups(), lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas
        )
        total = max(int(self.total_steps()), 1)
        warmup = math.ceil(hp.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: cosine_with_warmup(step, warmup, total, hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def total_steps(self) -> float:
        """Optimiser steps of the whole fit, as Lightning's ``estimated_stepping_batches``
        counts them, but from the data module's batch count where it has one: that property
        builds (and starts iterating) the training loader before a resumed run's loader state
        is restored, so the run would start its epoch's batches over."""
        trainer = self.trainer
        count = getattr(trainer.datamodule, "train_batches", None)
        if count is None or trainer.max_epochs in (None, -1):
            return trainer.estimated_stepping_batches
        n, limit = count(), trainer.limit_train_batches
        n = min(n, limit) if isinstance(limit, int) else int(n * limit)
        steps = math.ceil(n / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    # -- checkpoints -----------------------------------------------------------------------

    def trainable_keys(self) -> set[str]:
        """State-dict names of the trainable tensors; wrapper prefixes that FSDP (v1), activation
        checkpointing or ``torch.compile`` insert into parameter names are not in state-dict
        keys, so they are dropped (else an FSDP run would save no tensor at all)."""
        return {_unwrapped(n) for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mlflow_run_id"] = getattr(self.logger, "run_id", None)
        checkpoint["bad_image_ids"] = self.bad_images_seen()  # every rank saves
        if self.hparams.checkpoint_trainable_only and "state_dict" in checkpoint:
            keep = self.trainable_keys()
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if k in keep
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.bad_image_ids = set(checkpoint.get("bad_image_ids", []))
        if self.hparams.checkpoint_trainable_only and "state_dict" in checkpoint:
            missing = sorted(self.trainable_keys() - set(checkpoint["state_dict"]))
            if missing:
                raise KeyError(
                    f"checkpoint lacks {len(missing)} trainable tensor(s), e.g. {missing[0]}: "
                    "written by a different mode or target list?"
                )

    # -- inference and export --------------------------------------------------------------

    @torch.no_grad()
    def generate_ids(
        self,
        image: Any,
        question: str,
        max_new_tokens: int = 32,
        system_prompt: str = VICUNA_V1_SYSTEM,
    ) -> list[int]:
        """Greedy answer tokens to one question about one image (PIL), prompt excluded."""
        inputs = self.processor(
            text=prompt(question, system_prompt), images=image, return_tensors="pt"
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype_of_inputs())
        was_training = self.training
        self.eval()
        try:
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True
            )
        finally:
            self.train(was_training)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    def is_sharded(self) -> bool:
        """Whether FSDP2 (``DTensor`` shards) or FSDP (v1) (flattened units) holds the
        parameters: then every rank must take part in gathering them."""
        return self._fsdp_version() > 0

    def _fsdp_version(self) -> int:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self.model.parameters()):
            return 2
        if any(isinstance(m, FullyShardedDataParallel) for m in self.model.modules()):
            return 1
        strategy = getattr(self._trainer, "strategy", None)
        if strategy is not None and isinstance(strategy.model, FullyShardedDataParallel):
            return 1  # FSDP (v1) around the whole module only
        return 0

    def full_state_dict(self, root: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """``self.model``'s complete state dict on the CPU. Sharded: every rank must call it
        (the shards are gathered); only rank 0 receives the tensors, others ``{}``.

        FSDP (v1) keeps the parameters outside the wrapped layers in the flattened unit of
        the root wrapper around this module, so the gather starts there: ``root``, by default
        the strategy's wrapped model (Lightning's ``FSDPStrategy`` wraps the LightningModule)."""
        version = self._fsdp_version()
        if version == 0:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if version == 2:
            return get_model_state_dict(self.model, options=options)
        root = root if root is not None else self.trainer.strategy.model
        state = get_model_state_dict(root, options=options)
        return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}

    def unsharded_copy(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A plain (not sharded) ``self.model`` holding ``state``: built on the meta device
        from the model's own config (no download, no second initialisation) and given the
        gathered tensors; buffers left out of state dicts (rotary frequencies, position ids)
        are copied from this model, where FSDP2 keeps them whole."""
        from transformers import LlavaForConditionalGeneration

        llava = self.llava()
        with torch.device("meta"):
            base = LlavaForConditionalGeneration._from_config(
                copy.deepcopy(llava.config), dtype=next(iter(state.values())).dtype
            )
        base.generation_config = copy.deepcopy(llava.generation_config)
        if self.hparams.mode == "lora":
            from peft import get_peft_model

            model = get_peft_model(base, copy.deepcopy(self.model.peft_config["default"]))
        else:
            model = base
        model.load_state_dict(state, strict=True, assign=True)
        persistent = set(state)
        buffers = {_unwrapped(n): b for n, b in self.model.named_buffers()}  # FSDP (v1) names
        for name, _ in list(model.named_buffers()):
            if name not in persistent:
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                module.register_buffer(leaf, buffers[name].detach().cpu().clone(), persistent=False)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"unsharded copy lacks {len(left)} tensor(s), e.g. {left[0]}")
        return model.eval()

    def export(
        self,
        folder: str | Path,
        adapter: bool = True,
        merged: bool = True,
        root: nn.Module | None = None,
    ) -> dict:
        """Write the PEFT adapter (LoRA) and/or a merged ``LlavaForConditionalGeneration`` with
        its processor, loadable with ``from_pretrained``. Merging works on a copy (host memory
        for a second model) so the trained module stays usable.

        Sharded (FSDP2 or FSDP v1), every rank must call it: the full tensors are gathered to
        rank 0's CPU memory (the whole model once), rank 0 writes an unsharded copy, others
        return ``{}``. What is written loads in one process as an unsharded run's export does.
        ``root``: see :meth:`full_state_dict`."""
        folder = Path(folder)
        written: dict[str, str] = {}
        sharded = self.is_sharded()
        if sharded:
            import torch.distributed as dist

            state = self.full_state_dict(root)  # collective: every rank
            if dist.get_rank() != 0:
                return written
            model = self.unsharded_copy(state)
            del state
        else:
            model = self.model
        if adapter and self.hparams.mode == "lora":
            model.save_pretrained(folder / "adapter")
            self.processor.save_pretrained(folder / "adapter")
            written["adapter"] = str(folder / "adapter")
        if merged:
            if self.hparams.mode == "lora":
                # the sharded path's copy is ours to merge; the live model is merged in a copy
                model = (model if sharded else copy.deepcopy(model)).merge_and_unload()
            model.config.use_cache = True
            model.save_pretrained(folder / "merged")
            self.processor.save_pretrained(folder / "merged")
            written["merged"] = str(folder / "merged")
        return written


def upcast_trainable(model: nn.Module) -> int:
    """Make every trainable floating-point parameter float32, in place; returns how many."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


FSDP1_DTYPE_MESSAGE = (
    "FSDP (v1) flattens the parameters of each wrapped unit into one tensor of one dtype, but "
    "{unit} holds {dtypes} (LoRA adapters and trainable weights are float32; the other weights "
    "are loaded as model.init_args.dtype). Load every weight in float32 "
    "(--model.init_args.dtype float32; FSDP's mixed precision still computes in bf16) or use "
    "FSDP2 (conf/strategy/fsdp2.yaml, conf/paper/tuner.yaml), which shards each parameter "
    "on its own"
)


def check_fsdp1_dtypes(llava: nn.Module) -> None:
    """Raise unless each unit FSDP (v1) would flatten (every decoder and vision-encoder layer,
    and the rest of the model) holds parameters of one dtype."""
    layers = [*llava.model.language_model.layers, *llava.model.vision_tower.encoder.layers]
    inside: set[int] = set()
    units: list[tuple[str, list[torch.nn.Parameter]]] = []
    names = {id(m): n for n, m in llava.named_modules()}
    for layer in layers:
        params = list(layer.parameters())
        inside |= {id(p) for p in params}
        units.append((names.get(id(layer), type(layer).__name__), params))
    rest = [p for p in llava.parameters() if id(p) not in inside]
    units.append(("the model outside its layers", rest))
    for unit, params in units:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        if len(dtypes) > 1:
            raise ValueError(FSDP1_DTYPE_MESSAGE.format(unit=unit, dtypes=" and ".join(dtypes)))


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters LLaVA's trainer exempts from weight decay: biases, and the
    weights of normalisation layers (``LayerNorm``, ``LlamaRMSNorm``)."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for leaf, _ in module.named_parameters(recurse=False):
            if is_norm or leaf == "bias":
                names.add(f"{module_name}.{leaf}" if module_name else leaf)
    return names


def cosine_with_warmup(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """Multiplier of the base lr: linear warmup to 1, then cosine down to ``floor``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def enable_checkpointing(model: nn.Module, every: int = 1) -> int:
    """Non-reentrant activation checkpointing on every ``every``-th language-model decoder
    layer (all layers of the model when ``every`` is 1); returns how many decoder layers
    recompute. Layers left out keep their activations: less recompute, more memory."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        if i % every:
            layer.gradient_checkpointing = False  # the instance attribute shadows the class's
    return sum(1 for layer in layers if layer.gradient_checkpointing)


def compile_layers(model: nn.Module) -> int:
    """Regional compilation: ``nn.Module.compile`` on each language-model decoder layer and
    vision-encoder layer, in place (parameter names stay, unlike ``torch.compile(model)``).
    The layers share their code, so one graph serves all layers of a stack; FSDP2 units wrap
    the compiled layers as torchtitan does. Returns how many layers were compiled."""
    llava = model.model if hasattr(model, "model") else model
    layers = [*llava.language_model.layers, *llava.vision_tower.encoder.layers]
    for layer in layers:
        layer.compile()
    return len(layers)


_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrapped(name: str) -> str:
    for prefix in _WRAPPERS:
        name = name.replace(prefix, "")
    return name
