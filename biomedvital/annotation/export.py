"""Export: every annotator's journal becomes preference records for the selector, plus a report.

Written atomically to the export folder:

* ``preferences.jsonl`` — one :class:`~biomedvital.data.records.Preference` per judged item and
  annotator that preferred one answer (``equal`` gives none), id ``<item>@<annotator>``; this is
  the file the selector's ``preferences:`` reads. A preference on a partly judged item (an
  answer left unmarked) is not exported: the page shows it as unfinished, so the clinician may
  still change it; it is counted as ``partial_preferences`` (per annotator and in all);
* ``marks.jsonl`` — one :class:`~biomedvital.data.records.AnswerMarks` per item and annotator with
  both answers marked (kept apart: read together with the pairs it would count them twice);
* ``report.json`` — counts per annotator, flagged items with their comments, position bias, and
  Cohen's kappa between each pair of annotators on the items both judged.

All answers are in the item's order: the order each annotator saw is undone (and kept as
``shown_order`` for position-bias audits). Flagged items, judgments of items that changed or
vanished since, and torn journal lines are left out and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from biomedvital.annotation.agreement import agreement
from biomedvital.annotation.items import AnnotationItem, read_items
from biomedvital.annotation.journal import Judgment, read_journal
from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import PathLike, write_json, write_jsonl
from biomedvital.data.records import AnswerMarks, MarkedAnswer, Preference

JOURNAL_GLOB = "journal.*.jsonl"


def _annotator_of(path: Path) -> str:
    return path.name[len("journal.") : -len(".jsonl")]


def _shared(item: AnnotationItem, annotator: str, j: Judgment) -> dict[str, Any]:
    return {
        "id": f"{item.id}@{annotator}",
        "item_id": item.id,
        "image": item.image,
        "question": item.display_question(),
        "fig_caption": item.fig_caption,
        "in_text_mention": item.in_text_mention,
        "pair_id": item.pair_id,
        "annotator": annotator,
        "comment": j.comment,
        "judged_at": j.time,
        "shown_order": list(j.shown),
    }


def _agreement_between(
    a: dict[str, Judgment], b: dict[str, Judgment], order: dict[str, int]
) -> dict[str, Any]:
    shared = sorted(a.keys() & b.keys(), key=order.__getitem__)
    pref_a = [str(a[i].original_preferred()) for i in shared]
    pref_b = [str(b[i].original_preferred()) for i in shared]
    marks_a = [m for i in shared for m in a[i].original_marks()]
    marks_b = [m for i in shared for m in b[i].original_marks()]
    return {
        "shared_items": len(shared),
        "preference": agreement(pref_a, pref_b),
        "acceptable": agreement(marks_a, marks_b),
    }


def _new_counts(state_counts: dict[str, Any]) -> dict[str, Any]:
    """An annotator's counts: the journal's own, then what the export kept and left out."""
    return {
        **state_counts,
        "judged": 0,
        "flagged": 0,
        "partial": 0,
        "partial_preferences": 0,
        "preferences": 0,
        "equal": 0,
        "marks": 0,
        "preferred_unacceptable": 0,
        "preferred_position_A": 0,
        "unknown_items": 0,
        "changed_items": 0,
        "other_annotator": 0,
    }


@dataclass
class _Exported:
    """What the journals yield, gathered annotator by annotator in journal-file order."""

    prefs: list[Preference] = field(default_factory=list)
    marks: list[AnswerMarks] = field(default_factory=list)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    judged: dict[str, dict[str, Judgment]] = field(default_factory=dict)
    per_annotator: dict[str, dict[str, Any]] = field(default_factory=dict)
    journal_inputs: dict[str, dict[str, str]] = field(default_factory=dict)


def _usable(
    item: AnnotationItem | None, j: Judgment, name: str, c: dict[str, Any]
) -> AnnotationItem | None:
    """The item a judgment may be exported for, or None (counted under its reason)."""
    if item is None:
        c["unknown_items"] += 1
        return None
    if j.digest != item.digest():
        c["changed_items"] += 1
        return None
    if j.annotator != name:
        c["other_annotator"] += 1
        return None
    return item


def _export_judgment(
    item: AnnotationItem, name: str, j: Judgment, c: dict[str, Any], ex: _Exported
) -> None:
    """One annotator's latest judgment of one item: its marks and preference records."""
    if j.flagged:
        c["flagged"] += 1
        ex.flagged.append({"item": item.id, "annotator": name, "comment": j.comment})
        return
    if j.status == "partial":
        c["partial"] += 1
    if j.judged:
        c["judged"] += 1
        ex.judged[name][item.id] = j
    shared = _shared(item, name, j)
    original = j.original_marks()
    if all(m is not None for m in original):
        answers = [MarkedAnswer(text=item.answers[k], acceptable=bool(original[k])) for k in (0, 1)]
        ex.marks.append(AnswerMarks(answers=answers, **shared))
        c["marks"] += 1
    pref = j.original_preferred()
    if not j.judged:
        # unfinished: the same count as the page's "partly judged", never a record
        c["partial_preferences"] += isinstance(pref, int)
    elif pref == "equal":
        c["equal"] += 1
    elif isinstance(pref, int):
        ex.prefs.append(
            Preference(preferred=item.answers[pref], rejected=item.answers[1 - pref], **shared)
        )
        c["preferences"] += 1
        c["preferred_position_A"] += j.preferred == "A"
        if original[pref] is False and original[1 - pref] is True:
            c["preferred_unacceptable"] += 1


def _export_journal(
    path: Path, by_id: dict[str, AnnotationItem], order: dict[str, int], ex: _Exported
) -> None:
    """One annotator's journal: its latest judgments, in item order, into ``ex``."""
    name = _annotator_of(path)
    state = read_journal(path)
    # the hash of the bytes exported from: a server still running may append meanwhile
    ex.journal_inputs[name] = {"path": str(path), "sha256": state.sha256}
    c = _new_counts(state.as_dict())
    ex.judged[name] = {}
    for item_id in sorted(state.latest, key=lambda i: order.get(i, len(order))):
        j = state.latest[item_id]
        item = _usable(by_id.get(item_id), j, name, c)
        if item is not None:
            _export_judgment(item, name, j, c, ex)
    ex.per_annotator[name] = c


def _report(
    ex: _Exported,
    item_list: list[AnnotationItem],
    order: dict[str, int],
    items_path: Path,
    out: Path,
) -> dict[str, Any]:
    """Counts, agreement between each pair of annotators, flagged items, outputs and inputs."""
    pairs = {
        f"{a}|{b}": _agreement_between(ex.judged[a], ex.judged[b], order)
        for a, b in combinations(sorted(ex.judged), 2)
    }
    kappas = [
        p["preference"]["kappa"] for p in pairs.values() if p["preference"]["kappa"] is not None
    ]
    return {
        "counts": {
            "items": len(item_list),
            "annotators": len(ex.per_annotator),
            "judged_by_any": len(set().union(*(set(v) for v in ex.judged.values()))),
            "preferences": len(ex.prefs),
            "marks": len(ex.marks),
            "flagged": len(ex.flagged),
            "partial_preferences": sum(c["partial_preferences"] for c in ex.per_annotator.values()),
        },
        "annotators": ex.per_annotator,
        "agreement": {
            "pairs": pairs,
            "mean_preference_kappa": sum(kappas) / len(kappas) if kappas else None,
            "labels": {
                "preference": "item answer index preferred ('0', '1') or 'equal'",
                "acceptable": "per answer, in item order",
            },
        },
        "flagged_items": ex.flagged,
        "outputs": {
            "preferences": str(out / "preferences.jsonl"),
            "marks": str(out / "marks.jsonl"),
        },
        "inputs": {
            "items": {"path": str(items_path), "sha256": sha256_file(items_path)},
            "journals": ex.journal_inputs,
        },
    }


def export_annotations(
    items: PathLike, annotations: PathLike, export_dir: PathLike | None = None
) -> dict[str, Any]:
    """Turn the journals under ``annotations`` into preference records and a report.

    Returns the report (also written as ``report.json``).
    """
    items_path, ann_dir = Path(items), Path(annotations)
    out = Path(export_dir) if export_dir is not None else ann_dir / "export"
    item_list = read_items(items_path)
    by_id = {it.id: it for it in item_list}
    order = {it.id: i for i, it in enumerate(item_list)}
    journals = sorted(ann_dir.glob(JOURNAL_GLOB))
    if not journals:
        raise FileNotFoundError(f"no annotator journals ({JOURNAL_GLOB}) in {ann_dir}")

    ex = _Exported()
    for path in journals:
        _export_journal(path, by_id, order, ex)
    report = _report(ex, item_list, order, items_path, out)
    write_jsonl(out / "preferences.jsonl", ex.prefs)
    write_jsonl(out / "marks.jsonl", ex.marks)
    write_json(out / "report.json", report)
    return report
