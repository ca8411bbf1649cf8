"""A tiny VQA set over the demo's images, in VQA-RAD's published layout (``demo-vqa`` verb).

Questions are derived from the demo figures (``biomedvital/data/demo_content.json``): for every
image, a closed question on its own modality (yes), one on another image's modality (no), an open
question on the modality, and, where the demo's caption states it plainly, a closed and an open
question on a finding (hand-written below, answer taken from the caption). The file is what
``load_vqa_rad`` reads (``qid``, ``image_name``, ``question``, ``answer``, ``answer_type``,
``phrase_type: test_freeform``), so ``conf/eval/demo_vqa.yaml`` evaluates a tuned model on it with
the same code path as the real benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomedvital.data.demo import load_demo_content
from biomedvital.data.jsonio import write_json, write_jsonl

DEMO_VQA_FILE = "data/demo_vqa/demo_vqa.json"
DEMO_CHAT_FILE = "data/demo_vqa/demo_chat.jsonl"

# LLaVA-Med-Bench files every question under one of five domains; the demo figures outside them
# (fundus photographs, a cell micrograph) carry no flag, so the chat questions count them as the
# nearest one: photographs as gross, micrographs as histology
_CHAT_DOMAIN = {"retina": "gross", "microaneurysms": "gross", "cell": "histology"}

# key -> (closed question, yes/no, open question, answer): facts stated in the demo's caption
_FINDINGS: dict[str, tuple[str, str, str, str]] = {
    "ct_small": (
        "Is there a fracture of the vertebra?",
        "no",
        "What bony structure is at the centre of the image?",
        "spine",
    ),
    "mr_small": (
        "Is the cerebrospinal fluid bright?",
        "yes",
        "Which fluid appears bright in this image?",
        "cerebrospinal fluid",
    ),
    "ihc": (
        "Is a stain used in this image?",
        "yes",
        "What colour is the positive staining?",
        "brown",
    ),
    "retina": (
        "Are there haemorrhages in the retina?",
        "no",
        "Which eye is shown?",
        "left",
    ),
    "cell": (
        "Is a stain used in this image?",
        "no",
        "How many cells are shown?",
        "one",
    ),
    "microaneurysms": (
        "Are microaneurysms visible?",
        "yes",
        "What lesion do the small dark dots represent?",
        "microaneurysms",
    ),
}


def _record(qid: int, image: dict[str, Any], question: str, answer: str, closed: bool) -> dict:
    return {
        "qid": qid,
        "image_name": image["file"],
        "image_organ": image["key"],
        "question": question,
        "answer": answer,
        "answer_type": "CLOSED" if closed else "OPEN",
        "question_type": "MODALITY",
        "phrase_type": "test_freeform",
        "question_rephrase": "NULL",
    }


def demo_vqa_records() -> list[dict[str, Any]]:
    """The demo VQA questions in VQA-RAD's layout (deterministic; ids 0..n-1)."""
    images = load_demo_content()["images"]
    modalities = [str(im["modality"]) for im in images]
    out: list[dict[str, Any]] = []
    for i, im in enumerate(images):
        own = modalities[i]
        other = next(
            (m for m in modalities[i + 1 :] + modalities[:i] if m.split()[0] != own.split()[0]),
            None,
        )
        rows = [(f"Is the imaging modality {own}?", "yes", True)]
        if other is not None:
            rows.append((f"Is the imaging modality {other}?", "no", True))
        rows.append(("What kind of image is this?", own, False))
        if im["key"] in _FINDINGS:
            cq, ca, oq, oa = _FINDINGS[im["key"]]
            rows += [(cq, ca, True), (oq, oa, False)]
        for question, answer, closed in rows:
            out.append(_record(len(out), im, question, answer, closed))
    return out


def demo_chat_records() -> list[dict[str, Any]]:
    """The demo VQA questions in LLaVA-Med-Bench's question layout, for ``judge``: same ids,
    the ground-truth answer as the reference (``gpt4_answer``), the figure's caption and
    mentions, type ``conversation`` and a domain flag."""
    images = {im["key"]: im for im in load_demo_content()["images"]}
    out = []
    for rec in demo_vqa_records():
        im = images[rec["image_organ"]]
        flags = dict(im["domain"])
        if not any(flags.values()):
            flags[_CHAT_DOMAIN[im["key"]]] = True
        out.append(
            {
                "question_id": str(rec["qid"]),
                "pair_id": im["pair_id"],
                "image": rec["image_name"],
                "text": rec["question"],
                "gpt4_answer": rec["answer"],
                "fig_caption": im["fig_caption"],
                "in_text_mention": im["in_text_mention"],
                "type": "conversation",
                "domain": flags,
            }
        )
    return out


def write_demo_vqa(out: str | Path = DEMO_VQA_FILE) -> Path:
    """Write the demo VQA set (a JSON array, VQA-RAD layout) atomically; returns its path."""
    out = Path(out)
    write_json(out, demo_vqa_records())
    write_jsonl(out.with_name(Path(DEMO_CHAT_FILE).name), demo_chat_records())
    return out


def demo_vqa(out: str = DEMO_VQA_FILE, demo_dir: str = "data/demo") -> dict[str, Any]:
    """Write the demo VQA questions (VQA-RAD layout) and make sure the demo images exist.

    Args:
        out: the JSON file to write (read by ``conf/eval/demo_vqa.yaml``).
        demo_dir: the demo pool folder whose ``images/`` the questions refer to (written if
            missing or outdated).
    """
    from biomedvital.data.demo import materialize_demo

    from .benchmarks import load_vqa_rad, split_stats

    files = materialize_demo(demo_dir)
    path = write_demo_vqa(out)
    return {
        "questions": str(path),
        "chat_questions": str(path.with_name(Path(DEMO_CHAT_FILE).name)),
        "image_root": str(files.images),
        "counts": split_stats(load_vqa_rad(path, "test")),
    }
