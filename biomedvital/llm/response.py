"""The parts of a chat-completions reply that are kept, and which replies are not answers."""

from __future__ import annotations

import json
from typing import Any

from biomedvital.llm.errors import Retryable


def is_empty_reply(resp: dict[str, Any]) -> bool:
    """A reply with neither text nor a refusal: retried, never kept as an answer."""
    content, refusal = resp.get("content"), resp.get("refusal")
    return not (isinstance(content, str) and content.strip()) and not refusal


def parse_completion(body: Any) -> dict[str, Any]:
    """The parts of a chat-completions body we keep; garbled or empty bodies are retryable."""
    if not isinstance(body, dict):
        raise Retryable("malformed_response: body is not an object")
    choices = body.get("choices")
    if not choices or not isinstance(choices, list):
        raise Retryable("empty_choices: the response has no choices")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise Retryable("malformed_response: choices[0] is not an object")
    message = choice.get("message") or {}
    if not isinstance(message, dict):
        raise Retryable("malformed_response: message is not an object")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise Retryable("malformed_response: message content is not a string")
    refusal = message.get("refusal")
    resp = {
        "content": content,
        "refusal": refusal if isinstance(refusal, str) else None,
        "finish_reason": choice.get("finish_reason"),
        "usage": body.get("usage") if isinstance(body.get("usage"), dict) else None,
    }
    if is_empty_reply(resp):  # journaled, it would stand as the answer for good
        raise Retryable(
            f"empty_content: the reply has no text and no refusal "
            f"(finish_reason {resp['finish_reason']!r})"
        )
    return resp


def parse_body(text: str) -> dict[str, Any]:
    """:func:`parse_completion` of a raw response body (text that is not JSON is retryable)."""
    try:
        body = json.loads(text)
    except ValueError:
        raise Retryable("malformed_response: body is not JSON") from None
    return parse_completion(body)
