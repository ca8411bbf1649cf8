"""How a benchmark question is asked: the system prompt and the question's text.

One definition for both ways of answering a benchmark: ``test`` (Hugging Face ``generate`` on
the rendered prompt, :mod:`.vqa_eval`) and ``answer`` (an OpenAI-compatible endpoint whose chat
template renders the messages, :mod:`.answer`). A tuned model is asked with the system prompt it
was trained with, as its export records it (``run.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomedvital.data.records import IMAGE_TOKEN
from biomedvital.tuning import models
from biomedvital.tuning.conversation import VICUNA_V1_SYSTEM


def question_text(
    question: str, answer_type: str, prompt_suffix: str = "", closed_prompt_suffix: str = ""
) -> str:
    """The question as asked: the benchmark's text, ``prompt_suffix``, and for closed questions
    ``closed_prompt_suffix`` (LLaVA-Med's "Please choose from ..."), joined by spaces."""
    parts = [question.strip()]
    if prompt_suffix:
        parts.append(prompt_suffix)
    if answer_type == "closed" and closed_prompt_suffix:
        parts.append(closed_prompt_suffix)
    return " ".join(parts)


def system_prompt(configured: str | None, trained: str | None) -> str:
    """The system prompt asked with: as configured, else the one the model was tuned with, else
    LLaVA-1.5's vicuna_v1 system (a model tuned without one must not be asked with that)."""
    for system in (configured, trained):
        if isinstance(system, str):
            return system
    return VICUNA_V1_SYSTEM


def export_record(folder: str | Path) -> dict[str, Any]:
    """``run.json`` in or above a model folder (``export/merged`` → ``export/run.json``), as
    ``ExportTuned`` writes it; ``{}`` when there is none or it cannot be read."""
    return models.export_record(f"local-dir:{Path(folder).expanduser()}")


def chat_messages(system: str, question: str, image_url: str) -> list[dict[str, Any]]:
    """The OpenAI chat messages for one question about one image.

    The system message is always sent, empty too: a tuned model's chat template
    (:func:`~biomedvital.tuning.conversation.chat_template`) puts its training system prompt in
    when there is none, and ``system: ""`` must mean none, as in ``test``. The image comes first,
    as ``<image>\\n`` starts the question in LLaVA's prompt; ``<image>`` written in a question's
    text is removed, as ``test`` removes it.
    """
    text = question.replace(IMAGE_TOKEN, "").strip()
    return [
        {"role": "system", "content": system},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": text},
            ],
        },
    ]
