"""LLaVA-1.5 conversation rendering and tokenisation with loss only on the assistant's words.

The rendered text is LLaVA-1.5's ``vicuna_v1`` template (the one its instruction tuning and
LLaVA-Med's used)::

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

The whole string is tokenised once (so the tokens are exactly those the model sees at inference)
and a token is supervised when its character span overlaps an assistant region ``{a_i}</s>``:
the answer and its end-of-turn token are learned, the system prompt, roles and questions are not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from biomedvital.data.records import IMAGE_TOKEN, Turn

IGNORE_INDEX = -100
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class ConversationError(ValueError):
    """A conversation that cannot be trained on; ``category`` groups it in the run's report."""

    def __init__(self, message: str, category: str, field: str = "conversations") -> None:
        super().__init__(message)
        self.category = category
        self.field = field


@dataclass(frozen=True)
class Rendered:
    """The conversation as one string plus the character spans that carry the loss."""

    text: str
    supervised: list[tuple[int, int]]  # [start, end) of each "{answer}</s>"


@dataclass
class Encoded:
    """Token ids and labels of one sample (``labels`` is ``IGNORE_INDEX`` where unsupervised)."""

    input_ids: np.ndarray
    labels: np.ndarray
    truncated: bool = False


def check_turns(turns: list[Turn]) -> None:
    """Alternating human/gpt turns, answered, with exactly one ``<image>`` in a human turn."""
    if not turns:
        raise ConversationError("no turns", "empty_conversation")
    for i, t in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if t.from_ != expected:
            raise ConversationError(
                f"turns must alternate human/gpt: turn {i + 1} is from {t.from_!r}",
                "turns_not_alternating",
            )
    if len(turns) % 2:
        raise ConversationError(
            f"conversation ends with an unanswered question (turn {len(turns)})",
            "unanswered_question",
        )
    n_human = sum(t.value.count(IMAGE_TOKEN) for t in turns[::2])
    n_gpt = sum(t.value.count(IMAGE_TOKEN) for t in turns[1::2])
    if n_gpt:
        raise ConversationError("an assistant turn contains <image>", "image_token_in_answer")
    if n_human == 0:
        raise ConversationError("no <image> token in any human turn", "no_image_token")
    if n_human > 1:
        raise ConversationError(
            f"{n_human} <image> tokens; one image per sample is supported", "extra_image_token"
        )


def render(turns: list[Turn], system: str = VICUNA_V1_SYSTEM) -> Rendered:
    """The training string; ``<image>`` is moved to the start of its turn as LLaVA does."""
    check_turns(turns)
    parts: list[str] = [system + " " if system else ""]
    pos = len(parts[0])
    spans: list[tuple[int, int]] = []
    for q, a in zip(turns[::2], turns[1::2], strict=True):
        question = q.value
        if IMAGE_TOKEN in question:
            question = IMAGE_TOKEN + "\n" + question.replace(IMAGE_TOKEN, "").strip()
        prompt = f"USER: {question} ASSISTANT: "
        answer = a.value + "</s>"
        parts += [prompt, answer]
        pos += len(prompt)
        spans.append((pos, pos + len(answer)))
        pos += len(answer)
    return Rendered("".join(parts), spans)


def prompt(question: str, system: str = VICUNA_V1_SYSTEM) -> str:
    """The inference prompt for one question about one image (ends with ``ASSISTANT:``)."""
    q = question.replace(IMAGE_TOKEN, "").strip()
    head = system + " " if system else ""
    return f"{head}USER: {IMAGE_TOKEN}\n{q} ASSISTANT:"


def chat_template(system: str = VICUNA_V1_SYSTEM) -> str:
    """A Jinja chat template that renders what :func:`render` and :func:`prompt` write.

    Saved with an exported processor, so that ``apply_chat_template`` (and servers that use
    it, e.g. vLLM) give a tuned model the prompt it was trained on: ``system`` (the training
    system prompt) unless a ``system`` message replaces it, ``<image>\\n`` at the start of its
    turn, ``</s>`` after every answer (inside ``{% generation %}``, so the assistant-token mask
    is the training loss mask). No ``bos_token``: the tokenizer adds it, as in training
    (written into the text, a Llama tokenizer would encode the first word without its space).
    Message content may be a string (with ``<image>`` in it) or a list of ``image`` / ``text``
    parts.
    """
    default = json.dumps(system)  # a valid Jinja string literal
    return (
        "{%- set sys = namespace(text=" + default + ") -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set c = messages[0]['content'] -%}"
        "{%- if c is string -%}{%- set sys.text = c -%}{%- else -%}"
        "{%- set sys.text = c | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join(' ') -%}{%- endif -%}"
        "{%- endif -%}"
        "{%- if sys.text -%}{{ sys.text + ' ' }}{%- endif -%}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- set c = m['content'] -%}"
        "{%- if c is string -%}"
        "{%- set n_img = c.count('<image>') -%}{%- set text = c.replace('<image>', '') -%}"
        "{%- else -%}"
        "{%- set n_img = c | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- set text = c | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join(' ') -%}"
        "{%- endif -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- if n_img -%}{%- set text = '<image>\\n' * n_img + (text | trim) -%}{%- endif -%}"
        "{{ 'USER: ' + text + ' ' }}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{ 'ASSISTANT: ' }}{% generation %}{{ text + eos_token }}{% endgeneration %}"
        "{%- else -%}"
        "{{ raise_exception('roles are system (first), user and assistant') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def encode(
    rendered: Rendered,
    tokenizer: Any,
    image_tokens: int,
    max_length: int | None = None,
) -> Encoded:
    """Token ids and labels, ``<image>`` expanded to ``image_tokens`` placeholders.

    Over ``max_length`` the tail is cut (``truncated``); a cut that reaches into the image
    placeholders or leaves nothing supervised raises (the sample teaches nothing).
    """
    text = rendered.text
    at = text.index(IMAGE_TOKEN)
    shift = len(IMAGE_TOKEN) * (image_tokens - 1)
    expanded = text[:at] + IMAGE_TOKEN * image_tokens + text[at + len(IMAGE_TOKEN) :]
    # answers after the image move by its expansion; those before it (an image asked about in
    # a later turn) stay where they are
    spans = [(s + shift, e + shift) if s > at else (s, e) for s, e in rendered.supervised]
    enc = tokenizer(expanded, add_special_tokens=True, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = enc["offset_mapping"]
    supervised = np.zeros(len(ids), dtype=bool)
    for i, (s, e) in enumerate(offsets):
        if e > s:  # special tokens added by the template (BOS) have empty spans
            supervised[i] = any(s < se and e > ss for ss, se in spans)
    labels = np.where(supervised, ids, IGNORE_INDEX)
    truncated = False
    if max_length is not None and len(ids) > max_length:
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        last_image = int(np.nonzero(ids == image_id)[0][-1])
        if last_image >= max_length:
            raise ConversationError(
                f"{len(ids)} tokens; max_length {max_length} would cut into the image",
                "too_long",
            )
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
        if not (labels != IGNORE_INDEX).any():
            raise ConversationError(
                f"{len(enc['input_ids'])} tokens; nothing supervised remains within "
                f"max_length {max_length}",
                "too_long",
            )
    return Encoded(ids, labels, truncated)
