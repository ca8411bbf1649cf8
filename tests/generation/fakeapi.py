"""A real loopback HTTP server speaking the chat-completions protocol, with fault injection.

Responses are computed from the request (deterministic), so reruns and resumes can be compared
byte for byte. A fault is armed by a marker string: every request whose body contains the marker
consumes the next action of its queue (an HTTP error status such as ``"429"``, ``"500"``,
``"400"``, ``"401"``, ``"403"``, ``"404"``; ``"quota"`` (429 ``insufficient_quota``),
``"sleep"``, ``"reset"``, ``"malformed"``, ``"empty"``, ``"refusal"``, ``"echo-auth"`` (a 401
quoting the Authorization header), ``"echo-auth-400"`` (a 400 quoting it),
``"text:<content>"``, ``"length:<content>"`` (cut off by ``max_tokens``), ``"null-content"``,
``"bad-choice"``). :meth:`FakeAPI.random_faults` makes a seeded share of all calls fail
instead, decided per (request, how many times it was seen), so the same calls fail whatever the
concurrency.

It also serves the Batch API (``/v1/files``, ``/v1/files/{id}/content``, ``/v1/batches``,
``/v1/batches/{id}``): a batch runs its lines through the same chat logic (faults included) on a
later status poll, and can be made to expire part-way.

The server counts what it answered per request key (``served``; keys equal the client's for
text-only requests) so tests can check that nothing was paid for twice.

``python tests/generation/fakeapi.py --delay 0.2`` serves from its own process (benchmarks) and
prints its base URL.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import json
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from biomedvital.llm.config import ClientConfig
from biomedvital.llm.keys import request_key

SECRET = "sk-test-DO-NOT-LEAK-4f9c2b7e"
KEY_ENV = "BIOMEDVITAL_TEST_KEY"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
RANDOM_FAULTS = ("429", "500", "sleep", "reset", "malformed", "empty", "refusal")
"""What a randomly failing call does: rate limit (with Retry-After), server error, timeout,
connection reset, malformed body, empty choices, refusal."""


def _last_user_text(body: dict[str, Any]) -> str:
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            c = m["content"]
            if isinstance(c, str):
                return c
            return "\n".join(p.get("text", "") for p in c if p.get("type") == "text")
    return ""


def default_responder(body: dict[str, Any]) -> str:
    """A canned answer that depends on the request: conversation, answer pairs or a score."""
    system = body["messages"][0]["content"] if body.get("messages") else ""
    topic = _last_user_text(body).split("\n")[0][:50].strip()
    if "score" in system.lower() and "judge" in system.lower():
        return f"{len(topic) % 11}\nThe answers are relevant to {topic}."
    if "Answer A:" in system:
        return "\n".join(
            f"Question: Question {i} about {topic}?\n"
            f"Answer A: First answer {i}.\nStill the first answer.\n"
            f"Answer B: Second answer {i}."
            for i in range(4)
        )
    lines = []
    for i in range(4):
        lines.append(f"User: Question {i} about {topic}?")
        lines.append(f"Assistant: Answer {i} describes {topic}.\n- a second line of answer {i}")
    return "\n".join(lines)


def body_key(body: dict[str, Any]) -> str:
    """The client's cache key of a request body (equal for text-only requests)."""
    params = {k: v for k, v in body.items() if k not in ("model", "messages")}
    return request_key(body.get("model", ""), body.get("messages", []), params)


QUOTA_ERROR = {  # OpenAI's answer once the account's credit is spent
    "error": {
        "message": "You exceeded your current quota, please check your plan.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}


@dataclass
class Reply:
    """What the server does with one chat request."""

    status: int = 200
    payload: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    action: str | None = None  # "reset" / "sleep" for the HTTP layer


class FakeAPI:
    """Server state: the requests seen, the armed faults, the responder and the batch store."""

    def __init__(self, keep_bodies: bool = True) -> None:
        self.seen: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.faults: dict[str, deque[str]] = {}
        self.responder: Callable[[dict[str, Any]], str] = default_responder
        self.retry_after = "0.05"
        self.sleep_s = 1.0
        self.delay_s = 0.0
        self.keep_bodies = keep_bodies
        self.lock = threading.Lock()
        self.base_url = ""
        self.models: list[str] | None = None  # what GET /models lists (None: 404, not listed)
        self.n_requests = 0
        self.served: Counter[str] = Counter()
        self.sent_keys: list[str] = []
        self._occurrence: Counter[str] = Counter()
        self._fault_rate = 0.0
        self._fault_seed = 0
        self._fault_kinds: tuple[str, ...] = RANDOM_FAULTS
        self.faults_injected: Counter[str] = Counter()
        # batch API
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.uploads = 0
        self.batch_creates = 0
        self.batch_polls_to_finish = 1
        self.batch_expire_after: int | None = None
        # "lost": create, then drop the reply; "quota": refuse with 429 insufficient_quota
        self.batch_create_actions: deque[str] = deque()

    # -- faults
    def arm(self, marker: str, *actions: str) -> None:
        self.faults[marker] = deque(actions)

    def random_faults(
        self, rate: float = 0.3, seed: int = 0, kinds: tuple[str, ...] = RANDOM_FAULTS
    ) -> None:
        """Make a seeded ``rate`` of calls fail with one of ``kinds`` (0 turns it off)."""
        self._fault_rate, self._fault_seed, self._fault_kinds = rate, seed, kinds

    def action_for(self, raw: str, key: str = "") -> str | None:
        with self.lock:
            for marker, queue in self.faults.items():
                if marker in raw and queue:
                    return queue.popleft()
            if self._fault_rate <= 0:
                return None
            n = self._occurrence[key]
            self._occurrence[key] += 1
        rng = random.Random(f"{self._fault_seed}:{key}:{n}")
        if rng.random() < self._fault_rate:
            kind = rng.choice(self._fault_kinds)
            with self.lock:
                self.faults_injected[kind] += 1
            return kind
        return None

    # -- counting
    def count(self, marker: str = "") -> int:
        if not marker:
            return len(self.seen)
        return sum(1 for b in self.seen if marker in json.dumps(b))

    def paid_twice(self) -> list[str]:
        """Keys answered (and so billed) more than once since the last reset."""
        return [k for k, n in self.served.items() if n > 1]

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()
            self.auth.clear()
            self.sent_keys.clear()
            self.served.clear()
            self.n_requests = 0

    # -- the chat logic, shared by HTTP calls and batch lines
    def chat(self, raw: str, auth: str = "", in_batch: bool = False) -> Reply:
        """Answer one chat request (``in_batch``: a batch line, where nothing can time out)."""
        body = json.loads(raw)
        key = body_key(body)
        with self.lock:
            self.n_requests += 1
            self.sent_keys.append(key)
            if self.keep_bodies:
                self.seen.append(body)
                self.auth.append(auth)
        action = self.action_for(raw, key)
        if action and action.isdigit() and len(action) == 3:
            err = {"error": {"message": f"injected {action}", "type": "test"}}
            headers = {"Retry-After": self.retry_after} if action == "429" else {}
            return Reply(int(action), json.dumps(err).encode(), headers)
        if action == "quota":
            return Reply(429, json.dumps(QUOTA_ERROR).encode())
        if action in ("echo-auth", "echo-auth-400"):
            err = {"error": {"message": f"bad key: {auth}", "type": "test"}}
            return Reply(401 if action == "echo-auth" else 400, json.dumps(err).encode())
        if action == "reset":
            return Reply(action="reset")
        if action == "sleep" and not in_batch:
            time.sleep(self.sleep_s)
        if self.delay_s and not in_batch:
            time.sleep(self.delay_s)
        if action == "malformed":
            return Reply(200, b'{"choices": [ {"message": ', action="malformed")
        if action == "empty":
            return Reply(200, json.dumps(_completion(None, choices=False)).encode())
        if action == "bad-choice":  # choices[0] is not an object
            return Reply(200, json.dumps({**_completion(None), "choices": ["oops"]}).encode())
        finish = "stop"
        if action == "refusal":
            content = "I'm sorry, but I can't help with analysing this medical image."
        elif action and action.startswith("text:"):
            content = action[5:]
        elif action and action.startswith("length:"):
            content, finish = action[7:], "length"
        elif action == "null-content":
            content = None
        elif action == "echo-auth-content":
            content = f"Your header was {auth}"
        else:
            content = self.responder(body)
        with self.lock:
            self.served[key] += 1
        return Reply(200, json.dumps(_completion(content, finish=finish)).encode(), action=action)

    # -- batch API
    def create_file(
        self, data: bytes, purpose: str, filename: str, upload: bool = True
    ) -> dict[str, Any]:
        with self.lock:
            self.uploads += upload
            fid = f"file-{len(self.files) + 1:04d}"
            self.files[fid] = data
        return _file_object(fid, len(data), filename, purpose)

    def create_batch(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.batch_creates += 1
            bid = f"batch_{len(self.batches) + 1:04d}"
            batch = {
                "id": bid,
                "object": "batch",
                "endpoint": req["endpoint"],
                "errors": None,
                "input_file_id": req["input_file_id"],
                "completion_window": req["completion_window"],
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": int(time.time()),
                "metadata": req.get("metadata"),
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "_polls": 0,
            }
            self.batches[bid] = batch
        return batch

    def poll_batch(self, bid: str) -> dict[str, Any] | None:
        batch = self.batches.get(bid)
        if batch is None:
            return None
        if batch["status"] in ("validating", "in_progress"):
            batch["_polls"] += 1
            if batch["_polls"] > self.batch_polls_to_finish:
                self._run_batch(batch)
            else:
                batch["status"] = "in_progress"
        return batch

    def _run_batch(self, batch: dict[str, Any]) -> None:
        lines = [x for x in self.files[batch["input_file_id"]].splitlines() if x.strip()]
        out, errs = [], []
        limit = self.batch_expire_after
        for i, raw in enumerate(lines):
            if limit is not None and i >= limit:
                break
            line = json.loads(raw)
            reply = self.chat(json.dumps(line["body"]), in_batch=True)
            rid = f"batch_req_{batch['id']}_{i}"
            if reply.action == "reset":
                reply = Reply(500, b'{"error": {"message": "connection reset"}}')
            if reply.status == 200:
                try:
                    body: Any = json.loads(reply.payload)
                except ValueError:
                    body = reply.payload.decode()
                resp = {"status_code": 200, "request_id": rid, "body": body}
                out.append(
                    {"id": rid, "custom_id": line["custom_id"], "response": resp, "error": None}
                )
            else:
                resp = {
                    "status_code": reply.status,
                    "request_id": rid,
                    "body": json.loads(reply.payload),
                }
                errs.append(
                    {"id": rid, "custom_id": line["custom_id"], "response": resp, "error": None}
                )
        for name, rows in (("output_file_id", out), ("error_file_id", errs)):
            if rows:
                data = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[name] = self.create_file(data, "batch_output", f"{batch['id']}.jsonl", False)[
                    "id"
                ]
        batch["status"] = "expired" if limit is not None and limit < len(lines) else "completed"
        batch["request_counts"] = {
            "total": len(lines),
            "completed": len(out),
            "failed": len(errs),
        }


def _file_object(fid: str, size: int, filename: str, purpose: str) -> dict[str, Any]:
    return {
        "id": fid,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
    }


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _completion(content: str | None, choices: bool = True, finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake",
        "choices": (
            [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                }
            ]
            if choices
            else []
        ),
        "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200},
    }


def _multipart(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart body: name -> (filename, bytes)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + data)
    fields = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True))
    return fields


def _make_handler(api: FakeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms ACK stall

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode())

        def _reset(self) -> None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def _path(self) -> str:
            path = self.path.split("?", 1)[0]
            return path.removeprefix("/v1")

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = self._path()
            if path == "/chat/completions":
                reply = api.chat(data.decode(), self.headers.get("Authorization", ""))
                if reply.action == "reset":
                    self._reset()
                    return
                self._send(reply.status, reply.payload, reply.headers)
            elif path == "/files":
                fields = _multipart(self.headers["Content-Type"], data)
                filename, content = fields["file"]
                purpose = fields.get("purpose", (None, b"batch"))[1].decode()
                self._json(200, api.create_file(content, purpose, filename or "upload.jsonl"))
            elif path == "/batches":
                action = api.batch_create_actions.popleft() if api.batch_create_actions else None
                if action == "quota":  # refused: no batch is created
                    self._json(429, QUOTA_ERROR)
                    return
                batch = api.create_batch(json.loads(data))
                if action == "lost":  # created, but the answer never arrives
                    self._reset()
                    return
                self._json(200, _public(batch))
            else:
                self._json(404, {"error": {"message": f"no route {path}"}})

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            path = self._path()
            parts = path.strip("/").split("/")
            if parts[0] == "files" and len(parts) == 3 and parts[2] == "content":
                content = api.files.get(parts[1])
                if content is None:
                    self._json(404, {"error": {"message": "no such file"}})
                else:
                    self._send(200, content, {"Content-Type": "application/octet-stream"})
            elif parts == ["batches"]:
                data = [_public(b) for b in reversed(api.batches.values())]
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": data,
                        "has_more": False,
                        "first_id": data[0]["id"] if data else None,
                        "last_id": data[-1]["id"] if data else None,
                    },
                )
            elif parts == ["models"] and api.models is not None:
                models = [{"id": m, "object": "model", "owned_by": "test"} for m in api.models]
                self._json(200, {"object": "list", "data": models})
            elif parts[0] == "batches" and len(parts) == 2:
                batch = api.poll_batch(parts[1])
                if batch is None:
                    self._json(404, {"error": {"message": "no such batch"}})
                else:
                    self._json(200, _public(batch))
            else:
                self._json(404, {"error": {"message": f"no route {path}"}})

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # injected resets and timeouts break sockets on purpose


MODALITY_DEMOS = ("chest_xray", "mri", "ct_scan", "histology", "gross")


def write_inputs(root: Path, n_figures: int = 3, markers: dict[int, str] | None = None) -> dict:
    """Figures with real JPEG images, and two demonstrations per modality."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    figs = []
    for i in range(n_figures):
        pid = f"PMC{i}_F{i}"
        Image.new("RGB", (8, 8), (40 * i % 255, 90, 160)).save(images / f"{pid}.jpg")
        caption = f"Axial scan number {i} showing a lesion in organ {i}."
        if markers and i in markers:
            caption += f" {markers[i]}"
        figs.append(
            {
                "pair_id": pid,
                "fig_label": f"Figure {i}",
                "fig_caption": caption,
                "in_text_mention": [{"tokens": f"The lesion (Fig. {i}) measured 2 cm."}],
                "domain": {"ct_scan": True},
            }
        )
    demos = []
    for j, mod in enumerate(MODALITY_DEMOS * 2):
        demos.append(
            {
                "id": j,
                "imgs": f"demo{j}.jpg",
                "fig_caption": f"Demo caption {j} ({mod}).",
                "in_text_mention": [{"tokens": f"demo mention {j}"}],
                "domain": {m: m == mod for m in MODALITY_DEMOS},
                "conversations": [
                    {"from": "human", "value": f"What is shown in demo {j}?"},
                    {"from": "gpt", "value": f"Demo answer {j}."},
                ],
            }
        )
    (root / "figures.jsonl").write_text("".join(json.dumps(f) + "\n" for f in figs))
    (root / "demos.json").write_text(json.dumps(demos))
    return {
        "figures": root / "figures.jsonl",
        "image_root": images,
        "demonstrations": root / "demos.json",
    }


def write_candidates(path: Path, n: int, markers: dict[int, str] | None = None) -> Path:
    """``n`` one-exchange candidates (``c<i>``) to rate as JSONL; ``markers`` appends a tag to
    the captions of some (e.g. ``NOSCORE`` for a judge that then gives no score)."""
    rows = [
        {
            "id": f"c{i}",
            "image": f"c{i}.jpg",
            "fig_caption": f"CT of case {i}"
            + (f" {markers[i]}" if markers and i in markers else ""),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": f"A lesion of {i} mm."},
            ],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@dataclass
class Served:
    """A FakeAPI served from a thread of this process; ``stop()`` shuts it down."""

    api: FakeAPI
    server: _Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(api: FakeAPI | None = None, port: int = 0) -> Served:
    """Start serving ``api`` (a new one by default) on 127.0.0.1 in a daemon thread."""
    api = api or FakeAPI()
    server = _Server(("127.0.0.1", port), _make_handler(api))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    api.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return Served(api, server, thread)


def running_api(monkeypatch: Any) -> Iterator[FakeAPI]:
    """Serve a FakeAPI on a free loopback port with the key in its environment variable, for
    the duration of a fixture (``yield from running_api(monkeypatch)``)."""
    served = serve()
    monkeypatch.setenv(KEY_ENV, SECRET)
    try:
        yield served.api
    finally:
        served.stop()


def fake_client(api: FakeAPI, model: str = "m", **settings: Any) -> ClientConfig:
    """The ``client`` block of a verb pointed at ``api``: its URL and key variable, plus
    ``settings`` (concurrency, retries, prices, batch mode...)."""
    return ClientConfig(base_url=api.base_url, model=model, api_key_env=KEY_ENV, **settings)


def digest(path: Path) -> str:
    """SHA-256 of a file (output comparisons)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    """Serve from this process until killed; prints the base URL on the first line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    args = ap.parse_args(argv)
    api = FakeAPI(keep_bodies=False)
    api.delay_s = args.delay
    served = serve(api, args.port)
    print(api.base_url, flush=True)
    try:
        for line in sys.stdin:  # "count" prints the requests seen; EOF stops
            if line.strip() == "count":
                print(api.n_requests, flush=True)
            elif line.strip() == "reset":
                api.reset()
                print("ok", flush=True)
    finally:
        served.stop()


if __name__ == "__main__":
    main()
