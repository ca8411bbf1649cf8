"""Prompts for generating instruction conversations (and answer pairs) about biomedical figures.

The wording is this project's own; what it asks for follows the paper's stage 1: a multi-turn
conversation of 4-5 exchanges, varied questions (modality, organ, location, abnormality, size and
count, reasoning; yes/no and open), the terminology of the caption and in-text mentions, and
answers phrased as if the assistant looked at the image itself. Demonstrations are clinician-picked
conversations, one drawn per modality for each figure, sent as text (no demonstration images).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from biomedvital.data.records import Demonstration, SourceFigure, strip_image_token

MODALITIES = ("chest_xray", "mri", "ct_scan", "histology", "gross")
"""The domain flags of LLaVA-Med's figures, in the order demonstrations are laid out."""

SYSTEM_PROMPT = """\
You are a biomedical imaging specialist preparing training data for a vision-language assistant \
that will answer questions about medical images. For each figure you receive its label, caption \
and the sentences of the article that refer to it. Treat that text as your own knowledge of the \
image: the person asking sees only the image.

Write a conversation between a User, who asks about the image, and an Assistant, who answers.
- The User speaks first. Write 4 to 5 question-answer exchanges.
- Vary the questions: the imaging modality or stain, the organ or tissue shown, where a finding \
lies, what abnormality or disease it suggests, its size or how many there are, and questions \
that need reasoning about the findings. Mix yes/no questions with open ones.
- Use the precise medical terms found in the caption and the mentions.
- Answer as someone who is looking at the image. Never say that information comes from a \
caption, a text, a context or a description, and never mention them.
- Answers are specific and complete; avoid vague or evasive replies. Only ask questions whose \
answers the figure and its text support.
- Answers may span several lines.

Format: start each question with "User:" and each answer with "Assistant:" at the beginning of \
a line, with nothing before the first question."""

PAIR_SYSTEM_PROMPT = """\
You are a biomedical imaging specialist preparing questions and answers that clinicians will \
compare. For each figure you receive its label, caption and the sentences of the article that \
refer to it. Treat that text as your own knowledge of the image: the person asking sees only the \
image.

Write 4 to 5 questions about the image, and for each question two different answers written \
independently, as two assistants might answer it.
- Vary the questions: the imaging modality or stain, the organ or tissue shown, where a finding \
lies, what abnormality or disease it suggests, its size or how many there are, and questions \
that need reasoning about the findings. Mix yes/no questions with open ones.
- Use the precise medical terms found in the caption and the mentions.
- Answer as someone who is looking at the image. Never say that information comes from a \
caption, a text, a context or a description, and never mention them.
- The two answers must differ in content or wording, not be copies.

Format: start each question with "Question:", its first answer with "Answer A:" and its second \
with "Answer B:" at the beginning of a line, with nothing before the first question.
{examples}"""

MENTIONS_HEADER = "Sentences of the article that refer to the figure:"


def prompt_version(answers: int = 1) -> str:
    """Hash of the instruction text, recorded with every candidate (which prompt made it)."""
    text = SYSTEM_PROMPT if answers == 1 else PAIR_SYSTEM_PROMPT
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def select_demonstrations(
    demos: list[Demonstration], n_demos: int, seed: int, figure_id: str
) -> list[Demonstration]:
    """Draw demonstrations one per modality (chest X-ray, MRI, CT, histology, gross).

    The draw is seeded by ``(seed, figure_id)`` so a figure always gets the same prompt (and the
    journal cache stays valid across reruns) while different figures see different examples.
    With ``n_demos < 5`` a seeded subset of modalities is used; beyond 5 the extra examples are
    drawn from the remaining demonstrations. A demonstration of the figure itself (same
    ``pair_id``) is never drawn: it would hand the model the answer.
    """
    demos = [d for d in demos if d.pair_id is None or str(d.pair_id) != figure_id]
    if n_demos <= 0 or not demos:
        return []
    rng = random.Random(f"{seed}:{figure_id}")
    modalities = list(MODALITIES)
    if n_demos < len(modalities):
        modalities = sorted(rng.sample(modalities, n_demos), key=MODALITIES.index)
    chosen: list[Demonstration] = []
    used: set[str] = set()
    for mod in modalities:
        pool = [d for d in demos if d.domain.get(mod) and d.id not in used]
        if not pool:
            continue
        pick = rng.choice(pool)
        chosen.append(pick)
        used.add(pick.id)
    rest = [d for d in demos if d.id not in used]
    extra = max(0, n_demos - len(chosen)) if n_demos > len(MODALITIES) else 0
    chosen += rng.sample(rest, min(extra, len(rest)))
    return chosen


def figure_text_parts(fig: SourceFigure | Demonstration) -> list[dict[str, str]]:
    """Label + caption, then the in-text mentions: the two text parts of a query."""
    label = (fig.fig_label or "Figure").strip()
    mentions = fig.mentions_text() or "(none)"
    return [
        {"type": "text", "text": f"{label}: {fig.fig_caption.strip()}"},
        {"type": "text", "text": f"{MENTIONS_HEADER} {mentions}"},
    ]


def render_conversation(demo: Demonstration) -> str:
    """A demonstration's turns in the ``User:`` / ``Assistant:`` format the model must write.

    Consecutive turns of one speaker are written under one tag: two released BioMed-VITAL
    demonstrations (ids 34 and 49) hold two answers in a row, and showing the model
    ``Assistant:`` twice teaches it a layout the parser rejects as ``not_alternating``.
    """
    blocks: list[tuple[str, list[str]]] = []
    for turn in demo.conversations:
        tag = "User" if turn.from_ == "human" else "Assistant"
        text = strip_image_token(turn.value)
        if blocks and blocks[-1][0] == tag:
            blocks[-1][1].append(text)
        else:
            blocks.append((tag, [text]))
    return "\n".join(f"{tag}: " + "\n".join(texts) for tag, texts in blocks)


def _demo_block(demo: Demonstration) -> str:
    parts = figure_text_parts(demo)
    return f"{parts[0]['text']}\n{parts[1]['text']}\n{render_conversation(demo)}"


def build_messages(
    fig: SourceFigure,
    demos: list[Demonstration],
    image_url: str | None = None,
    answers: int = 1,
) -> list[dict[str, Any]]:
    """The chat messages for one figure.

    ``answers=1``: system prompt, then each demonstration as a user turn (its caption and
    mentions) answered by an assistant turn (its conversation), then the figure. ``answers=2``:
    the demonstrations are shown inside the system prompt as examples of good questions (their
    single answers cannot model the two-answer format). The image is attached only when
    ``image_url`` is given (``vision: true``).
    """
    if answers not in (1, 2):
        raise ValueError(f"answers must be 1 or 2, got {answers}")
    query: list[dict[str, Any]] = list(figure_text_parts(fig))
    if image_url is not None:
        query.append({"type": "image_url", "image_url": {"url": image_url}})
    if answers == 2:
        examples = ""
        if demos:
            blocks = "\n\n".join(_demo_block(d) for d in demos)
            examples = (
                "\n\nExamples of questions and answers that clinicians found useful, each after "
                f"its figure's text:\n\n{blocks}"
            )
        return [
            {"role": "system", "content": PAIR_SYSTEM_PROMPT.format(examples=examples)},
            {"role": "user", "content": query},
        ]
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for d in demos:
        messages.append({"role": "user", "content": figure_text_parts(d)})
        messages.append({"role": "assistant", "content": render_conversation(d)})
    messages.append({"role": "user", "content": query})
    return messages


def printable_messages(messages: list[dict[str, Any]], max_url: int = 60) -> str:
    """The messages as readable text (data URLs shortened) for ``--dry_run``."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            body = content
        else:
            pieces = []
            for part in content:
                if part["type"] == "text":
                    pieces.append(part["text"])
                else:
                    url = part["image_url"]["url"]
                    short = url if len(url) <= max_url else url[:max_url] + f"… ({len(url)} chars)"
                    pieces.append(f"[image {short}]")
            body = "\n".join(pieces)
        out.append(f"--- {m['role']} ---\n{body}")
    return "\n".join(out)
