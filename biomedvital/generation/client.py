"""An async client for OpenAI-compatible chat APIs that survives long, flaky, costly runs.

Generating or rating tens of thousands of items takes hours and money, so this client:

* streams its requests: they are pulled from an iterable as slots free up (a bounded window of
  ``2 × concurrency`` queued requests), so 100,000 figures never sit in memory as requests;
* bounds concurrency and paces requests and tokens per minute (token buckets), so a run stays
  under the provider's limits instead of living on 429s;
* retries what is transient (429, 5xx, timeouts, dropped connections, garbled bodies, empty
  choices, replies with neither text nor a refusal) with exponential backoff and jitter,
  honouring ``Retry-After`` (capped), and never retries what will not change (400, 404,
  422...); after ``max_attempts`` the item is recorded as
  failed with its reason; every attempt has a hard deadline, so a run ends in bounded time;
* stops the whole run at the first answer that every other request would get too (401/403: a
  bad key or no access; 429 ``insufficient_quota``: no money left) with :class:`ApiAccessError`,
  instead of sending the rest only to record each item failed and "finish";
* journals every finished request (JSONL) keyed by the SHA-256 of (model, messages,
  parameters), so a rerun after a crash only pays for what is missing. Each line is written and
  flushed before the request counts as done (it survives ``kill -9``); ``fsync`` runs at most
  every ``sync_interval_s`` and at close (what a power cut can lose). The journal is indexed by
  offset, not held in memory, and locked against a second process. A torn last line (process
  killed mid-write) is dropped and its request made again;
* keeps a cost ledger from the API's ``usage`` fields and a price table (``batch`` factor for
  Batch API results, 0.5 by default).

The API key is read from an environment variable whose *name* is configured; the key itself is
never stored, logged or returned, and is masked out of any server text that echoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from biomedvital.generation.prompts import inline_images, key_messages

try:  # advisory lock against two runs on one journal (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

NO_RETRY_STATUS = frozenset({400, 401, 403, 404, 405, 409, 413, 422})
"""Statuses that will fail the same way again: the item fails at once."""

RUN_FATAL_STATUS = frozenset({401, 403})
"""Statuses that say the key is wrong or lacks access: every request would get them, so the run
stops (:class:`ApiAccessError`)."""

QUOTA_CODES = frozenset({"insufficient_quota"})
"""429 error codes meaning the account has no quota left (not a rate limit to wait out)."""

BATCH_PRICE_FACTOR = 0.5
"""Batch API results cost this fraction of the online price unless ``price_per_million`` has
its own ``batch`` factor."""


# ----------------------------------------------------------------------------- keys and costs


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


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` (the API key) replaced by ``***``."""
    if secret and secret in text:
        return text.replace(secret, "***")
    return text


def safe_url(url: str) -> str:
    """A URL fit for logs and manifests: a password in it and query values are masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}" if ":" in user else f"***@{host}"
    query = "&".join(f"{q.split('=', 1)[0]}=***" for q in parts.query.split("&") if q)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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

_KEY_PREFIX = b'{"key": "'
_OFFSET_SHIFT = 32  # index value: offset << 32 | line length


_EMPTY_CONTENT = re.compile(rb'"content": (?:null|"(?:\\[nrt]| )*")')


def _empty_entry(raw: bytes) -> bool:
    """Whether a journal line holds an empty reply (a cheap byte test, then a parse)."""
    if b'"refusal": null' not in raw or _EMPTY_CONTENT.search(raw) is None:
        return False
    try:
        resp = json.loads(raw).get("response")
    except (ValueError, AttributeError):
        return False
    return isinstance(resp, dict) and is_empty_reply(resp)


class JournalBusy(RuntimeError):
    """Another process holds the journal: two runs on one output folder would pay twice."""


class Journal:
    """Append-only JSONL of finished requests: the cache that makes reruns free and resumable.

    Only an index (key → offset and length of its line) is kept in memory; entries are read
    back from disk on demand. Lines start with the key so the index loads without parsing them.
    """

    def __init__(self, path: str | Path, sync_interval_s: float = 0.2) -> None:
        self.path = Path(path)
        self.sync_interval_s = sync_interval_s
        self.torn_lines = 0
        self.empty_replies = 0
        self._index: dict[str, int] = {}
        self._size = 0
        self._wfh: Any = None
        self._rfd: int | None = None
        self._lock_fd: int | None = None
        self._last_sync = 0.0
        self._dirty = False
        self.auto_sync = True  # fsync from append(); the async client syncs from a thread instead
        if self.path.is_file():
            self._lock()
        self._load()

    # -- loading
    @staticmethod
    def _key_of(raw: bytes) -> str | None:
        if raw.startswith(_KEY_PREFIX) and raw[73:76] == b'", ' and raw.endswith(b"}\n"):
            return raw[9:73].decode("ascii", "replace")
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            return None
        if not isinstance(entry.get("response"), dict):
            return None
        return entry["key"]

    def _load(self) -> None:
        if not self.path.is_file():
            return
        offset, cut = 0, None
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    # A write was cut short: drop the partial line so the next append starts clean.
                    cut = offset
                    self.torn_lines += 1
                    break
                key = self._key_of(raw)
                if key is not None and _empty_entry(raw):
                    self.empty_replies += 1  # journaled by an older version: asked again
                elif key is not None:
                    self._index[key] = (offset << _OFFSET_SHIFT) | len(raw)
                elif raw.strip():
                    self.torn_lines += 1
                offset += len(raw)
        self._size = offset
        if self.empty_replies:
            log.warning(
                "journal %s: %d empty replies (no text, no refusal) are asked again",
                self.path,
                self.empty_replies,
            )
        if cut is not None:
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            log.warning(
                "journal %s: dropped a torn last line; its request is made again", self.path
            )

    def _lock(self) -> None:
        if fcntl is None or self._lock_fd is not None:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalBusy(
                f"journal {self.path} is in use by another process; wait for it to finish "
                "(two runs on one output folder would send the same requests twice)"
            ) from None
        self._lock_fd = fd

    # -- reading
    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def keys(self) -> Iterator[str]:
        """The keys of all journaled requests (in no particular order)."""
        return iter(self._index)

    def get(self, key: str) -> dict[str, Any] | None:
        """The journaled entry for ``key`` (read from disk), or ``None``."""
        where = self._index.get(key)
        if where is None:
            return None
        if self._rfd is None:
            self._rfd = os.open(self.path, os.O_RDONLY)
        offset, length = where >> _OFFSET_SHIFT, where & ((1 << _OFFSET_SHIFT) - 1)
        raw = os.pread(self._rfd, length, offset)
        try:
            entry = json.loads(raw)
        except ValueError:
            log.warning("journal %s: unreadable entry at byte %d; redoing it", self.path, offset)
            del self._index[key]
            return None
        return (
            entry if isinstance(entry, dict) and isinstance(entry.get("response"), dict) else None
        )

    # -- writing
    def append(self, entry: dict[str, Any]) -> None:
        """Write one finished request (flushed at once; fsynced in groups) before it counts."""
        if self._wfh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._wfh = open(self.path, "ab")  # noqa: SIM115 - kept open for the run
            self._lock()
            self._size = os.fstat(self._wfh.fileno()).st_size
        entry = {"key": entry["key"], **entry}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        if len(line) >= 1 << _OFFSET_SHIFT:  # pragma: no cover - 4 GB response
            raise ValueError("journal entry too large")
        self._wfh.write(line)
        self._wfh.flush()
        self._index[entry["key"]] = (self._size << _OFFSET_SHIFT) | len(line)
        self._size += len(line)
        self._dirty = True
        if self.auto_sync and time.monotonic() - self._last_sync >= self.sync_interval_s:
            self.sync()

    def sync(self) -> None:
        """fsync what was appended since the last sync (safe to call from another thread)."""
        fh = self._wfh
        if fh is not None and self._dirty:
            self._dirty = False
            os.fsync(fh.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Sync and release the files and the lock."""
        if self._wfh is not None:
            self.sync()
            self._wfh.close()
            self._wfh = None
        if self._rfd is not None:
            os.close(self._rfd)
            self._rfd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- config


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
        mode: ``online`` (one call per request) or ``batch`` (Batch API jobs at about half the
            price; see :mod:`biomedvital.generation.batch`).
        batch_runner: ``openai`` (the endpoint's ``/v1/files`` + ``/v1/batches``) or ``file``
            (write the request file for ``vllm.entrypoints.openai.run_batch`` and stop).
        batch_poll_s: seconds between status polls of a submitted batch.
        batch_wait_s: stop waiting after this many seconds (``null``: until the batch ends); a
            rerun collects the journaled batch.
        completion_window: the Batch API's window.
        batch_max_requests: split request files above this many requests (API limit).
        batch_max_bytes: split request files above this many bytes (API limit).
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
    mode: Literal["online", "batch"] = "online"
    batch_runner: Literal["openai", "file"] = "openai"
    batch_poll_s: float = 60.0
    batch_wait_s: float | None = None
    completion_window: str = "24h"
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 190_000_000

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
        if self.batch_poll_s <= 0:
            raise ClientConfigError(f"client.batch_poll_s must be > 0, got {self.batch_poll_s}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ClientConfigError(
                    f"client.{name} must be > 0 (or null: unpaced), got {value}"
                )
        self.price_per_million = check_prices(self.price_per_million)

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

    @classmethod
    def from_entry(
        cls, entry: dict[str, Any], prices: dict[str, float] | None, cached: bool = True
    ) -> Outcome:
        """The outcome a journal entry stands for."""
        resp = entry["response"]
        return cls(
            key=entry["key"],
            ok=True,
            content=resp.get("content"),
            refusal=resp.get("refusal"),
            finish_reason=resp.get("finish_reason"),
            usage=resp.get("usage"),
            attempts=int(entry.get("attempts") or 0),
            cached=cached,
            cost=cost_of(resp.get("usage"), prices, entry.get("via") == "batch"),
        )


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

    def add_done(self, usage: dict[str, Any] | None, cost: float) -> None:
        """Count one fresh answer."""
        self.done += 1
        self.cost_usd += cost
        usage = usage or {}
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)

    def add_failed(self, error: str | None) -> None:
        """Count one item that ended failed, by the reason's kind (text before ``:``)."""
        self.failed += 1
        kind = (error or "unknown").split(":")[0]
        self.failed_by_reason[kind] = self.failed_by_reason.get(kind, 0) + 1


@dataclass
class FillResult:
    """What a pass over a request stream left: the ledger and the items that ended failed.

    Answers are in the journal (``journal.get(key)``); ``failures`` maps a key to its outcome.
    ``batch`` describes Batch API jobs (ids, rounds, a retry file) in batch mode.
    """

    ledger: Ledger
    failures: dict[str, Outcome] = field(default_factory=dict)
    batch: dict[str, Any] | None = None

    def outcome(self, key: str, journal: Journal, prices: dict[str, float] | None) -> Outcome:
        """The outcome of ``key``: its journaled answer, its failure, or ``not run``."""
        entry = journal.get(key)
        if entry is not None:
            return Outcome.from_entry(entry, prices)
        return self.failures.get(key) or Outcome(key=key, ok=False, error="not run")


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Fatal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Stopped(Exception):
    """The run is stopping (another request hit a fatal error): this one is not sent."""


class ApiAccessError(RuntimeError):
    """The endpoint refuses the whole run (bad key, no access, quota spent).

    Every further request would fail alike, so nothing more is sent; the answers already
    journaled stay, and a rerun (with the key or quota fixed) sends only what is missing.
    """

    def __init__(self, status: int, reason: str, endpoint: str) -> None:
        self.status, self.reason, self.endpoint = status, reason, endpoint
        super().__init__(
            f"{endpoint} answered {reason}; the run stopped, as every further request would "
            "fail alike. Fix the API key, its access or the account's quota and rerun: the "
            "answers received so far are journaled and are not requested again"
        )


def is_run_fatal(status: int, code: str | None = None, kind: str | None = None) -> bool:
    """Whether an error status (with the body's ``error.code`` and ``error.type``) dooms every
    request of the run, rather than this one only."""
    return status in RUN_FATAL_STATUS or (
        status == 429 and (code in QUOTA_CODES or kind in QUOTA_CODES)
    )


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


def _short(text: Any, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _error_message(err: Any) -> str:
    """The server's own words from an API error (its ``error.message``), else the SDK's text."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        msg = inner.get("message") if isinstance(inner, dict) else inner
        if msg:
            return str(msg)
    return str(getattr(err, "message", "") or err)


def parse_completion(body: Any) -> dict[str, Any]:
    """The parts of a chat-completions body we keep; garbled or empty bodies are retryable."""
    if not isinstance(body, dict):
        raise _Retryable("malformed_response: body is not an object")
    choices = body.get("choices")
    if not choices or not isinstance(choices, list):
        raise _Retryable("empty_choices: the response has no choices")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise _Retryable("malformed_response: choices[0] is not an object")
    message = choice.get("message") or {}
    if not isinstance(message, dict):
        raise _Retryable("malformed_response: message is not an object")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise _Retryable("malformed_response: message content is not a string")
    refusal = message.get("refusal")
    resp = {
        "content": content,
        "refusal": refusal if isinstance(refusal, str) else None,
        "finish_reason": choice.get("finish_reason"),
        "usage": body.get("usage") if isinstance(body.get("usage"), dict) else None,
    }
    if is_empty_reply(resp):  # journaled, it would stand as the answer for good
        raise _Retryable(
            f"empty_content: the reply has no text and no refusal "
            f"(finish_reason {resp['finish_reason']!r})"
        )
    return resp


def is_empty_reply(resp: dict[str, Any]) -> bool:
    """A reply with neither text nor a refusal: retried, never kept as an answer."""
    content, refusal = resp.get("content"), resp.get("refusal")
    return not (isinstance(content, str) and content.strip()) and not refusal


def _parse_body(text: str) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except ValueError:
        raise _Retryable("malformed_response: body is not JSON") from None
    return parse_completion(body)


def redact_response(resp: dict[str, Any], secret: str | None) -> dict[str, Any]:
    """A parsed response with the key masked out of its texts (a server could echo it)."""
    if not secret:
        return resp
    for k in ("content", "refusal"):
        if isinstance(resp.get(k), str):
            resp[k] = redact(resp[k], secret)
    return resp


def status_is_retryable(status: int) -> bool:
    """429, 408 and 5xx may pass on a later try; other errors will not."""
    return status in (408, 429) or status >= 500


class ChatClient:
    """Runs streams of :class:`ChatRequest` through the API with pacing, retries and a journal."""

    def __init__(self, config: ClientConfig, journal: Journal) -> None:
        self.config = config
        self.journal = journal
        self._secret: str | None = None
        self._endpoint_url = safe_url(config.base_url)
        self._stop: Exception | None = None  # set when the run must stop: nothing more is sent

    def key_of(self, req: ChatRequest) -> str:
        if not req.key:
            req.key = request_key(self.config.model, req.messages, req.params)
        return req.key

    def fill(
        self,
        requests: Iterable[ChatRequest],
        desc: str = "requests",
        progress: bool = True,
        total: int | None = None,
    ) -> FillResult:
        """Make sure every request is answered in the journal or recorded as failed.

        Requests are pulled lazily; journal hits are not sent; a key repeated in the stream is
        sent once. Returns the ledger and the failures (answers are read from the journal).
        """
        return asyncio.run(self.afill(requests, desc, progress, total))

    def run(
        self, requests: Iterable[ChatRequest], desc: str = "requests", progress: bool = True
    ) -> tuple[dict[str, Outcome], Ledger]:
        """Run a (small) batch and return every outcome by key, with the ledger."""
        reqs = list(requests)
        before = {self.key_of(r) for r in reqs if self.key_of(r) in self.journal}
        res = self.fill(reqs, desc, progress, len(reqs))
        prices = self.config.price_per_million
        outcomes = {}
        for r in reqs:
            out = res.outcome(r.key, self.journal, prices)
            out.cached = r.key in before
            outcomes[r.key] = out
        return outcomes, res.ledger

    async def afill(
        self,
        requests: Iterable[ChatRequest],
        desc: str = "requests",
        progress: bool = True,
        total: int | None = None,
    ) -> FillResult:
        cfg = self.config
        ledger = Ledger()
        failures: dict[str, Outcome] = {}
        inflight: set[str] = set()
        queue: asyncio.Queue[ChatRequest | None] = asyncio.Queue(maxsize=2 * cfg.concurrency)
        rpm = TokenBucket(cfg.requests_per_minute)
        tpm = TokenBucket(cfg.tokens_per_minute)
        bar = tqdm(total=total, desc=desc, unit="req", disable=not progress, mininterval=0.5)
        client: Any = None
        workers: list[asyncio.Task[None]] = []
        last_postfix = 0.0
        abort: Exception | None = None

        def tick() -> None:
            nonlocal last_postfix
            bar.update(1)
            now = time.monotonic()
            if progress and now - last_postfix > 1.0:
                last_postfix = now
                bar.set_postfix(
                    done=ledger.done,
                    cached=ledger.cached,
                    failed=ledger.failed,
                    cost=f"${ledger.cost_usd:.4f}",
                    refresh=False,
                )

        async def worker() -> None:
            nonlocal abort
            while True:
                req = await queue.get()
                if req is None:
                    return
                if abort is not None:  # stopping: what is queued is drained, not sent
                    inflight.discard(req.key)
                    continue
                try:
                    out = await self._attempts(client, req, rpm, tpm, ledger)
                except _Stopped:
                    continue
                except Exception as exc:  # bad key, disk full, a bug: stop sending, drain
                    abort = self._stop = abort or exc
                    continue
                finally:
                    inflight.discard(req.key)
                if out.ok:
                    ledger.add_done(out.usage, out.cost)
                else:
                    failures[req.key] = out
                    ledger.add_failed(out.error)
                tick()

        stop = asyncio.Event()

        async def syncer() -> None:
            """fsync the journal in groups, off the event loop."""
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.journal.sync_interval_s)
                await asyncio.to_thread(self.journal.sync)

        self.journal.auto_sync = False
        self._stop = None
        sync_task = asyncio.create_task(syncer())
        try:
            for req in requests:
                key = self.key_of(req)
                if key in self.journal:
                    ledger.cached += 1
                    if cfg.price_per_million:
                        entry = self.journal.get(key)
                        if entry is not None:
                            ledger.cached_cost_usd += Outcome.from_entry(
                                entry, cfg.price_per_million
                            ).cost
                    tick()
                    continue
                if key in inflight or key in failures:
                    tick()
                    continue
                if client is None:
                    client = self._open_client()
                    workers = [asyncio.create_task(worker()) for _ in range(cfg.concurrency)]
                if abort is not None:
                    break
                inflight.add(key)
                await queue.put(req)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
            if abort is not None:
                raise abort
        finally:
            for w in workers:
                w.cancel()
            bar.close()
            stop.set()
            await sync_task
            self.journal.auto_sync = True
            self.journal.sync()
            if client is not None:
                await client.close()
                self._endpoint.close()
        return FillResult(ledger, failures)

    def _open_client(self) -> Any:
        from openai import AsyncOpenAI

        from biomedvital.generation.local_server import open_endpoint

        # base_url local:NAME starts a local server here, stopped with the client (afill)
        self._endpoint = open_endpoint(self.config.base_url, self.config.api_key_env)
        self._secret = self._endpoint.api_key
        self._endpoint_url = safe_url(self._endpoint.base_url)
        return AsyncOpenAI(
            base_url=self._endpoint.base_url,
            api_key=self._secret,
            max_retries=0,
            timeout=self.config.timeout_s,
        )

    async def _attempts(
        self, client: Any, req: ChatRequest, rpm: TokenBucket, tpm: TokenBucket, ledger: Ledger
    ) -> Outcome:
        cfg = self.config
        n_in, n_out = estimate_tokens(req.messages, int(req.params.get("max_tokens", 0) or 0))
        reason = "unknown"
        for attempt in range(1, cfg.max_attempts + 1):
            await rpm.acquire(1)
            await tpm.acquire(n_in + n_out)
            if self._stop is not None:  # e.g. another request found the key refused
                raise _Stopped
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
                    wait = max(wait, min(err.retry_after, cfg.retry_after_max_s))
                log.info(
                    "attempt %d of %s: %s; retrying in %.2fs", attempt, req.key[:12], reason, wait
                )
                await asyncio.sleep(wait)
                continue
            resp = redact_response(resp, self._secret)
            cost = cost_of(resp["usage"], cfg.price_per_million)
            self.journal.append(
                {
                    "key": req.key,
                    "model": cfg.model,
                    "meta": req.meta,
                    "attempts": attempt,
                    "response": resp,
                }
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

        secret = self._secret
        try:
            # The low-level post with ``cast_to=str`` skips the SDK's request transforms and
            # response models (a third of the client's CPU per request); errors are the same.
            body = {"model": self.config.model, "messages": inline_images(req.messages)}
            body.update(req.params)
            text = await asyncio.wait_for(
                client.post("/chat/completions", body=body, cast_to=str), self.config.timeout_s
            )
        except (openai.APITimeoutError, asyncio.TimeoutError):
            raise _Retryable(f"timeout: no response within {self.config.timeout_s}s") from None
        except openai.APIConnectionError as err:
            raise _Retryable(f"connection_error: {redact(_short(err), secret)}") from None
        except openai.APIStatusError as err:
            status = err.status_code
            detail = redact(_short(_error_message(err)), secret)
            code, kind = getattr(err, "code", None), getattr(err, "type", None)
            if is_run_fatal(status, code, kind):
                where = f"{self._endpoint_url.rstrip('/')}/chat/completions"
                label = code or (kind if kind in QUOTA_CODES else None)  # invalid_api_key...
                reason = f"http_{status}" + (f" {label}" if label else "") + f": {detail}"
                raise ApiAccessError(status, redact(reason, secret), where) from None
            if status_is_retryable(status):
                raise _Retryable(
                    f"http_{status}: {detail}", parse_retry_after(err.response.headers)
                ) from None
            raise _Fatal(f"http_{status}: {detail}") from None
        except Exception as err:  # httpx/h11 protocol errors on a garbled reply
            if isinstance(err, openai.OpenAIError) or "httpx" in type(err).__module__:
                raise _Retryable(f"connection_error: {redact(_short(err), secret)}") from None
            raise
        return _parse_body(text)


def fill_requests(
    config: ClientConfig,
    journal: Journal,
    requests: Iterable[ChatRequest],
    stage: str = "requests",
    progress: bool = True,
    total: int | None = None,
    batch_results: list[Path] | None = None,
) -> FillResult:
    """One pass of a verb over its request stream, online or as Batch API jobs (``config.mode``).

    In batch mode the job state lives in ``<journal folder>/batch/`` and :class:`BatchPending`
    (from :mod:`biomedvital.generation.batch`) is raised when results are not there yet.
    """
    if config.mode == "batch":
        from biomedvital.generation.batch import BatchRunner

        runner = BatchRunner(config, journal, journal.path.parent / "batch", batch_results)
        return runner.fill(requests, stage, progress)
    return ChatClient(config, journal).fill(requests, stage, progress, total)


def run_requests(
    config: ClientConfig,
    journal_path: str | Path,
    requests: Iterable[ChatRequest],
    desc: str = "requests",
    progress: bool = True,
) -> tuple[dict[str, Outcome], Ledger, int]:
    """Convenience for small batches: open the journal, run them, close; returns outcomes by
    key, the ledger and the number of torn journal lines dropped."""
    with Journal(journal_path) as journal:
        outcomes, ledger = ChatClient(config, journal).run(requests, desc, progress)
    return outcomes, ledger, journal.torn_lines
