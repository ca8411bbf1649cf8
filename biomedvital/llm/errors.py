"""Errors and their classification: what is worth another try, what fails one item, and what
stops the whole run.

* transient (:class:`Retryable`): 429, 408, 5xx, timeouts, dropped connections, garbled bodies,
  empty replies; retried with backoff, honouring ``Retry-After``;
* final for one item (:class:`Fatal`): 400, 404, 422… will fail the same way again;
* final for the run (:class:`ApiAccessError`): 401/403 (a bad key or no access) and 429
  ``insufficient_quota`` (no money left): every other request would get the same answer.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

NO_RETRY_STATUS = frozenset({400, 401, 403, 404, 405, 409, 413, 422})
"""Statuses that will fail the same way again: the item fails at once."""

RUN_FATAL_STATUS = frozenset({401, 403})
"""Statuses that say the key is wrong or lacks access: every request would get them, so the run
stops (:class:`ApiAccessError`)."""

QUOTA_CODES = frozenset({"insufficient_quota"})
"""429 error codes meaning the account has no quota left (not a rate limit to wait out)."""


class Retryable(Exception):
    """A failure that may pass on a later try; ``retry_after``: seconds the server asked for."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Fatal(Exception):
    """A failure of this request that another try would repeat: the item fails now."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Stopped(Exception):
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


def status_is_retryable(status: int) -> bool:
    """429, 408 and 5xx may pass on a later try; other errors will not."""
    return status in (408, 429) or status >= 500


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


def shorten(text: Any, n: int = 200) -> str:
    """``text`` on one line, cut to ``n`` characters (server errors can be whole HTML pages)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def error_message(err: Any) -> str:
    """The server's own words from an API error (its ``error.message``), else the SDK's text."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        msg = inner.get("message") if isinstance(inner, dict) else inner
        if msg:
            return str(msg)
    return str(getattr(err, "message", "") or err)
