"""Loading a LLaVA to answer with: a registry name (:mod:`.registry`) or a tuner checkpoint.

What the evaluation stage imports from tuning: the model, its processor and where they come
from (the name written beside each answer, the MLflow run that trained them, the system prompt
they were tuned with), the prompt format it was tuned with (:func:`prompt`) and its image
preprocessing (:mod:`.image_aspect`).

A ``LlavaTuner`` checkpoint holds only the trainable tensors (LoRA adapters, projector), so the
very same ``LlavaTuner`` is rebuilt from the checkpoint's hyper-parameters (base model, LoRA
rank, targets...; those of a checkpoint written before the arguments were grouped are moved to
their groups), every checkpoint tensor must have a place in it and every trainable tensor must
be present. ``base_model`` replaces the base-model name (e.g. a ``local-dir:`` copy of the
``hf-hub:`` base on an offline cluster).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from biomedvital.data.model_names import parse_model_name
from biomedvital.tuning.args import grouped_hparams
from biomedvital.tuning.conversation import VICUNA_V1_SYSTEM, prompt
from biomedvital.tuning.image_aspect import (
    ImageAspectRatio,
    check_image_aspect_ratio,
    recorded_image_aspect_ratio,
    set_image_aspect_ratio,
)
from biomedvital.tuning.module import LlavaTuner
from biomedvital.tuning.registry import (
    PREFIXES,
    LlavaBundle,
    available_tiny,
    create_llava,
    image_token_count,
    tiny_tokenizer,
)

__all__ = [
    "PREFIXES",
    "ImageAspectRatio",
    "VICUNA_V1_SYSTEM",
    "LlavaBundle",
    "LoadedLlava",
    "available_tiny",
    "check_image_aspect_ratio",
    "checkpoint_source",
    "create_llava",
    "exported_by",
    "export_record",
    "image_token_count",
    "is_tuner_checkpoint",
    "load_llava",
    "load_tuner_checkpoint",
    "prompt",
    "recorded_image_aspect_ratio",
    "set_image_aspect_ratio",
    "tiny_tokenizer",
    "tuner_from_checkpoint",
]


@dataclass
class LoadedLlava:
    """A model ready to answer, and where it comes from.

    ``source`` names it beside each answer; ``upstream_run`` is the MLflow run that trained it
    and ``trained_system`` the system prompt it was tuned with, where its export records them.
    """

    model: Any  # LlavaForConditionalGeneration (in its PEFT wrapper for a LoRA checkpoint)
    processor: Any
    source: str
    upstream_run: str | None = None
    trained_system: str | None = None


def export_record(model: str) -> dict[str, Any]:
    """``run.json`` beside or above a ``local-dir:`` model's weights, as ``ExportTuned``
    writes it; ``{}`` for other prefixes, when there is none or it cannot be read."""
    parsed = parse_model_name(model, PREFIXES)
    if parsed.prefix != "local-dir:":
        return {}
    folder = Path(parsed.value).expanduser()
    for candidate in (folder / "run.json", folder.parent / "run.json"):
        if candidate.is_file():
            try:
                record = json.loads(candidate.read_text())
            except (ValueError, OSError):
                return {}
            return record if isinstance(record, dict) else {}
    return {}


def exported_by(model: str) -> str | None:
    """The tuning run that exported a ``local-dir:`` model (``run.json`` beside or above the
    merged weights, as ``ExportTuned`` writes), for the evaluation run's lineage tag."""
    run_id = export_record(model).get("mlflow_run_id")
    return run_id if isinstance(run_id, str) else None


def load_llava(name: str, *, seed: int = 0, dtype: torch.dtype | None = None) -> LoadedLlava:
    """The registry's model ``name`` with what its export says about it."""
    bundle = create_llava(name, seed=seed, dtype=dtype)
    system = export_record(name).get("system_prompt")
    return LoadedLlava(bundle.model, bundle.processor, name, exported_by(name), system)


def is_tuner_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """A ``LlavaTuner`` checkpoint: its hyper-parameters name a model and a tuning mode."""
    hp = checkpoint.get("hyper_parameters") or {}
    return "model" in hp and hp.get("mode") in ("lora", "full") and "state_dict" in checkpoint


def tuner_from_checkpoint(
    checkpoint: dict[str, Any],
    source: str = "checkpoint",
    *,
    base_model: str | None = None,
    dtype: str | None = None,
) -> LlavaTuner:
    """The ``LlavaTuner`` that wrote ``checkpoint``, rebuilt without its trained tensors, after
    checking that they fit it (every tensor has a place, every trainable one is there). Its
    processor preprocesses images as the run that wrote the checkpoint did (the data module's
    ``image_aspect_ratio``, which the checkpoint records).

    ``source`` names the checkpoint in errors; ``base_model`` and ``dtype`` replace the
    checkpoint's base-model name and load dtype."""
    if not is_tuner_checkpoint(checkpoint):
        raise ValueError(
            f"{source}: not a LlavaTuner checkpoint (no 'model'/'mode' hyper-parameters); "
            "evaluate a Hugging Face folder with model: local-dir:PATH instead"
        )
    hp = grouped_hparams(checkpoint["hyper_parameters"])
    if dtype:
        hp["dtype"] = dtype
    if base_model is not None:
        hp["model"] = base_model
    tuner = LlavaTuner(**hp)
    state = checkpoint["state_dict"]
    unexpected = sorted(set(state) - set(tuner.state_dict()))
    if unexpected:
        raise KeyError(
            f"{source}: {len(unexpected)} tensor(s) have no place in the rebuilt "
            f"{hp.get('model')!r} ({hp.get('mode')}) model, e.g. {unexpected[0]}"
        )
    missing = sorted(tuner.trainable_keys() - set(state))
    if missing:
        raise KeyError(f"{source}: lacks {len(missing)} trainable tensor(s), e.g. {missing[0]}")
    trained = (checkpoint.get("TunerDataModule") or {}).get("image_aspect_ratio")
    if trained is not None:
        set_image_aspect_ratio(tuner.processor, trained)
    return tuner


def load_tuner_checkpoint(
    path: str | Path, *, base_model: str | None = None, dtype: str | None = None
) -> LoadedLlava:
    """A tuner checkpoint file's model with its trained tensors, and the run that wrote it.
    Read with ``weights_only`` (never runs pickled code) and memory-mapped."""
    from biomedvital.tracking.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(path, mmap=True)
    tuner = tuner_from_checkpoint(checkpoint, str(path), base_model=base_model, dtype=dtype)
    tuner.load_state_dict(checkpoint["state_dict"], strict=False)  # keys checked above
    return LoadedLlava(
        tuner.model,
        tuner.processor,
        checkpoint_source(checkpoint, str(path), base_model),
        checkpoint.get("mlflow_run_id"),
    )


def checkpoint_source(checkpoint: dict[str, Any], source: str, base_model: str | None) -> str:
    """The name written beside the answers of a checkpoint's model: base model + checkpoint."""
    name = base_model or str(checkpoint["hyper_parameters"].get("model"))
    return f"{name} + {source}"
