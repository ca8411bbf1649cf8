"""A real loopback HTTP server speaking the chat-completions protocol, with fault injection.

Responses are computed from the request (deterministic), so reruns and resumes can be compared
byte for byte. A fault is armed by a marker string: every request whose body contains the marker
consumes the next action of its queue (``"429"``, ``"500"``, ``"400"``, ``"401"``, ``"403"``,
``"sleep"``, ``"reset"``, ``"malformed"``, ``"empty"``, ``"refusal"``, ``"text:<content>"``).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SECRET = "sk-test-DO-NOT-LEAK-4f9c2b7e"
KEY_ENV = "BIOMEDVITAL_TEST_KEY"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


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


class FakeAPI:
    """Server state: the requests seen, the armed faults and the responder."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.faults: dict[str, deque[str]] = {}
        self.responder: Callable[[dict[str, Any]], str] = default_responder
        self.retry_after = "0.05"
        self.sleep_s = 1.0
        self.lock = threading.Lock()
        self.base_url = ""

    def arm(self, marker: str, *actions: str) -> None:
        self.faults[marker] = deque(actions)

    def action_for(self, raw: str) -> str | None:
        with self.lock:
            for marker, queue in self.faults.items():
                if marker in raw and queue:
                    return queue.popleft()
        return None

    def count(self, marker: str = "") -> int:
        return sum(1 for b in self.seen if marker in json.dumps(b))

    def reset(self) -> None:
        self.seen.clear()


def _completion(content: str | None, choices: bool = True) -> dict[str, Any]:
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
                    "finish_reason": "stop",
                }
            ]
            if choices
            else []
        ),
        "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200},
    }


def _make_handler(api: FakeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
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

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            body = json.loads(raw)
            with api.lock:
                api.seen.append(body)
                api.auth.append(self.headers.get("Authorization", ""))
            action = api.action_for(raw)
            if action in ("429", "500", "400", "401", "403"):
                err = {"error": {"message": f"injected {action}", "type": "test"}}
                headers = {"Retry-After": api.retry_after} if action == "429" else {}
                self._send(int(action), json.dumps(err).encode(), headers)
                return
            if action == "reset":
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
                self.close_connection = True
                return
            if action == "sleep":
                time.sleep(api.sleep_s)
            if action == "malformed":
                self._send(200, b'{"choices": [ {"message": ')
                return
            if action == "empty":
                self._send(200, json.dumps(_completion(None, choices=False)).encode())
                return
            if action == "refusal":
                content = "I'm sorry, but I can't help with analysing this medical image."
            elif action and action.startswith("text:"):
                content = action[5:]
            else:
                content = api.responder(body)
            self._send(200, json.dumps(_completion(content)).encode())

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

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


def running_api(monkeypatch: Any) -> Iterator[FakeAPI]:
    """Serve a FakeAPI on a free loopback port with the key in its environment variable, for
    the duration of a fixture (``yield from running_api(monkeypatch)``)."""
    state = FakeAPI()
    server = _Server(("127.0.0.1", 0), _make_handler(state))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    monkeypatch.setenv(KEY_ENV, SECRET)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
