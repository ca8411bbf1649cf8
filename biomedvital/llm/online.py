"""The online runner: an async client for OpenAI-compatible chat APIs that survives long, flaky,
costly runs.

Generating or rating tens of thousands of items takes hours and money, so this client:

* streams its requests: they are pulled from an iterable as slots free up (a bounded window of
  ``2 × concurrency`` queued requests), so 100,000 figures never sit in memory as requests;
* bounds concurrency and paces requests and tokens per minute (:mod:`.pacing`), so a run stays
  under the provider's limits instead of living on 429s;
* retries what is transient (429, 5xx, timeouts, dropped connections, garbled bodies, empty
  choices, replies with neither text nor a refusal) with exponential backoff and jitter,
  honouring ``Retry-After`` (capped), and never retries what will not change (400, 404,
  422...); after ``max_attempts`` the item is recorded as failed with its reason; every attempt
  has a hard deadline, so a run ends in bounded time (:mod:`.errors`);
* stops the whole run at the first answer that every other request would get too (401/403: a
  bad key or no access; 429 ``insufficient_quota``: no money left) with :class:`ApiAccessError`,
  instead of sending the rest only to record each item failed and "finish";
* journals every finished request (:mod:`.journal`) keyed by the SHA-256 of (model, messages,
  parameters) (:mod:`.keys`), so a rerun after a crash only pays for what is missing;
* keeps a cost ledger from the API's ``usage`` fields and a price table (:mod:`.outcome`).

The API key is read from an environment variable whose *name* is configured; the key itself is
never stored, logged or returned, and is masked out of any server text that echoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from tqdm import tqdm

from biomedvital.llm.config import ClientConfig
from biomedvital.llm.errors import (
    QUOTA_CODES,
    ApiAccessError,
    Fatal,
    Retryable,
    Stopped,
    error_message,
    is_run_fatal,
    parse_retry_after,
    shorten,
    status_is_retryable,
)
from biomedvital.llm.images import inline_images
from biomedvital.llm.journal import Journal
from biomedvital.llm.keys import cost_of, estimate_tokens
from biomedvital.llm.local_server import open_endpoint
from biomedvital.llm.outcome import ChatRequest, FillResult, Ledger, Outcome
from biomedvital.llm.pacing import TokenBucket
from biomedvital.llm.redact import redact, redact_response, safe_url
from biomedvital.llm.response import parse_body

log = logging.getLogger(__name__)


class ChatClient:
    """Runs streams of :class:`ChatRequest` through the API with pacing, retries and a journal."""

    def __init__(self, config: ClientConfig, journal: Journal) -> None:
        self.config = config
        self.journal = journal

    def key_of(self, req: ChatRequest) -> str:
        """The request's cache key (set on the request)."""
        return req.key_for(self.config.model)

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
        """:meth:`fill` inside a running event loop."""
        bar = _Progress(desc, progress, total)
        async with _grouped_sync(self.journal):
            return await _Pass(self.config, self.journal, bar).run(requests)


@contextlib.asynccontextmanager
async def _grouped_sync(journal: Journal) -> AsyncIterator[None]:
    """fsync the journal in groups, off the event loop, while the block runs; once more at its
    end (appends only flush meanwhile)."""
    stop = asyncio.Event()

    async def syncer() -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), journal.sync_interval_s)
            await asyncio.to_thread(journal.sync)

    journal.auto_sync = False
    task = asyncio.create_task(syncer())
    try:
        yield
    finally:
        stop.set()
        await task
        journal.auto_sync = True
        journal.sync()


class _Progress:
    """The progress bar of one pass; its counts are refreshed at most once a second."""

    def __init__(self, desc: str, enabled: bool, total: int | None) -> None:
        self.enabled = enabled
        self.bar = tqdm(total=total, desc=desc, unit="req", disable=not enabled, mininterval=0.5)
        self._last = 0.0

    def tick(self, ledger: Ledger) -> None:
        self.bar.update(1)
        now = time.monotonic()
        if self.enabled and now - self._last > 1.0:
            self._last = now
            self.bar.set_postfix(
                done=ledger.done,
                cached=ledger.cached,
                failed=ledger.failed,
                cost=f"${ledger.cost_usd:.4f}",
                refresh=False,
            )

    def close(self) -> None:
        self.bar.close()


class _Connection:
    """The endpoint of one pass (a ``local:`` one is started here) and its HTTP client; sends
    one request and sorts what went wrong into retryable, fatal for the item, or for the run."""

    def __init__(self, config: ClientConfig) -> None:
        from openai import AsyncOpenAI

        self.config = config
        self.endpoint = open_endpoint(
            config.base_url, config.api_key_env, config.model, config.local_threads
        )
        self.secret = self.endpoint.api_key
        self.url = safe_url(self.endpoint.base_url)
        self.http = AsyncOpenAI(
            base_url=self.endpoint.base_url,
            api_key=self.secret,
            max_retries=0,
            timeout=config.timeout_s,
        )

    async def close(self) -> None:
        await self.http.close()
        self.endpoint.close()

    async def send(self, req: ChatRequest) -> dict[str, Any]:
        """The parsed reply (key masked), or :class:`Retryable` / :class:`Fatal` /
        :class:`ApiAccessError`."""
        import openai

        timeout = self.config.timeout_s
        try:
            # The low-level post with ``cast_to=str`` skips the SDK's request transforms and
            # response models (a third of the client's CPU per request); errors are the same.
            body = {"model": self.config.model, "messages": inline_images(req.messages)}
            body.update(req.params)
            post = self.http.post("/chat/completions", body=body, cast_to=str)
            text = await asyncio.wait_for(post, timeout)
        except (openai.APITimeoutError, asyncio.TimeoutError):
            raise Retryable(f"timeout: no response within {timeout}s") from None
        except openai.APIConnectionError as err:
            raise Retryable(f"connection_error: {self._masked(shorten(err))}") from None
        except openai.APIStatusError as err:
            raise self._status_error(err) from None
        except Exception as err:  # httpx/h11 protocol errors on a garbled reply
            if isinstance(err, openai.OpenAIError) or "httpx" in type(err).__module__:
                raise Retryable(f"connection_error: {self._masked(shorten(err))}") from None
            raise
        return redact_response(parse_body(text), self.secret)

    def _masked(self, text: str) -> str:
        return redact(text, self.secret)

    def _status_error(self, err: Any) -> Exception:
        status = err.status_code
        detail = self._masked(shorten(error_message(err)))
        code, kind = getattr(err, "code", None), getattr(err, "type", None)
        if is_run_fatal(status, code, kind):
            where = f"{self.url.rstrip('/')}/chat/completions"
            label = code or (kind if kind in QUOTA_CODES else None)  # invalid_api_key...
            reason = f"http_{status}" + (f" {label}" if label else "") + f": {detail}"
            return ApiAccessError(status, self._masked(reason), where)
        if status_is_retryable(status):
            return Retryable(f"http_{status}: {detail}", parse_retry_after(err.response.headers))
        return Fatal(f"http_{status}: {detail}")


class _Pass:
    """One pass over a request stream: a bounded queue that ``concurrency`` workers empty, and
    what they leave (the ledger and the failures; answers go to the journal).

    The first error that is not an item's own (a refused key, a full disk, a bug) stops the
    pass: nothing more is sent, what is queued is drained, and the error is raised at the end.
    """

    def __init__(self, config: ClientConfig, journal: Journal, progress: _Progress) -> None:
        self.config, self.journal, self.progress = config, journal, progress
        self.ledger = Ledger()
        self.failures: dict[str, Outcome] = {}
        self.inflight: set[str] = set()
        self.queue: asyncio.Queue[ChatRequest | None] = asyncio.Queue(
            maxsize=2 * config.concurrency
        )
        self.rpm = TokenBucket(config.requests_per_minute)
        self.tpm = TokenBucket(config.tokens_per_minute)
        self.connection: _Connection | None = None
        self.workers: list[asyncio.Task[None]] = []
        self.abort: Exception | None = None

    async def run(self, requests: Iterable[ChatRequest]) -> FillResult:
        try:
            await self._feed(requests)
            await self._drain()
        finally:
            await self._close()
        return FillResult(self.ledger, self.failures)

    # -- the producer: journal hits are counted, repeats skipped, the rest queued

    async def _feed(self, requests: Iterable[ChatRequest]) -> None:
        for req in requests:
            key = req.key_for(self.config.model)
            if key in self.journal:
                self._count_cached(key)
                continue
            if key in self.inflight or key in self.failures:
                self.progress.tick(self.ledger)
                continue
            if self.connection is None:  # the endpoint opens for the first request to send
                self.connection = _Connection(self.config)
                self.workers = [
                    asyncio.create_task(self._work()) for _ in range(self.config.concurrency)
                ]
            if self.abort is not None:
                break
            self.inflight.add(key)
            await self.queue.put(req)

    def _count_cached(self, key: str) -> None:
        self.ledger.cached += 1
        prices = self.config.price_per_million
        if prices:
            entry = self.journal.get(key)
            if entry is not None:
                self.ledger.cached_cost_usd += Outcome.from_entry(entry, prices).cost
        self.progress.tick(self.ledger)

    async def _drain(self) -> None:
        for _ in self.workers:
            await self.queue.put(None)
        await asyncio.gather(*self.workers)
        if self.abort is not None:
            raise self.abort

    async def _close(self) -> None:
        for w in self.workers:
            w.cancel()
        self.progress.close()
        if self.connection is not None:
            await self.connection.close()

    # -- the workers: one request at a time, with its attempts

    async def _work(self) -> None:
        while (req := await self.queue.get()) is not None:
            if self.abort is not None:  # stopping: what is queued is drained, not sent
                self.inflight.discard(req.key)
                continue
            try:
                out = await self._attempts(req)
            except Stopped:
                continue
            except Exception as exc:  # bad key, disk full, a bug: stop sending, drain
                self.abort = self.abort or exc
                continue
            finally:
                self.inflight.discard(req.key)
            if out.ok:
                self.ledger.add_done(out.usage, out.cost)
            else:
                self.failures[req.key] = out
                self.ledger.add_failed(out.error)
            self.progress.tick(self.ledger)

    async def _attempts(self, req: ChatRequest) -> Outcome:
        cfg = self.config
        assert self.connection is not None
        n_in, n_out = estimate_tokens(req.messages, int(req.params.get("max_tokens", 0) or 0))
        reason = "unknown"
        for attempt in range(1, cfg.max_attempts + 1):
            await self.rpm.acquire(1)
            await self.tpm.acquire(n_in + n_out)
            if self.abort is not None:  # e.g. another request found the key refused
                raise Stopped
            self.ledger.requests_sent += 1
            try:
                resp = await self.connection.send(req)
            except Fatal as err:
                return Outcome(key=req.key, ok=False, attempts=attempt, error=err.reason)
            except Retryable as err:
                reason = err.reason
                if attempt < cfg.max_attempts:
                    await self._back_off(req, attempt, err)
                continue
            return self._journal(req, resp, attempt)
        return Outcome(
            key=req.key,
            ok=False,
            attempts=cfg.max_attempts,
            error=f"{reason} (gave up after {cfg.max_attempts} attempts)",
        )

    async def _back_off(self, req: ChatRequest, attempt: int, err: Retryable) -> None:
        """Full-jitter exponential backoff; a longer ``Retry-After`` wins, up to its cap."""
        cfg = self.config
        backoff = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1))
        wait = random.uniform(0, backoff)
        if err.retry_after is not None:
            wait = max(wait, min(err.retry_after, cfg.retry_after_max_s))
        log.info("attempt %d of %s: %s; retrying in %.2fs", attempt, req.key[:12], err.reason, wait)
        await asyncio.sleep(wait)

    def _journal(self, req: ChatRequest, resp: dict[str, Any], attempt: int) -> Outcome:
        """Write the answer to the journal (before it counts as done)."""
        entry = {
            "key": req.key,
            "model": self.config.model,
            "meta": req.meta,
            "attempts": attempt,
            "response": resp,
        }
        self.journal.append(entry)
        cost = cost_of(resp["usage"], self.config.price_per_million)
        return Outcome(key=req.key, ok=True, attempts=attempt, cost=cost, **resp)
