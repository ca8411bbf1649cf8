"""Tuning stage: visual instruction tuning of LLaVA on the selected data (LoRA or full)."""

from biomedvital.tuning.args import LoraArgs, MemoryArgs, OptimArgs, VisionArgs
from biomedvital.tuning.datamodule import TunerDataModule
from biomedvital.tuning.export import ExportTuned
from biomedvital.tuning.module import LlavaTuner

__all__ = [
    "ExportTuned",
    "LlavaTuner",
    "LoraArgs",
    "MemoryArgs",
    "OptimArgs",
    "TunerDataModule",
    "VisionArgs",
]
