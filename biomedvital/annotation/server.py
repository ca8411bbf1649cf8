"""The annotation page's HTTP server (standard library ``ThreadingHTTPServer``).

Routes: ``/`` ``/app.js`` ``/app.css`` (the page, no item data), ``/api/config`` (whether a token
is needed), and behind the token when one is set: ``/api/state`` (progress, resume point),
``/api/item?index=i``, ``/api/image?index=i`` and ``POST /api/judge``.

Safety: loopback by default; any other address needs an access token, which the page asks for and
sends as ``X-Annotate-Token`` (compared in constant time). On loopback the ``Host`` header must
name loopback (a page on another site cannot reach the server by DNS rebinding), posts must be
JSON (a cross-site form cannot send that without a CORS preflight, which is never granted), and a
strict Content-Security-Policy forbids inline script, so even a slip in escaping could not run
item text as code. Item text only ever travels as JSON and is put on the page with
``textContent``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from biomedvital.annotation.images import ImageServer
from biomedvital.annotation.session import AnnotationSession, JudgmentRejected
from biomedvital.data.images import ImageLoadError, UnsafePathError

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-Annotate-Token"
MIN_TOKEN_LENGTH = 16
MAX_BODY = 64 * 1024

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?")
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without an access token (and refuse weak tokens)."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"the access token must have at least {MIN_TOKEN_LENGTH} characters")
    if not is_loopback(host) and not token:
        raise ValueError(
            f"binding to {host!r} (not loopback) needs an access token: set the environment "
            "variable named by --token_env, e.g. "
            "export BIOMEDVITAL_ANNOTATE_TOKEN=$(python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')"
        )


def static_file(name: str) -> bytes:
    """One of the page's files, shipped as package data."""
    return resources.files(__package__).joinpath("static", name).read_bytes()


@dataclass
class AnnotationApp:
    """What the handler serves: the session, its images and the token (None: no token)."""

    session: AnnotationSession
    images: ImageServer
    token: str | None = None
    loopback_hosts_only: bool = False  # accept only Host headers naming loopback (any port)


class _Handler(BaseHTTPRequestHandler):
    app: AnnotationApp  # set on the subclass made per server
    server_version = "biomedvital-annotate"
    sys_version = ""

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _headers(
        self, status: int, content_type: str, length: int, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self._headers(status, content_type, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        # The name, not the port, defeats DNS rebinding; an SSH tunnel (ssh -L 9000:…:8765)
        # makes the browser send localhost:9000, which must work.
        if not self.app.loopback_hosts_only:
            return True
        m = _HOST_RE.fullmatch(self.headers.get("Host") or "")
        return m is not None and is_loopback(m.group(1))

    def _authorised(self) -> bool:
        token = self.app.token
        if not token:
            return True
        given = self.headers.get(TOKEN_HEADER) or ""
        return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))

    def _index(self, query: dict[str, list[str]]) -> int | None:
        try:
            i = int(query.get("index", [""])[0])
        except ValueError:
            return None
        return i if 0 <= i < len(self.app.session.items) else None

    # ------------------------------------------------------------------ verbs

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        url = urlsplit(self.path)
        if url.path in _STATIC:
            name, ctype = _STATIC[url.path]
            return self._send(HTTPStatus.OK, static_file(name), ctype)
        if url.path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        if url.path == "/api/config":
            return self._json(HTTPStatus.OK, {"token_required": bool(self.app.token)})
        if not url.path.startswith("/api/"):
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        if not self._authorised():
            return self._error(HTTPStatus.UNAUTHORIZED, "access token missing or wrong")
        session = self.app.session
        query = parse_qs(url.query)
        if url.path == "/api/state":
            return self._json(HTTPStatus.OK, session.progress())
        if url.path in ("/api/item", "/api/image"):
            i = self._index(query)
            if i is None:
                return self._error(HTTPStatus.NOT_FOUND, "no such item")
            if url.path == "/api/item":
                return self._json(HTTPStatus.OK, session.item_view(i))
            return self._image(i, query.get("window", [""])[0] or None)
        return self._error(HTTPStatus.NOT_FOUND, "not found")

    def _image(self, i: int, window: str | None) -> None:
        rel = self.app.session.items[i].image
        try:
            img = self.app.images.get(rel, window)
        except UnsafePathError as exc:
            log.warning("refused image path of item %d: %s", i, exc)
            return self._error(HTTPStatus.FORBIDDEN, "image path refused: outside the image root")
        except FileNotFoundError:
            return self._error(HTTPStatus.NOT_FOUND, f"image not found: {rel}")
        except ImageLoadError as exc:
            log.warning("item %d: %s", i, exc)
            return self._error(HTTPStatus.UNPROCESSABLE_ENTITY, f"cannot decode image {rel}")
        # the note travels in a header (percent-encoded UTF-8), so no second request is needed
        extra = {
            "X-Image-Note": quote(img.note, safe=" /"),
            "X-Image-Windows": ",".join(img.windows),
        }
        self._headers(HTTPStatus.OK, img.content_type, len(img.data), extra)
        if self.command != "HEAD":
            self.wfile.write(img.data)

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        if urlsplit(self.path).path != "/api/judge":
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        if not self._authorised():
            return self._error(HTTPStatus.UNAUTHORIZED, "access token missing or wrong")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length needed")
        if not 0 < length <= MAX_BODY:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large or empty")
        try:
            payload = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self._error(HTTPStatus.BAD_REQUEST, "body is not JSON")
        if not isinstance(payload, dict):
            return self._error(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        session = self.app.session
        try:
            j = session.record(payload)
        except JudgmentRejected as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except OSError as exc:  # disk full, journal gone: the page must not think it saved
            log.error("journal write failed: %s", exc)
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"not saved: {exc.strerror}")
        progress = session.progress()
        progress.pop("statuses")
        return self._json(
            HTTPStatus.OK,
            {"saved": True, "time": j.time, "status": j.status, "progress": progress},
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def build_server(app: AnnotationApp, host: str = "127.0.0.1", port: int = 8765) -> _Server:
    """Bind the server (``port=0``: a free one) and return it; ``serve_forever`` runs it.

    Bound to loopback, only ``Host`` headers naming loopback (on any port, for tunnels) are
    accepted.
    """
    check_binding(host, app.token)
    handler = type("AnnotationHandler", (_Handler,), {"app": app})
    cls = _Server6 if ":" in host.strip("[]") else _Server
    server = cls((host.strip("[]"), port), handler)
    app.loopback_hosts_only = is_loopback(host)
    return server


def server_url(server: ThreadingHTTPServer, host: str) -> str:
    """The address to open in a browser (a wildcard bind is shown as 127.0.0.1)."""
    port = server.server_address[1]
    shown = host.strip("[]")
    if shown in ("0.0.0.0", "::", ""):
        shown = "127.0.0.1"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"
