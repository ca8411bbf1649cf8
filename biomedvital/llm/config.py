"""The client's settings: the ``client`` block that ``generate``, ``rate``, ``judge`` and
``pairwise`` share, validated before anything is sent, and the API key read from the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from datetime import date
from typing import Any, Literal

from biomedvital.llm.keys import BATCH_PRICE_FACTOR
from biomedvital.llm.redact import safe_url


class ClientConfigError(ValueError):
    """A client setting out of range, named by its ``client.`` key (reported as one line by
    ``python -m biomedvital``, like a config error: nothing has been sent)."""


def check_prices(prices: dict[str, float] | None) -> dict[str, float] | None:
    """Refuse price tables with unknown keys or negative prices (a typo would hide the cost)."""
    if prices is None:
        return None
    unknown = set(prices) - {"input", "output", "batch"}
    if unknown:
        raise ClientConfigError(
            f"client.price_per_million keys are 'input', 'output' and 'batch', got {sorted(unknown)}"
        )
    for k, v in prices.items():
        if float(v) < 0:
            raise ClientConfigError(f"client.price_per_million[{k!r}] must be >= 0, got {v}")
    if float(prices.get("batch", BATCH_PRICE_FACTOR)) > 1:
        raise ClientConfigError(
            "client.price_per_million['batch'] is a factor of the online price, <= 1"
        )
    return {k: float(v) for k, v in prices.items()}


def check_price_date(day: Any) -> str | None:
    """The day prices were read, as ``YYYY-MM-DD`` (YAML reads an unquoted date as a date)."""
    if day is None:
        return None
    text = day.isoformat() if isinstance(day, date) else str(day)
    try:
        date.fromisoformat(text)
    except ValueError:
        raise ClientConfigError(
            f"client.prices_as_of must be a day as YYYY-MM-DD, got {day!r}"
        ) from None
    return text


@dataclass
class ClientConfig:
    """Connection and politeness settings: the ``client`` block of ``generate``, ``rate``,
    ``judge`` and ``pairwise`` (YAML ``client: {base_url: ..., model: ...}``, flags
    ``--client.base_url ...``), so one endpoint file overlays all four.

    Args:
        base_url: the OpenAI-compatible endpoint (``https://api.openai.com/v1``, a vLLM server…);
            ``local:smollm2`` starts a local llama.cpp server for the run.
        model: model name sent with every request (part of the cache key).
        api_key_env: name of the environment variable holding the key (the key is never stored).
        concurrency: requests in flight at once.
        requests_per_minute: request pacing (a token bucket); ``null`` means unpaced.
        tokens_per_minute: token pacing (estimated input + ``max_tokens`` per request);
            ``null`` means unpaced.
        max_attempts: tries per item before it is recorded as failed (batch mode: batch rounds).
        timeout_s: per-request timeout (a hard deadline per attempt).
        backoff_base_s: retry backoff: ``backoff_base_s * 2**(attempt-1)`` seconds, with full
            jitter.
        backoff_max_s: cap of the exponential backoff (seconds).
        retry_after_max_s: a server's ``Retry-After`` wins over the backoff when it asks for
            longer, up to this many seconds.
        price_per_million: ``{"input": $, "output": $}`` per 1M tokens for the cost ledger, and
            optionally ``batch``: the Batch API's price factor (default 0.5).
        prices_as_of: the day (``YYYY-MM-DD``) those prices were read from the provider's list,
            recorded with them and printed beside every estimate made from them (prices change).
        mode: ``online`` (one call per request) or ``batch`` (Batch API jobs at about half the
            price; see :mod:`biomedvital.llm.batch`).
        batch_runner: ``openai`` (the endpoint's ``/v1/files`` + ``/v1/batches``) or ``file``
            (write the request file for ``vllm.entrypoints.openai.run_batch`` and stop).
        batch_poll_s: seconds between status polls of a submitted batch.
        batch_wait_s: stop waiting after this many seconds (``null``: until the batch ends); a
            rerun collects the journaled batch.
        completion_window: the Batch API's window.
        batch_max_requests: split request files above this many requests (API limit).
        batch_max_bytes: split request files above this many bytes (API limit).
        local_threads: CPU threads of a ``local:`` llama.cpp server (``null``: every CPU this
            process may use; fewer leave room for other jobs on a shared machine). Not part of
            any cache key: the replies do not depend on it.
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_attempts: int = 5
    timeout_s: float = 120.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 600.0
    price_per_million: dict[str, float] | None = None
    prices_as_of: str | None = None
    mode: Literal["online", "batch"] = "online"
    batch_runner: Literal["openai", "file"] = "openai"
    batch_poll_s: float = 60.0
    batch_wait_s: float | None = None
    completion_window: str = "24h"
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 190_000_000
    local_threads: int | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ClientConfigError(f"client.concurrency must be >= 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise ClientConfigError(f"client.max_attempts must be >= 1, got {self.max_attempts}")
        if self.timeout_s <= 0:
            raise ClientConfigError(f"client.timeout_s must be > 0, got {self.timeout_s}")
        if self.mode not in ("online", "batch"):
            raise ClientConfigError(f"client.mode must be 'online' or 'batch', got {self.mode!r}")
        if self.batch_runner not in ("openai", "file"):
            raise ClientConfigError(
                f"client.batch_runner must be 'openai' or 'file', got {self.batch_runner!r}"
            )
        if self.local_threads is not None and self.local_threads < 1:
            raise ClientConfigError(
                f"client.local_threads must be >= 1 (or null: every CPU), got {self.local_threads}"
            )
        if self.batch_poll_s <= 0:
            raise ClientConfigError(f"client.batch_poll_s must be > 0, got {self.batch_poll_s}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ClientConfigError(
                    f"client.{name} must be > 0 (or null: unpaced), got {value}"
                )
        self.price_per_million = check_prices(self.price_per_million)
        self.prices_as_of = check_price_date(self.prices_as_of)

    def require_online(self, verb: str) -> None:
        """Refuse batch mode for a verb that only runs online (its requests go out at once)."""
        if self.mode != "online":
            raise ClientConfigError(
                f"{verb} runs online only: set client.mode to 'online' "
                "(batch mode is for generate and rate)"
            )

    def public(self) -> dict[str, Any]:
        """The settings as recorded in manifests and MLflow: the variable's name, never the key."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["base_url"] = safe_url(self.base_url)
        return out


def read_api_key(env_name: str) -> str:
    """The key from the named variable; a clear error (naming the variable only) when unset."""
    key = os.environ.get(env_name)
    if not key:
        raise RuntimeError(
            f"environment variable {env_name} is not set: export the API key there "
            "(for a local server without keys, any non-empty value)"
        )
    return key
