"""Clinician annotation: a local web page on which clinicians judge the paired answers that
``generate --answers 2`` writes, and the export that turns their judgments into the preference
records the selector trains on.

* :mod:`.items` reads the paired-answer items (and builds them for the embedded demo);
* :mod:`.journal` keeps every judgment in an append-only, fsynced journal per annotator;
* :mod:`.session` is one annotator's view of the items: shown order, progress, resume point;
* :mod:`.images` turns item images (DICOM windowed) into bytes a browser shows;
* :mod:`.server` serves the page and its JSON API on loopback (token beyond loopback);
* :mod:`.agreement` computes Cohen's kappa; :mod:`.export` writes records and the report;
* :mod:`.annotate` is the ``python -m biomedvital annotate`` verb.
"""

from .agreement import cohen_kappa
from .export import export_annotations
from .items import AnnotationItem, read_items
from .journal import Journal, Judgment, read_journal

__all__ = [
    "AnnotationItem",
    "Journal",
    "Judgment",
    "cohen_kappa",
    "export_annotations",
    "read_items",
    "read_journal",
]
