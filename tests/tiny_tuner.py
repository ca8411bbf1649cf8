"""The tiny LLaVA tuner that tests train: one definition of its model and data blocks, for the
tuning, evaluation and reliability tests (each adds the trainer its check needs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_tuner_model(**init_args: Any) -> dict[str, Any]:
    """``LlavaTuner`` on ``tiny:tiny-llava`` with LoRA r 4; a random tiny model needs a larger
    lr than LLaVA's 2e-4 to move in two steps. An argument group given (``lora={"dropout":
    0.0}``) sets only the fields it names."""
    args: dict[str, Any] = {
        "model": "tiny:tiny-llava",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "optim": {"lr": 1e-3, "projector_lr": 1e-4, "warmup_ratio": 0.25},
    }
    for key, value in init_args.items():
        group = isinstance(value, dict) and isinstance(args.get(key), dict)
        args[key] = {**args[key], **value} if group else value
    return {"class_path": "biomedvital.tuning.LlavaTuner", "init_args": args}


def tiny_tuner_data(data: Path | str, image_root: Path | str, **init_args: Any) -> dict[str, Any]:
    """``TunerDataModule`` over a ``selected.json``, in the main process (no workers)."""
    return {
        "class_path": "biomedvital.tuning.TunerDataModule",
        "init_args": {
            "data": str(data),
            "image_root": str(image_root),
            "max_length": 192,
            "batch_size": 4,
            "num_workers": 0,
            **init_args,
        },
    }
