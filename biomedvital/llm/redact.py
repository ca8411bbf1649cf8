"""Secrets out of everything the client writes: the API key masked from server text, URL
credentials and query values masked from logs and manifests."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` (the API key) replaced by ``***``."""
    if secret and secret in text:
        return text.replace(secret, "***")
    return text


def redact_response(resp: dict[str, Any], secret: str | None) -> dict[str, Any]:
    """A parsed response with the key masked out of its texts (a server could echo it)."""
    if not secret:
        return resp
    for k in ("content", "refusal"):
        if isinstance(resp.get(k), str):
            resp[k] = redact(resp[k], secret)
    return resp


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
