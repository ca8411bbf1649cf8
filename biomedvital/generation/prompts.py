"""Prompts for generating instruction conversations (and answer pairs) about biomedical figures.

The wording is this project's own, in two styles (``prompt_style``):

* ``suite`` (the default): a multi-turn conversation of 4-5 exchanges, varied questions
  (modality, organ, location, abnormality, size and count, reasoning; yes/no and open), the
  terminology of the caption and in-text mentions, and answers phrased as if the assistant looked
  at the image itself, never naming the caption or context.
* ``vital``: the requirements of BioMed-VITAL's released clinician-demonstration script, point by
  point (:data:`VITAL_REQUIREMENTS`): at least 4-5 exchanges and more for rich figures, the text
  worked in and linked to the image, responsible answers. Its paired-answers variant follows the
  released two-answer script (:data:`VITAL_PAIR_REQUIREMENTS`).

Each style's requirements are ``(id, phrase)`` pairs, so a test can hold every prompt to what it
must ask for. Demonstrations are clinician-picked conversations, one drawn per modality for each
figure, sent as text (no demonstration images).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Literal, get_args

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

PromptStyle = Literal["suite", "vital"]
"""``suite``: this project's prompts; ``vital``: the released BioMed-VITAL scripts' requirements."""

Requirement = tuple[str, str]
"""``(id, phrase)``: one thing a prompt asks for, and the words it asks for it in."""

SUITE_REQUIREMENTS: tuple[Requirement, ...] = (
    ("conversation", "Write a conversation between a User, who asks about the image, and an"),
    ("user_first", "The User speaks first."),
    ("exchanges", "Write 4 to 5 question-answer exchanges."),
    ("diverse_questions", "Mix yes/no questions with open ones."),
    ("terminology", "Use the precise medical terms found in the caption and the mentions."),
    ("no_source", "Never say that information comes from a caption, a text, a context"),
    ("specific", "avoid vague or evasive replies"),
    ("supported", "Only ask questions whose answers the figure and its text support."),
    ("multi_line", "Answers may span several lines."),
)
"""What :data:`SYSTEM_PROMPT` asks for: phrases of that text, which is kept as written (its hash
is every suite candidate's ``prompt_version`` and part of every cached request)."""

SUITE_PAIR_REQUIREMENTS: tuple[Requirement, ...] = (
    ("questions", "Write 4 to 5 questions about the image"),
    ("two_answers", "for each question two different answers written independently"),
    ("diverse_questions", "Mix yes/no questions with open ones."),
    ("terminology", "Use the precise medical terms found in the caption and the mentions."),
    ("no_source", "Never say that information comes from a caption, a text, a context"),
    ("distinct", "The two answers must differ in content or wording, not be copies."),
)
"""What :data:`PAIR_SYSTEM_PROMPT` asks for (phrases of that text, kept as written)."""

VITAL_REQUIREMENTS: tuple[Requirement, ...] = (
    (
        "conversation",
        "Write a conversation in which a User asks about the figure and an Assistant answers, "
        "as if the two of them were looking at the image together.",
    ),
    ("user_first", "The User speaks first: open with a question, never with an answer."),
    (
        "exchanges",
        "Write no fewer than 4 to 5 question-answer exchanges; when the figure and its text "
        "hold much information, add more.",
    ),
    (
        "diverse_questions",
        "Vary the questions across the image's aspects: the imaging modality, the organ, where "
        "a finding lies, which disease it may point to, sizes, how many elements there are, and "
        "questions that take reasoning. Mix yes/no questions with open ones.",
    ),
    (
        "visual_first",
        "Begin from what the image itself shows, what a viewer could tell without the text, and "
        "bring out as many of its key details as you can.",
    ),
    (
        "text_linked",
        "Bring the caption and the article's sentences into the questions and answers, and make "
        "explicit how what they say relates to what is visible in the image.",
    ),
    (
        "terminology",
        "When the text bears on a question, answer in its specialist vocabulary and with its "
        "expertise, not in vague lay terms.",
    ),
    (
        "responsible",
        "Give careful, responsible answers that neither overstate certainty nor stay vague.",
    ),
    (
        "training_value",
        "The conversation becomes training data for another medical vision-language model: "
        "make every exchange worth learning from.",
    ),
)
"""The released clinician-demonstration script's requirements (``instructions_generation.py``),
in this project's words. It does not forbid naming the caption: ``flagged_answers`` decides what
happens to such answers."""

VITAL_PAIR_REQUIREMENTS: tuple[Requirement, ...] = (
    (
        "two_answers",
        "For each question write two answers independently, each offering its own explanation "
        "or view of what the image shows, so that clinicians can tell which is the better one.",
    ),
    (
        "image_focus",
        "Keep the focus on the image: use the text to understand it, but do not repeat the "
        "text's specific facts, terms, abbreviations, dates, numbers or names.",
    ),
    (
        "diverse_questions",
        "Ask varied questions that explore different visual aspects of the image.",
    ),
    (
        "questions",
        "Write no fewer than 3 to 4 questions, each followed by its two different answers.",
    ),
    (
        "responsible",
        "Answer with care and without overconfidence; give no medical advice or diagnosis, and "
        "suggest consulting a medical professional instead.",
    ),
    ("user_first", "Start with a question, never with an answer."),
    (
        "visual_detail",
        "Draw out as much of the key visual information in the image as you can, with the text as "
        "a complement, relating what it says to what is visible.",
    ),
)
"""The released two-answer script's requirements (``generate_vision_instructions_2_answers.py``),
in this project's words. Its single demonstration was LLaVA-Med's, shown with its image; here the
drawn clinician demonstrations are shown as examples of questions, as for ``suite``."""


def render_requirements(requirements: tuple[Requirement, ...]) -> str:
    """The requirements as the prompt's bullet list, one phrase a line, in order."""
    return "\n".join(f"- {phrase}" for _, phrase in requirements)


VITAL_SYSTEM_PROMPT = (
    "You are an expert in biomedical imaging writing training data for a medical "
    "vision-language assistant. For each figure of a biomedical article you receive the image, "
    "its label and caption, and the sentences of the article that refer to it.\n\n"
    + render_requirements(VITAL_REQUIREMENTS)
    + '\n\nFormat: start each question with "User:" and each answer with "Assistant:" at the '
    "beginning of a line, with nothing before the first question."
)

VITAL_PAIR_SYSTEM_PROMPT = (
    "You are an expert in biomedical imaging preparing questions and answers that clinicians "
    "will compare. For each figure of a biomedical article you receive the image, its label and "
    "caption, and the sentences of the article that refer to it.\n\n"
    + render_requirements(VITAL_PAIR_REQUIREMENTS)
    + '\n\nFormat: start each question with "Question:", its first answer with "Answer A:" and '
    'its second with "Answer B:" at the beginning of a line, with nothing before the first '
    "question.\n{examples}"
)

_PROMPTS: dict[tuple[str, int], tuple[str, tuple[Requirement, ...]]] = {
    ("suite", 1): (SYSTEM_PROMPT, SUITE_REQUIREMENTS),
    ("suite", 2): (PAIR_SYSTEM_PROMPT, SUITE_PAIR_REQUIREMENTS),
    ("vital", 1): (VITAL_SYSTEM_PROMPT, VITAL_REQUIREMENTS),
    ("vital", 2): (VITAL_PAIR_SYSTEM_PROMPT, VITAL_PAIR_REQUIREMENTS),
}


def check_prompt_style(style: str) -> None:
    """Refuse an unknown ``prompt_style`` before anything is read or sent."""
    if style not in get_args(PromptStyle):
        raise ValueError(
            f"prompt_style must be one of {', '.join(get_args(PromptStyle))}, got {style!r}"
        )


def prompt_template(answers: int = 1, style: PromptStyle = "suite") -> str:
    """The system prompt of a style (``answers=2``: with its ``{examples}`` slot unfilled)."""
    check_prompt_style(style)
    if answers not in (1, 2):
        raise ValueError(f"answers must be 1 or 2, got {answers}")
    return _PROMPTS[style, answers][0]


def prompt_requirements(answers: int = 1, style: PromptStyle = "suite") -> tuple[Requirement, ...]:
    """The ``(id, phrase)`` requirements that :func:`prompt_template` carries."""
    prompt_template(answers, style)
    return _PROMPTS[style, answers][1]


def prompt_version(answers: int = 1, style: PromptStyle = "suite") -> str:
    """Hash of the instruction text, recorded with every candidate (which prompt made it)."""
    text = prompt_template(answers, style)
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
    style: PromptStyle = "suite",
) -> list[dict[str, Any]]:
    """The chat messages for one figure, with the system prompt of ``style``.

    ``answers=1``: system prompt, then each demonstration as a user turn (its caption and
    mentions) answered by an assistant turn (its conversation), then the figure. ``answers=2``:
    the demonstrations are shown inside the system prompt as examples of good questions (their
    single answers cannot model the two-answer format). The image is attached only when
    ``image_url`` is given (``vision: true``).
    """
    system = prompt_template(answers, style)
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
            {"role": "system", "content": system.format(examples=examples)},
            {"role": "user", "content": query},
        ]
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
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
