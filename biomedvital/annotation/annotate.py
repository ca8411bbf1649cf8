"""``python -m biomedvital annotate``: serve the clinician annotation page, or export its journals."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from biomedvital.annotation.export import export_annotations
from biomedvital.annotation.images import ImageServer
from biomedvital.annotation.items import read_items, write_demo_items
from biomedvital.annotation.journal import Journal, check_annotator, journal_path, read_journal
from biomedvital.annotation.server import AnnotationApp, build_server, check_binding, server_url
from biomedvital.annotation.session import AnnotationSession
from biomedvital.data.images import ImageRoot

DEMO_ITEMS = "demo_items.jsonl"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def annotate(
    items: Path | None = None,
    out: Path = Path("annotations"),
    annotator: str | None = None,
    image_root: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    token_env: str = "BIOMEDVITAL_ANNOTATE_TOKEN",
    seed: int = 0,
    export: bool = False,
    export_dir: Path | None = None,
    demo: Path | None = None,
) -> dict | None:
    """Serve the clinician annotation page for paired answers, or export what was judged.

    Args:
        items: paired-answer items (``generate --answers 2`` writes ``pairs.jsonl``).
        out: annotation folder: one journal per annotator (``journal.<annotator>.jsonl``).
        annotator: who is judging (letters, digits, ``_.@-``); needed to serve.
        image_root: folder the items' image paths are relative to (they cannot escape it).
        host: address to bind; anything but loopback needs an access token.
        port: port to bind (0: a free one; the address is printed).
        token_env: environment variable holding the access token (never the token itself);
            when set, the page asks for the token, on loopback too.
        seed: seeds the per-annotator random order of the two answers.
        export: write ``preferences.jsonl``, ``marks.jsonl`` and ``report.json`` (counts,
            Cohen's kappa) from all journals in ``out`` instead of serving.
        export_dir: where the export goes (default ``<out>/export``).
        demo: annotate the embedded demo: written to this folder (e.g. ``data/demo``) when
            missing, items built from its preference pairs into ``<out>/demo_items.jsonl``,
            images from ``<demo>/images``.
    """
    out = Path(out)
    if demo is not None:
        if items is not None:
            raise ValueError("give either --items or --demo, not both")
        items, demo_images = write_demo_items(demo, out / DEMO_ITEMS)
        image_root = image_root or demo_images
    if items is None:
        raise ValueError("--items is required (or --demo DIR for the embedded demo)")
    if export:
        report = export_annotations(items, out, export_dir)
        return {
            "counts": report["counts"],
            "mean_preference_kappa": report["agreement"]["mean_preference_kappa"],
            "outputs": {
                **report["outputs"],
                "report": str(Path(report["outputs"]["preferences"]).with_name("report.json")),
            },
        }

    if annotator is None:
        raise ValueError("--annotator NAME is required to serve the page")
    check_annotator(annotator)
    token = os.environ.get(token_env) or None
    check_binding(host, token)
    if image_root is None:
        raise ValueError("--image_root is required to serve the page")
    item_list = read_items(items)
    root = ImageRoot(image_root)
    jpath = journal_path(out, annotator)
    journal = Journal(jpath).open()
    try:
        session = AnnotationSession(item_list, journal, annotator, seed, read_journal(jpath))
        server = build_server(AnnotationApp(session, ImageServer(root), token), host, port)
        try:
            progress = session.progress()
            torn = session.journal_counts["torn_lines"]
            print(
                f"annotate: {annotator} on {len(item_list)} items "
                f"({progress['done']} judged, {progress['flagged']} flagged"
                + (f", {torn} torn journal line(s) ignored" if torn else "")
                + f"); journal {jpath}\nannotate: serving {server_url(server, host)}"
                + (" (access token required)" if token else ""),
                flush=True,
            )
            main = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
            try:
                server.serve_forever(poll_interval=0.25)
            except KeyboardInterrupt:
                print("annotate: stopped", file=sys.stderr, flush=True)
            finally:
                if main:
                    signal.signal(signal.SIGTERM, previous)
        finally:
            server.server_close()
    finally:
        journal.close()
    return None
