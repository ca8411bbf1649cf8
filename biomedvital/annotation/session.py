"""One annotator's session over the items: what to show, in which order, and where to resume.

The session reads the annotator's journal at start (judgments of items that changed or vanished
since are set aside and counted), keeps the latest judgment per item in memory, and records each
new one in the journal *before* answering the page, so a judgment the page shows as saved is on
disk.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

from pydantic import ValidationError

from biomedvital.annotation.items import AnnotationItem, shown_order
from biomedvital.annotation.journal import Journal, JournalState, Judgment, now_iso, read_journal


class JudgmentRejected(ValueError):
    """A judgment the page sent that cannot be recorded (wrong item, bad values)."""


class AnnotationSession:
    """Items, one annotator's journal, shown orders and progress."""

    def __init__(
        self,
        items: list[AnnotationItem],
        journal: Journal,
        annotator: str,
        seed: int = 0,
        state: JournalState | None = None,
    ) -> None:
        self.items = items
        self.annotator = annotator
        self.seed = seed
        self.journal = journal
        self._pos = {it.id: i for i, it in enumerate(items)}
        self._lock = threading.Lock()
        state = state if state is not None else read_journal(journal.path)
        self.journal_counts = state.as_dict()
        self.latest: dict[str, Judgment] = {}
        self.set_aside = {"unknown_items": 0, "changed_items": 0, "other_annotator": 0}
        for item_id, j in state.latest.items():
            i = self._pos.get(item_id)
            if i is None:
                self.set_aside["unknown_items"] += 1
            elif j.digest != items[i].digest():
                self.set_aside["changed_items"] += 1
            elif j.annotator != annotator:
                self.set_aside["other_annotator"] += 1
            else:
                self.latest[item_id] = j

    # ------------------------------------------------------------------ reading

    def order(self, index: int) -> list[int]:
        """Shown order of an item: the recorded one if judged before, else the seeded one."""
        item = self.items[index]
        j = self.latest.get(item.id)
        return list(j.shown) if j is not None else shown_order(item.id, self.annotator, self.seed)

    def view_key(self, index: int) -> str:
        """Short hash of what the page shows for an item: its digest and answers in shown order.

        The page sends it back with each judgment, so marks made on one text or order are never
        recorded against another (items regenerated or ``--seed`` changed under a pending save).
        """
        item = self.items[index]
        shown = [item.answers[k] for k in self.order(index)]
        blob = json.dumps([item.digest(), shown], ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    def status(self, index: int) -> str:
        """``todo``, ``partial``, ``done`` or ``flagged``."""
        j = self.latest.get(self.items[index].id)
        return j.status if j is not None else "todo"

    def resume_index(self) -> int | None:
        """The first item not yet judged nor flagged; None once all are."""
        for i, item in enumerate(self.items):
            j = self.latest.get(item.id)
            if j is None or not j.done:
                return i
        return None

    def progress(self) -> dict[str, Any]:
        """Counts and per-item statuses for the progress bar."""
        statuses = [self.status(i) for i in range(len(self.items))]
        return {
            "annotator": self.annotator,
            "total": len(self.items),
            "done": statuses.count("done"),
            "flagged": statuses.count("flagged"),
            "partial": statuses.count("partial"),
            "statuses": statuses,
            "resume": self.resume_index(),
        }

    def item_view(self, index: int) -> dict[str, Any]:
        """What the page shows for one item, answers in the shown order (plain text only)."""
        item = self.items[index]
        order = self.order(index)
        j = self.latest.get(item.id)
        return {
            "index": index,
            "id": item.id,
            "question": item.display_question(),
            "fig_caption": item.fig_caption,
            "in_text_mention": item.in_text_mention,
            "answers": [item.answers[k] for k in order],
            "view": self.view_key(index),
            "judgment": None
            if j is None
            else {
                "acceptable": j.acceptable,
                "preferred": j.preferred,
                "comment": j.comment,
                "flagged": j.flagged,
                "time": j.time,
            },
            "status": self.status(index),
        }

    # ------------------------------------------------------------------ writing

    def record(self, payload: dict[str, Any]) -> Judgment:
        """Validate the page's judgment of one item, append it to the journal, then keep it.

        The shown order is the server's, never the page's: the page only says what it marked
        at positions A and B, and (``view``, from :meth:`item_view`) what it showed there; a
        judgment made on another text or order than the server's now is refused.
        """
        index = payload.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            raise JudgmentRejected("index must be an integer")
        if not 0 <= index < len(self.items):
            raise JudgmentRejected(f"no item at index {index}")
        item = self.items[index]
        if payload.get("annotator", self.annotator) != self.annotator:
            raise JudgmentRejected(
                f"this server records {self.annotator!r}, not {payload.get('annotator')!r}"
            )
        if payload.get("id") != item.id:
            raise JudgmentRejected(
                f"item {index} is {item.id!r}, not {payload.get('id')!r} (reload the page)"
            )
        if "view" in payload and payload["view"] != self.view_key(index):
            raise JudgmentRejected(
                f"item {item.id!r} is no longer shown as it was when judged (its answers or "
                "their order changed since): reload the page and judge it again"
            )
        try:
            j = Judgment(
                item=item.id,
                digest=item.digest(),
                annotator=self.annotator,
                shown=self.order(index),
                acceptable=payload.get("acceptable", [None, None]),
                preferred=payload.get("preferred"),
                comment=payload.get("comment", "") or "",
                flagged=payload.get("flagged", False),
                time=now_iso(),
                client_time=str(payload.get("client_time", ""))[:40],
            )
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise JudgmentRejected(f"{where}: {first.get('msg')}") from None
        with self._lock:
            self.journal.append(j)
            self.latest[item.id] = j
        return j
