"""The tuner's argument groups (``LlavaTuner``'s ``lora``, ``vision``, ``optim``, ``memory``),
each checked when it is built: a bad value stops a run before any weight loads.

In a config they are nested blocks (``model.init_args.lora.r``); an overlay sets only the fields
it names (``conf/perf/lean.yaml``). The flat keys they replace are refused by the CLI naming
their new place (:data:`MOVED_ARGS`), and read from checkpoints written before the groups
(:func:`grouped_hparams`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

from biomedvital.config_keys import ConfigError

KEY = "model.init_args"
"""Where the groups sit in a config: messages name the key as a config spells it."""

LoraScope = Literal["language_model", "all"]
FsdpUnit = Literal["layer", "model"]


def _one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{KEY}.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
        )


def _within(name: str, value: float, low: float, high: float, *, high_open: bool) -> None:
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        raise ConfigError(
            f"{KEY}.{name} must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {value}"
        )


@dataclass(frozen=True)
class LoraArgs:
    """LoRA adapters (``mode: lora``); LLaVA-1.5's task recipe by default.

    Args:
        r: adapter rank (LLaVA-1.5: 128).
        alpha: adapter scale numerator (LLaVA-1.5: 256).
        dropout: dropout on the adapter input (LLaVA-1.5: 0.05).
        target_modules: module names to adapt (default: every Llama linear layer).
        scope: ``language_model`` (the vision tower is never adapted) or ``all`` (the tower's
            linear layers get adapters too, which train; its weights stay frozen).
    """

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | None = None
    scope: LoraScope = "language_model"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"{KEY}.lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"{KEY}.lora.alpha must be > 0, got {self.alpha}")
        _within("lora.dropout", self.dropout, 0.0, 1.0, high_open=True)
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError(
                f"{KEY}.lora.target_modules is empty: leave it unset for every Llama linear"
            )
        _one_of("lora.scope", self.scope, ("language_model", "all"))


@dataclass(frozen=True)
class VisionArgs:
    """What trains on the image side (LLaVA and LLaVA-Med: the projector, not the tower).

    Args:
        train_projector: whether the vision-language projector trains.
        freeze_tower: keep the CLIP tower's own weights frozen (always frozen in LoRA mode).
    """

    train_projector: bool = True
    freeze_tower: bool = True


@dataclass(frozen=True)
class OptimArgs:
    """AdamW with linear warmup and a cosine schedule, per parameter group.

    Args:
        lr: learning rate of the adapters (LoRA) or the language model (full). LoRA: 2e-4;
            full (LLaVA-Med stage 2): 2e-5.
        projector_lr: learning rate of the projector (LLaVA-1.5 LoRA: 2e-5); ``None`` = ``lr``.
        weight_decay: AdamW weight decay (LLaVA: 0); biases and norm weights are exempt.
        betas: AdamW betas.
        warmup_ratio: share of optimizer steps with linear warmup (LLaVA: 0.03).
        min_lr_ratio: the cosine schedule's floor as a share of each group's lr (LLaVA: 0).
        fp32_trainable: under a mixed ``precision`` (``bf16-mixed``), keep the trainable
            parameters (projector; all of them in full mode) in float32 whatever ``dtype``
            loads the weights (peft already does so for adapters): AdamW's updates of bf16
            weights mostly round away (lr 2e-5 on weights of ~1e-2 is below bf16's step).
            Autocast computes in bf16 either way; frozen weights keep ``dtype``.
    """

    lr: float = 2e-4
    projector_lr: float | None = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    fp32_trainable: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # a list from YAML or a checkpoint
        if self.lr <= 0:
            raise ConfigError(f"{KEY}.optim.lr must be > 0, got {self.lr}")
        if self.projector_lr is not None and self.projector_lr <= 0:
            raise ConfigError(
                f"{KEY}.optim.projector_lr must be > 0 or null, got {self.projector_lr}"
            )
        if self.weight_decay < 0:
            raise ConfigError(f"{KEY}.optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2:
            raise ConfigError(f"{KEY}.optim.betas must be two numbers, got {list(self.betas)}")
        for beta in self.betas:
            _within("optim.betas", beta, 0.0, 1.0, high_open=True)
        _within("optim.warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        _within("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, high_open=False)


@dataclass(frozen=True)
class MemoryArgs:
    """Activation memory and sharding; each option keeps the gradients of the plain path.

    Args:
        gradient_checkpointing: recompute activations in the backward pass (less memory, more
            compute); non-reentrant, so frozen inputs need no hooks.
        checkpoint_every: with ``gradient_checkpointing``, recompute only every k-th decoder
            layer (1: all). Memory left over by a batch is better spent keeping activations
            than recomputing them (``bench/tuner_mfu.py``).
        lora_dropout_recompute: fold each adapter's input dropout into its ``lora_A`` and redraw
            the mask in the backward (``lora_memory.py``): the same gradients without a dropped
            copy of the input per adapted layer (``bench/tuner_activation_memory.py``), for a
            little more compute.
        compile: regional ``torch.compile`` of each decoder and vision-encoder layer (fuses
            the norms, rotary, activation, dropout and adapter arithmetic that eager runs as
            separate memory-bound kernels; the first steps compile). State-dict keys do not
            change.
        fsdp_unit: for FSDP2 (``ModelParallelStrategy``): shard each decoder layer and each
            vision-encoder layer as its own unit (``layer``), or only the whole model
            (``model``).
    """

    gradient_checkpointing: bool = False
    checkpoint_every: int = 1
    lora_dropout_recompute: bool = False
    compile: bool = False
    fsdp_unit: FsdpUnit = "layer"

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ConfigError(
                f"{KEY}.memory.checkpoint_every must be >= 1, got {self.checkpoint_every}"
            )
        _one_of("memory.fsdp_unit", self.fsdp_unit, ("layer", "model"))


GROUPS: dict[str, type] = {
    "lora": LoraArgs,
    "vision": VisionArgs,
    "optim": OptimArgs,
    "memory": MemoryArgs,
}

MOVED_ARGS: dict[str, str] = {
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_scope": "lora.scope",
    "train_projector": "vision.train_projector",
    "freeze_vision_tower": "vision.freeze_tower",
    "lr": "optim.lr",
    "projector_lr": "optim.projector_lr",
    "weight_decay": "optim.weight_decay",
    "betas": "optim.betas",
    "warmup_ratio": "optim.warmup_ratio",
    "min_lr_ratio": "optim.min_lr_ratio",
    "fp32_trainable": "optim.fp32_trainable",
    "gradient_checkpointing": "memory.gradient_checkpointing",
    "checkpoint_every": "memory.checkpoint_every",
    "lora_dropout_recompute": "memory.lora_dropout_recompute",
    "compile": "memory.compile",
    "fsdp_unit": "memory.fsdp_unit",
}
"""``LlavaTuner``'s flat arguments before the groups, and where each went."""

G = TypeVar("G")


def as_group(cls: type[G], value: G | Mapping[str, Any] | None) -> G:
    """``value`` as the group ``cls``: as is, built from a mapping (hyper-parameters read back
    from a checkpoint or given by Lightning), or the defaults for ``None``. An unknown field is
    refused naming the group's fields."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {unknown[0]!r}; fields: {sorted(known)}")
    return cls(**value)


def group_dicts(groups: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The groups as plain dicts (what checkpoints and MLflow store: no pickled classes)."""
    return {name: asdict(group) for name, group in groups.items()}


def grouped_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A tuner checkpoint's hyper-parameters as ``LlavaTuner``'s arguments: Lightning's own
    entries (``_class_path``, ``_instantiator``) left out, and the flat keys of a checkpoint
    written before the groups moved into them (:data:`MOVED_ARGS`)."""
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if key.startswith("_"):
            continue
        if key in MOVED_ARGS:
            group, name = MOVED_ARGS[key].split(".")
            out.setdefault(group, {})[name] = value
        elif key in GROUPS and isinstance(value, Mapping):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out
