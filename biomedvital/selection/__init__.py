"""Selection stage: the preference-trained data-selection model and top-k selection.

The Lightning classes are imported on first use, so ``select`` (numpy and the records only)
starts without torch.
"""

from typing import Any

__all__ = ["ScoreWriter", "SelectorDataModule", "SelectorModule"]

_LAZY = {
    "SelectorDataModule": "biomedvital.selection.datamodule",
    "SelectorModule": "biomedvital.selection.module",
    "ScoreWriter": "biomedvital.selection.writer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'biomedvital.selection' has no attribute {name!r}")
