"""Request keys and costs: what identifies a chat request, and what it costs.

A request's key is the SHA-256 of (model, messages, parameters): the journal's cache key, so a
rerun pays only for what is missing. Costs come from the API's ``usage`` fields and a price table
per million tokens.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from biomedvital.llm.images import key_messages

BATCH_PRICE_FACTOR = 0.5
"""Batch API results cost this fraction of the online price unless ``price_per_million`` has
its own ``batch`` factor."""

TOKENS_PER_IMAGE = 765
"""Input tokens counted for one image in estimates (a high-detail 512 px tile and its base)."""

CHARS_PER_TOKEN = 4
"""Characters of English text counted as one token in estimates (OpenAI's rule of thumb)."""


def canonical_json(obj: Any) -> str:
    """Stable JSON (sorted keys, no spaces) so equal requests hash equally across runs."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_key(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """SHA-256 of (model, messages, parameters): the cache/journal key of one request.

    Image references count by their bytes' hash, not their path (:func:`key_messages`), so a
    moved or copied image folder keeps every key and a rerun pays for nothing again.
    """
    payload = canonical_json({"model": model, "messages": key_messages(messages), "params": params})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def cost_of(
    usage: dict[str, Any] | None, prices: dict[str, float] | None, batch: bool = False
) -> float:
    """Dollars for one response from its ``usage`` and a per-1M-token ``{input, output}`` table;
    Batch API results (``batch``) are multiplied by the table's ``batch`` factor (default 0.5)."""
    if not usage or not prices:
        return 0.0
    inp = float(usage.get("prompt_tokens") or 0)
    out = float(usage.get("completion_tokens") or 0)
    dollars = (inp * prices.get("input", 0.0) + out * prices.get("output", 0.0)) / 1_000_000
    return dollars * prices.get("batch", BATCH_PRICE_FACTOR) if batch else dollars


def estimate_tokens(messages: list[dict[str, Any]], max_tokens: int) -> tuple[int, int]:
    """Rough (input, output) tokens of a request: :data:`CHARS_PER_TOKEN` characters a token,
    :data:`TOKENS_PER_IMAGE` per image.

    Used to pace tokens per minute and for dry-run cost estimates (an upper bound for output).
    """
    chars, images = 0, 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    chars += len(part.get("text", ""))
                elif part.get("type") == "image_url":
                    images += 1
    return chars // CHARS_PER_TOKEN + TOKENS_PER_IMAGE * images + 8 * len(messages), int(max_tokens)
