"""Helpers for the annotation tests: the server as a real subprocess (so killing it is a real
SIGKILL), JSONL reading, and the Chromium launch flags."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


class AnnotateServer:
    """``python -m biomedvital annotate`` in a subprocess; ``url`` once it serves."""

    def __init__(
        self,
        items: Path,
        out: Path,
        annotator: str,
        image_root: Path,
        port: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = [
            sys.executable,
            "-m",
            "biomedvital",
            "annotate",
            "--items",
            str(items),
            "--out",
            str(out),
            "--annotator",
            annotator,
            "--image_root",
            str(image_root),
            "--port",
            str(port),
        ]
        self.env = {**os.environ, **(env or {})}
        self.log = out / f"server.{annotator}.log"
        out.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.url = ""
        self.journal = out / f"journal.{annotator}.jsonl"

    def start(self, port: int | None = None, timeout: float = 30.0) -> AnnotateServer:
        args = list(self.args)
        if port is not None:
            args[-1] = str(port)
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen(
                args, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=err, text=True
            )
        lines: queue.Queue[str] = queue.Queue()
        out = self.proc.stdout
        assert out is not None
        # a reader thread, not select(): a buffered pipe may hold both lines after one read
        self._reader = threading.Thread(target=lambda: [lines.put(ln) for ln in out], daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen += line
            m = re.search(r"serving (http://127\.0\.0\.1:\d+/)", line)
            if m:
                self.url = m.group(1)
                return self
        self.stop()
        raise AssertionError(f"annotate server did not start:\n{seen}\n{self.log.read_text()}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].rstrip("/"))

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, like a crash or a power cut of the process."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close_pipe()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=10)  # the pipe ends with the process
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
