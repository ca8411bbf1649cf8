"""An async client for OpenAI-compatible chat APIs that survives long, flaky, costly runs.

Generating or rating tens of thousands of items takes hours and money, so this client:

* bounds concurrency and paces requests and tokens per minute (token buckets), so a run stays
  under the provider's limits instead of living on 429s;
* retries what is transient (429, 5xx, timeouts, dropped connections, garbled bodies) with
  exponential backoff and jitter, honouring ``Retry-After``, and never retries what will not
  change (400, 401, 403...); after ``max_attempts`` the item is recorded as failed with its reason;
* journals every finished request (JSONL, flushed and fsynced) keyed by the SHA-256 of
  (model, messages, parameters), so a rerun after a crash only pays for what is missing; a torn
  last line (process killed mid-write) is dropped and its request made again;
* keeps a cost ledger from the API's ``usage`` fields and a price table.

The API key is read from an environment variable whose *name* is configured; the key itself is
never stored, logged or returned.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

NO_RETRY_STATUS = frozenset({400, 401, 403, 404, 405, 409, 413, 422})
"""Statuses that will fail the same way again: the item fails at once."""


# ----------------------------------------------------------------------------- keys and costs


def canonical_json(obj: Any) -> str:
    """Stable JSON (sorted keys, no spaces) so equal requests hash equally across runs."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_key(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """SHA-256 of (model, messages, parameters): the cache/journal key of one request."""
    payload = canonical_json({"model": model, "messages": messages, "params": params})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def cost_of(usage: dict[str, Any] | None, prices: dict[str, float] | None) -> float:
    """Dollars for one response from its ``usage`` and a per-1M-token ``{input, output}`` table."""
    if not usage or not prices:
        return 0.0
    inp = float(usage.get("prompt_tokens") or 0)
    out = float(usage.get("completion_tokens") or 0)
    return (inp * prices.get("input", 0.0) + out * prices.get("output", 0.0)) / 1_000_000


def check_prices(prices: dict[str, float] | None) -> dict[str, float] | None:
    """Refuse price tables with unknown keys or negative prices (a typo would hide the cost)."""
    if prices is None:
        return None
    unknown = set(prices) - {"input", "output"}
    if unknown:
        raise ValueError(f"price_per_million keys are 'input' and 'output', got {sorted(unknown)}")
    for k, v in prices.items():
        if float(v) < 0:
            raise ValueError(f"price_per_million[{k!r}] must be >= 0, got {v}")
    return {k: float(v) for k, v in prices.items()}


def estimate_tokens(messages: list[dict[str, Any]], max_tokens: int) -> tuple[int, int]:
    """Rough (input, output) tokens of a request: 4 characters a token, 765 per image.

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
    return chars // 4 + 765 * images + 8 * len(messages), int(max_tokens)


# ----------------------------------------------------------------------------- pacing


class TokenBucket:
    """Allows ``rate_per_minute`` units a minute on average, in bursts up to ``capacity``.

    ``rate_per_minute=None`` disables pacing. A request larger than the capacity waits for a full
    bucket and then goes (otherwise it could never go).
    """

    def __init__(self, rate_per_minute: float | None, capacity: float | None = None) -> None:
        if rate_per_minute is not None and rate_per_minute <= 0:
            raise ValueError(f"rate per minute must be > 0, got {rate_per_minute}")
        self.rate = None if rate_per_minute is None else rate_per_minute / 60.0
        self.capacity = capacity if capacity is not None else (rate_per_minute or 0.0)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, amount: float = 1.0) -> None:
        """Wait until ``amount`` units are available, then take them."""
        if self.rate is None:
            return
        amount = min(amount, self.capacity)
        async with self._lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)


# ----------------------------------------------------------------------------- journal


class Journal:
    """Append-only JSONL of finished requests: the cache that makes reruns free and resumable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.torn_lines = 0
        self._load()
        self._fh = None

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        keep = len(data)
        if data and not data.endswith(b"\n"):
            # A write was cut short: drop the partial line so the next append starts clean.
            keep = data.rfind(b"\n") + 1
            self.torn_lines += 1
        for raw in data[:keep].splitlines():
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
                key = entry["key"]
            except (ValueError, KeyError, TypeError):
                self.torn_lines += 1
                continue
            self.entries[key] = entry
        if keep != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            log.warning(
                "journal %s: dropped a torn last line; its request is made again", self.path
            )

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def append(self, entry: dict[str, Any]) -> None:
        """Write one finished request durably (flush + fsync) before it counts as done."""
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open for the run
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.entries[entry["key"]] = entry

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ----------------------------------------------------------------------------- config


@dataclass
class ClientConfig:
    """Connection and politeness settings shared by ``generate`` and ``rate``.

    Args:
        base_url: the OpenAI-compatible endpoint (``https://api.openai.com/v1``, a vLLM server…).
        model: model name sent with every request.
        api_key_env: name of the environment variable holding the key (the key is never stored).
        concurrency: requests in flight at once.
        requests_per_minute / tokens_per_minute: pacing; ``None`` means unpaced.
        max_attempts: tries per item before it is recorded as failed.
        timeout_s: per-request timeout.
        backoff_base_s / backoff_max_s: exponential backoff ``base * 2**(attempt-1)`` (with full
            jitter), capped; a server's ``Retry-After`` wins when it asks for longer.
        price_per_million: ``{"input": $, "output": $}`` per 1M tokens for the cost ledger.
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
    price_per_million: dict[str, float] | None = None

    @classmethod
    def from_knobs(cls, knobs: Mapping[str, Any]) -> ClientConfig:
        """The config from a verb's keyword arguments (its ``locals()``): the verbs keep flat,
        documented knobs on the command line, and this is the one place that maps them."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in knobs.items() if k in names}
        values["price_per_million"] = check_prices(values.get("price_per_million"))
        return cls(**values)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        self.price_per_million = check_prices(self.price_per_million)

    def public(self) -> dict[str, Any]:
        """The settings as recorded in manifests and MLflow: the variable's name, never the key."""
        return {
            "base_url": self.base_url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "concurrency": self.concurrency,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "max_attempts": self.max_attempts,
            "timeout_s": self.timeout_s,
            "backoff_base_s": self.backoff_base_s,
            "backoff_max_s": self.backoff_max_s,
            "price_per_million": self.price_per_million,
        }


def read_api_key(env_name: str) -> str:
    """The key from the named variable; a clear error (naming the variable only) when unset."""
    key = os.environ.get(env_name)
    if not key:
        raise RuntimeError(
            f"environment variable {env_name} is not set: export the API key there "
            "(for a local server without keys, any non-empty value)"
        )
    return key


@dataclass
class ChatRequest:
    """One chat-completions call: ``params`` (temperature, max_tokens, seed…) are part of the key."""

    messages: list[dict[str, Any]]
    params: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""


@dataclass
class Outcome:
    """What became of one request: a response (fresh or from the journal) or a failure reason."""

    key: str
    ok: bool
    content: str | None = None
    refusal: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    attempts: int = 0
    cached: bool = False
    error: str | None = None
    cost: float = 0.0


@dataclass
class Ledger:
    """Counts and money for one batch (fresh requests and journal hits kept apart)."""

    requests_sent: int = 0
    done: int = 0
    cached: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached_cost_usd: float = 0.0
    failed_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests_sent": self.requests_sent,
            "done": self.done,
            "cached": self.cached,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "cached_cost_usd": round(self.cached_cost_usd, 6),
            "failed_by_reason": dict(sorted(self.failed_by_reason.items())),
        }


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Fatal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _parse_body(text: str) -> dict[str, Any]:
    """The parts of a chat-completions body we keep; garbled or empty bodies are retryable."""
    try:
        body = json.loads(text)
    except ValueError:
        raise _Retryable("malformed_response: body is not JSON") from None
    if not isinstance(body, dict):
        raise _Retryable("malformed_response: body is not an object")
    choices = body.get("choices")
    if not choices:
        raise _Retryable("empty_choices: the response has no choices")
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise _Retryable("malformed_response: message content is not a string")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
    return {
        "content": content,
        "refusal": message.get("refusal"),
        "finish_reason": choice.get("finish_reason"),
        "usage": usage,
    }


class ChatClient:
    """Runs batches of :class:`ChatRequest` through the API with pacing, retries and a journal."""

    def __init__(self, config: ClientConfig, journal: Journal) -> None:
        self.config = config
        self.journal = journal

    def key_of(self, req: ChatRequest) -> str:
        if not req.key:
            req.key = request_key(self.config.model, req.messages, req.params)
        return req.key

    def run(
        self, requests: Iterable[ChatRequest], desc: str = "requests", progress: bool = True
    ) -> tuple[dict[str, Outcome], Ledger]:
        """Run all requests (journal hits are not sent); returns outcomes by key and the ledger."""
        return asyncio.run(self.arun(list(requests), desc, progress))

    async def arun(
        self, requests: list[ChatRequest], desc: str = "requests", progress: bool = True
    ) -> tuple[dict[str, Outcome], Ledger]:
        ledger = Ledger()
        outcomes: dict[str, Outcome] = {}
        todo: list[ChatRequest] = []
        for req in requests:
            key = self.key_of(req)
            if key in outcomes:
                continue
            entry = self.journal.get(key)
            if entry is not None:
                resp = entry["response"]
                cost = cost_of(resp.get("usage"), self.config.price_per_million)
                outcomes[key] = Outcome(
                    key=key, ok=True, cached=True, attempts=0, cost=cost, **resp
                )
                ledger.cached += 1
                ledger.cached_cost_usd += cost
            else:
                outcomes[key] = Outcome(key=key, ok=False, error="not run")
                todo.append(req)
        if not todo:
            return outcomes, ledger

        from openai import AsyncOpenAI

        client = AsyncOpenAI(
            base_url=self.config.base_url,
            api_key=read_api_key(self.config.api_key_env),
            max_retries=0,
            timeout=self.config.timeout_s,
        )
        sem = asyncio.Semaphore(self.config.concurrency)
        rpm = TokenBucket(self.config.requests_per_minute)
        tpm = TokenBucket(self.config.tokens_per_minute)
        bar = tqdm(total=len(todo), desc=desc, unit="req", disable=not progress)

        async def one(req: ChatRequest) -> None:
            async with sem:
                out = await self._attempts(client, req, rpm, tpm, ledger)
            outcomes[req.key] = out
            if out.ok:
                ledger.done += 1
                ledger.cost_usd += out.cost
                usage = out.usage or {}
                ledger.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                ledger.completion_tokens += int(usage.get("completion_tokens") or 0)
            else:
                ledger.failed += 1
                kind = (out.error or "unknown").split(":")[0]
                ledger.failed_by_reason[kind] = ledger.failed_by_reason.get(kind, 0) + 1
            bar.update(1)
            bar.set_postfix(done=ledger.done, failed=ledger.failed, cost=f"${ledger.cost_usd:.4f}")

        try:
            await asyncio.gather(*(one(r) for r in todo))
        finally:
            bar.close()
            await client.close()
        return outcomes, ledger

    async def _attempts(
        self, client: Any, req: ChatRequest, rpm: TokenBucket, tpm: TokenBucket, ledger: Ledger
    ) -> Outcome:
        cfg = self.config
        n_in, n_out = estimate_tokens(req.messages, int(req.params.get("max_tokens", 0) or 0))
        reason = "unknown"
        for attempt in range(1, cfg.max_attempts + 1):
            await rpm.acquire(1)
            await tpm.acquire(n_in + n_out)
            ledger.requests_sent += 1
            try:
                resp = await self._send(client, req)
            except _Fatal as err:
                return Outcome(key=req.key, ok=False, attempts=attempt, error=err.reason)
            except _Retryable as err:
                reason = err.reason
                if attempt == cfg.max_attempts:
                    break
                backoff = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1))
                wait = random.uniform(0, backoff)
                if err.retry_after is not None:
                    wait = max(wait, err.retry_after)
                log.info(
                    "attempt %d of %s: %s; retrying in %.2fs", attempt, req.key[:12], reason, wait
                )
                await asyncio.sleep(wait)
                continue
            cost = cost_of(resp["usage"], cfg.price_per_million)
            self.journal.append(
                {"key": req.key, "model": cfg.model, "meta": req.meta, "response": resp}
            )
            return Outcome(key=req.key, ok=True, attempts=attempt, cost=cost, **resp)
        return Outcome(
            key=req.key,
            ok=False,
            attempts=cfg.max_attempts,
            error=f"{reason} (gave up after {cfg.max_attempts} attempts)",
        )

    async def _send(self, client: Any, req: ChatRequest) -> dict[str, Any]:
        import openai

        try:
            from biomedvital.generation.prompts import inline_images

            raw = await client.chat.completions.with_raw_response.create(
                model=self.config.model, messages=inline_images(req.messages), **req.params
            )
        except openai.APITimeoutError:
            raise _Retryable(f"timeout: no response within {self.config.timeout_s}s") from None
        except openai.APIConnectionError as err:
            raise _Retryable(f"connection_error: {_short(err)}") from None
        except openai.APIStatusError as err:
            status = err.status_code
            detail = _short(getattr(err, "message", "") or str(err))
            if status == 429 or status >= 500 or status == 408:
                raise _Retryable(
                    f"http_{status}: {detail}", parse_retry_after(err.response.headers)
                ) from None
            raise _Fatal(f"http_{status}: {detail}") from None
        return _parse_body(raw.text)


def run_requests(
    config: ClientConfig,
    journal_path: str | Path,
    requests: list[ChatRequest],
    desc: str = "requests",
    progress: bool = True,
) -> tuple[dict[str, Outcome], Ledger, int]:
    """Convenience: open the journal, run the batch, close; returns outcomes, ledger, torn lines."""
    journal = Journal(journal_path)
    try:
        outcomes, ledger = ChatClient(config, journal).run(requests, desc, progress)
    finally:
        journal.close()
    return outcomes, ledger, journal.torn_lines
