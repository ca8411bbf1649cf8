"""Selection stage: the preference-trained data-selection model and top-k selection."""

from biomedvital.selection.datamodule import SelectorDataModule
from biomedvital.selection.module import SelectorModule
from biomedvital.selection.writer import ScoreWriter

__all__ = ["ScoreWriter", "SelectorDataModule", "SelectorModule"]
