"""Batch mode: a verb's requests as OpenAI Batch API jobs, or as a file for vLLM's batch runner.

The Batch API answers within a 24-hour window for about half the online price. Requests and
answers go through the same journal as online mode, so either mode resumes the other and a later
online rerun makes no request.

``client: {mode: batch}`` in a ``generate`` or ``rate`` config (``--client.mode batch``) turns
it on. ``client.batch_runner: openai`` (the endpoint's ``/v1/files`` and ``/v1/batches``):

1. every request not yet in the journal becomes one line of a JSONL request file
   (``{"custom_id": <cache key>, "method": "POST", "url": "/v1/chat/completions", "body"}``),
   split above the API's limits (50,000 lines, ~200 MB);
2. the file is uploaded (purpose ``batch``) and a batch created (window ``24h``); the upload's
   id, then the batch's id, are journaled in ``batch/batches.jsonl`` the moment they are known;
3. the batch is polled until it ends; its output and error files are read line by line:
   answers go to the journal, errors are kept with their reason;
4. what is still unanswered and may pass on another try (429, 5xx, expired, malformed) goes out
   again as a new, smaller batch, up to ``max_attempts`` rounds; the rest ends failed.

A restart reads ``batch/batches.jsonl``: a submitted batch is polled and collected, never
submitted again; an upload whose batch id was not journaled (killed between the two calls) is
matched to its batch through the batch list before anything new is created.

``client.batch_runner: file`` writes ``batch/<stage>.requests.jsonl`` and stops
(:class:`BatchPending`) with the command that runs it offline::

    python -m vllm.entrypoints.openai.run_batch -i requests.jsonl -o results.jsonl --model …

vLLM writes the Batch API's output format; rerun the verb with ``--batch_results`` naming every
results file so far to import them. Items the results leave unanswered end failed with their
reason, and the retryable ones are written again (a smaller request file) for another round.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from biomedvital.data.jsonio import atomic_write, iter_jsonl_objects
from biomedvital.data.report import BadRecordError
from biomedvital.llm.config import ClientConfig, read_api_key
from biomedvital.llm.errors import (
    ApiAccessError,
    Retryable,
    error_message,
    is_run_fatal,
    status_is_retryable,
)
from biomedvital.llm.images import inline_images
from biomedvital.llm.journal import Journal
from biomedvital.llm.keys import cost_of
from biomedvital.llm.outcome import ChatRequest, FillResult, Ledger, Outcome
from biomedvital.llm.redact import redact, redact_response, safe_url
from biomedvital.llm.response import parse_completion

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
RETRYABLE_CODES = frozenset(
    {"batch_expired", "batch_cancelled", "server_error", "rate_limit_exceeded", "timeout"}
)
VLLM_COMMAND = "python -m vllm.entrypoints.openai.run_batch -i {inp} -o {out} --model {model}"


class BatchPending(RuntimeError):
    """Results are not there yet; the message says what to run or rerun. ``info`` for manifests."""

    def __init__(self, message: str, info: dict[str, Any]) -> None:
        super().__init__(message)
        self.info = info


def request_line(model: str, req: ChatRequest) -> dict[str, Any]:
    """One Batch API request line; ``custom_id`` is the request's cache key (written first)."""
    return {
        "custom_id": req.key,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": model, "messages": inline_images(req.messages), **req.params},
    }


@dataclass
class ResultLine:
    """One line of a Batch API output or error file, parsed."""

    key: str | None
    response: dict[str, Any] | None = None
    error: str | None = None
    retryable: bool = True


def parse_result_line(obj: Any) -> ResultLine:
    """An answer (``response.status_code`` 200 and a usable body) or an error with its reason.

    Reads the OpenAI Batch API's and vLLM ``run_batch``'s output layout: ``{"custom_id",
    "response": {"status_code", "body"}, "error"}`` (``error`` an object or a string).
    """
    if not isinstance(obj, dict):
        return ResultLine(None, error="malformed result line")
    key = obj.get("custom_id")
    key = key if isinstance(key, str) and key else None
    resp, err = obj.get("response"), obj.get("error")
    if isinstance(resp, dict) and isinstance(resp.get("status_code"), int):
        status, body = resp["status_code"], resp.get("body")
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except ValueError:
                return ResultLine(key, error="malformed_response: body is not JSON")
        if status == 200:
            try:
                return ResultLine(key, response=parse_completion(body))
            except Retryable as exc:
                return ResultLine(key, error=exc.reason)
        detail = ""
        if isinstance(body, dict):
            e = body.get("error")
            detail = str(e.get("message", "")) if isinstance(e, dict) else str(e or "")
        return ResultLine(
            key, error=f"http_{status}: {detail}"[:300], retryable=status_is_retryable(status)
        )
    if isinstance(err, dict):
        code = str(err.get("code") or "error")
        return ResultLine(
            key, error=f"{code}: {err.get('message', '')}"[:300], retryable=code in RETRYABLE_CODES
        )
    if err:
        return ResultLine(key, error=f"batch_error: {err}"[:300], retryable=False)
    return ResultLine(key, error="malformed_response: no response in result line")


def _custom_id(line: bytes) -> str | None:
    prefix = b'{"custom_id": "'
    if line.startswith(prefix):
        end = line.find(b'"', len(prefix))
        return line[len(prefix) : end].decode("ascii", "replace")
    try:
        return json.loads(line).get("custom_id")
    except (ValueError, AttributeError):
        return None


class _Chunks:
    """Writes request lines into files of at most ``max_lines`` lines and ``max_bytes`` bytes."""

    def __init__(self, folder: Path, stage: str, start: int, max_lines: int, max_bytes: int):
        self.folder, self.stage, self.index = folder, stage, start
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self.files: list[tuple[Path, int]] = []
        self._cm: Any = None
        self._fh: IO[bytes] | None = None
        self._lines = self._bytes = 0

    def write(self, line: bytes) -> None:
        if self._fh is not None and (
            self._lines >= self.max_lines or self._bytes + len(line) > self.max_bytes
        ):
            self._close()
        if self._fh is None:
            self.index += 1
            path = self.folder / f"{self.stage}.{self.index:03d}.requests.jsonl"
            self._cm = atomic_write(path, "wb")
            self._fh = self._cm.__enter__()
            self.files.append((path, 0))
            self._lines = self._bytes = 0
        self._fh.write(line)
        self._lines += 1
        self._bytes += len(line)

    def _close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            path, _ = self.files[-1]
            self.files[-1] = (path, self._lines)
        self._cm = self._fh = None

    def close(self) -> list[tuple[Path, int]]:
        self._close()
        return self.files

    def abort(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._cm = self._fh = None


class BatchRunner:
    """Fills the journal for a request stream through batch jobs (see the module docstring)."""

    def __init__(
        self,
        config: ClientConfig,
        journal: Journal,
        folder: Path,
        results: list[Path] | Path | None = None,
    ) -> None:
        self.config = config
        self.journal = journal
        self.folder = Path(folder)
        if results is None:
            results = []
        elif isinstance(results, str | Path):
            results = [results]
        self.results = [Path(p) for p in results]
        self.events_path = self.folder / "batches.jsonl"
        self._secret: str | None = None
        self._imported: set[str] | None = None
        self._fresh: set[str] = set()
        self._collected: set[str] | None = None
        self._import_errors: dict[str, tuple[str, bool]] = {}

    # ------------------------------------------------------------------------- shared

    def fill(
        self, requests: Iterable[ChatRequest], stage: str = "requests", progress: bool = True
    ) -> FillResult:
        """Answer every request of the stream into the journal, or record why it failed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.config.batch_runner == "file":
            return self._fill_file(requests, stage)
        import openai

        try:
            return self._fill_openai(requests, stage, progress)
        except openai.APIError as err:  # no traceback may carry a key a server echoed
            status = getattr(err, "status_code", None)
            what = redact(error_message(err), self._secret)
            raise RuntimeError(
                f"{stage}: Batch API call failed ({status or type(err).__name__}): {what}; "
                f"rerun to resume (state in {self.events_path})"
            ) from None

    def _line(self, req: ChatRequest) -> bytes:
        return (
            json.dumps(request_line(self.config.model, req), ensure_ascii=False) + "\n"
        ).encode()

    def _cached(self, key: str, ledger: Ledger) -> None:
        prices = self.config.price_per_million
        if self._collected is not None and key in self._collected:
            # collected from an earlier run's pending batch in this run: counted as done then
            self._collected.discard(key)
            return
        if key in self._fresh:  # imported in this run: a fresh answer, paid at the batch price
            entry = self.journal.get(key)
            if entry is not None:
                out = Outcome.from_entry(entry, prices)
                ledger.add_done(out.usage, out.cost)
            self._fresh.discard(key)
            return
        ledger.cached += 1
        if prices:
            entry = self.journal.get(key)
            if entry is not None:
                ledger.cached_cost_usd += Outcome.from_entry(entry, prices).cost

    def _record(self, res: ResultLine, batch_id: str | None, ledger: Ledger | None) -> bool:
        """Journal an answer (once); returns whether it was new."""
        if res.key is None or res.response is None or res.key in self.journal:
            return False
        resp = redact_response(res.response, self._secret)
        entry = {"key": res.key, "model": self.config.model, "via": "batch", "response": resp}
        if batch_id:
            entry["batch_id"] = batch_id
        self.journal.append(entry)
        if self._collected is not None:
            self._collected.add(res.key)
        if ledger is not None:
            ledger.add_done(
                resp.get("usage"), cost_of(resp.get("usage"), self.config.price_per_million, True)
            )
        return True

    # ------------------------------------------------------------------------- events

    def _events(self) -> list[dict[str, Any]]:
        if not self.events_path.is_file():
            return []
        out = []
        with open(self.events_path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn by a kill: that step is redone
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    continue
        return out

    def _event(self, **event: Any) -> dict[str, Any]:
        event["time"] = round(time.time(), 3)
        data = (json.dumps(event) + "\n").encode()
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size:  # a torn last line from a kill: end it so this event stands alone
                with open(self.events_path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return event

    # ------------------------------------------------------------------------- openai runner

    def _client(self) -> Any:
        from openai import OpenAI

        self._secret = read_api_key(self.config.api_key_env)
        return OpenAI(
            base_url=self.config.base_url,
            api_key=self._secret,
            max_retries=3,
            timeout=self.config.timeout_s,
        )

    def _fill_openai(
        self, requests: Iterable[ChatRequest], stage: str, progress: bool
    ) -> FillResult:
        cfg = self.config
        ledger = Ledger()
        fails: dict[str, tuple[Outcome, bool]] = {}
        client = self._client()
        events = [e for e in self._events() if e.get("stage") == stage]
        submitted = {e["file_id"]: e for e in events if e["event"] == "submitted"}
        collected = {e["batch_id"] for e in events if e["event"] == "collected"}
        pending: list[dict[str, Any]] = []
        for e in events:
            if e["event"] == "uploaded" and e["file_id"] not in submitted:
                found = self._find_batch(client, e["file_id"])
                if found is not None:  # killed between create and journaling: adopt, not resubmit
                    ev = self._event(
                        event="submitted",
                        stage=stage,
                        file=e["file"],
                        file_id=e["file_id"],
                        batch_id=found.id,
                        n=e.get("n"),
                        adopted=True,
                    )
                    submitted[e["file_id"]] = ev
        pending = [e for e in submitted.values() if e["batch_id"] not in collected]
        keep = {e["file"] for e in pending}
        for stale in self.folder.glob(f"{stage}.*.requests.jsonl"):
            if stale.name not in keep:
                stale.unlink()
        batch_ids = [e["batch_id"] for e in pending]
        self._collected = set()  # answers collected now must not count again as journal hits
        if pending:
            log.info("%s: collecting %d batch(es) submitted by an earlier run", stage, len(pending))
            self._wait_collect(client, pending, ledger, fails, progress, stage)
            for e in pending:  # what is still missing comes again from the request stream
                (self.folder / e["file"]).unlink(missing_ok=True)
        start = max([int(e["file"].split(".")[-3]) for e in events if "file" in e] + [0])
        chunks = _Chunks(self.folder, stage, start, cfg.batch_max_requests, cfg.batch_max_bytes)
        seen: set[str] = set()
        try:
            for req in requests:
                key = req.key_for(self.config.model)
                if key in self.journal:
                    self._cached(key, ledger)
                    continue
                if key in seen or (key in fails and not fails[key][1]):
                    continue
                seen.add(key)
                chunks.write(self._line(req))
        except BaseException:
            chunks.abort()
            raise
        finally:
            self._collected = None
        files = chunks.close()
        del seen
        rounds = 0
        while files:
            if rounds == cfg.max_attempts:
                for path, _ in files:
                    for key in self._file_keys(path):
                        out, retry = fails.get(
                            key, (Outcome(key=key, ok=False, error="no_result"), True)
                        )
                        out.error = f"{out.error} (gave up after {rounds} batch rounds)"
                        fails[key] = (out, False)
                    path.unlink(missing_ok=True)
                break
            rounds += 1
            subs = [self._submit(client, stage, path, n, ledger) for path, n in files]
            batch_ids += [s["batch_id"] for s in subs]
            self._wait_collect(client, subs, ledger, fails, progress, stage)
            files = self._retry_files(files, stage, fails)
        failures = {}
        for key, (out, _) in fails.items():
            if key not in self.journal:
                failures[key] = out
                ledger.add_failed(out.error)
        info = {"runner": "openai", "batches": batch_ids, "rounds": rounds}
        return FillResult(ledger, failures, batch=info)

    def _file_keys(self, path: Path) -> Iterator[str]:
        if not path.is_file():
            return
        with open(path, "rb") as f:
            for raw in f:
                key = _custom_id(raw)
                if key:
                    yield key

    def _retry_files(
        self, files: list[tuple[Path, int]], stage: str, fails: dict[str, tuple[Outcome, bool]]
    ) -> list[tuple[Path, int]]:
        """The unanswered, retryable lines of ``files`` as new (smaller) files; old ones removed."""
        cfg = self.config
        start = max(int(p.name.split(".")[-3]) for p, _ in files)
        chunks = _Chunks(self.folder, stage, start, cfg.batch_max_requests, cfg.batch_max_bytes)
        for path, _ in files:
            with open(path, "rb") as f:
                for raw in f:
                    key = _custom_id(raw)
                    if key is None or key in self.journal:
                        continue
                    if key in fails and not fails[key][1]:
                        continue
                    chunks.write(raw)
        out = chunks.close()
        for path, _ in files:
            path.unlink(missing_ok=True)
        return out

    def _submit(
        self, client: Any, stage: str, path: Path, n: int, ledger: Ledger
    ) -> dict[str, Any]:
        with open(path, "rb") as f:
            uploaded = client.files.create(file=(path.name, f), purpose="batch")
        self._event(event="uploaded", stage=stage, file=path.name, file_id=uploaded.id, n=n)
        batch = self._create(client, uploaded.id, stage)
        ev = self._event(
            event="submitted",
            stage=stage,
            file=path.name,
            file_id=uploaded.id,
            batch_id=batch.id,
            n=n,
        )
        ledger.requests_sent += n
        log.info("%s: submitted batch %s (%d requests)", stage, batch.id, n)
        return ev

    def _create(self, client: Any, file_id: str, stage: str) -> Any:
        """Create the batch; after a transient error look it up before trying again (a create
        whose answer was lost must not be paid twice)."""
        import openai

        cfg = self.config
        once = client.with_options(max_retries=0)
        reason = ""
        for attempt in range(1, cfg.max_attempts + 1):
            try:
                return once.batches.create(
                    input_file_id=file_id,
                    endpoint=ENDPOINT,
                    completion_window=cfg.completion_window,
                    metadata={"biomedvital_stage": stage},
                )
            except (openai.APIConnectionError, openai.APITimeoutError) as err:
                reason = redact(str(err), self._secret)
            except openai.APIStatusError as err:
                reason = redact(f"http_{err.status_code}: {err.message}", self._secret)
                code, kind = getattr(err, "code", None), getattr(err, "type", None)
                if is_run_fatal(err.status_code, code, kind):
                    # a spent quota (429) would be retried as a rate limit: stop now
                    where = f"{safe_url(str(client.base_url)).rstrip('/')}/batches"
                    raise ApiAccessError(err.status_code, reason, where) from None
                if not status_is_retryable(err.status_code):
                    raise RuntimeError(f"{stage}: creating the batch failed: {reason}") from None
            time.sleep(min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1)))
            found = self._find_batch(client, file_id)
            if found is not None:
                return found
        raise RuntimeError(f"{stage}: creating the batch failed {cfg.max_attempts} times: {reason}")

    def _find_batch(self, client: Any, file_id: str, limit: int = 1000) -> Any:
        for n, b in enumerate(client.batches.list(limit=100)):
            if b.input_file_id == file_id:
                return b
            if n >= limit:
                break
        return None

    def _wait_collect(
        self,
        client: Any,
        subs: list[dict[str, Any]],
        ledger: Ledger,
        fails: dict[str, tuple[Outcome, bool]],
        progress: bool,
        stage: str,
    ) -> None:
        cfg = self.config
        deadline = None if cfg.batch_wait_s is None else time.monotonic() + cfg.batch_wait_s
        todo = {s["batch_id"]: s for s in subs}
        while True:
            for bid, sub in list(todo.items()):
                batch = client.batches.retrieve(bid)
                if batch.status in TERMINAL:
                    self._collect(client, batch, sub, ledger, fails, stage)
                    del todo[bid]
                elif progress:
                    counts = batch.request_counts
                    done = f"{counts.completed}/{counts.total}" if counts else "?"
                    log.info("%s: batch %s %s (%s)", stage, bid, batch.status, done)
            if not todo:
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                ids = ", ".join(todo)
                raise BatchPending(
                    f"{stage}: batch {ids} still running after {cfg.batch_wait_s:g}s; its id is "
                    f"journaled in {self.events_path}: rerun the same command to collect it "
                    "(nothing is submitted twice)",
                    {"stage": stage, "batches": list(todo), "events": str(self.events_path)},
                )
            wait = cfg.batch_poll_s if deadline is None else min(cfg.batch_poll_s, deadline - now)
            time.sleep(max(0.0, wait))

    def _collect(
        self,
        client: Any,
        batch: Any,
        sub: dict[str, Any],
        ledger: Ledger,
        fails: dict[str, tuple[Outcome, bool]],
        stage: str,
    ) -> None:
        n_ok = n_err = 0
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for res in self._result_lines(client, file_id):
                if res.key is None:
                    continue
                if res.response is not None:
                    self._record(res, batch.id, ledger)
                    fails.pop(res.key, None)
                    n_ok += 1
                elif res.key not in self.journal:
                    err = redact(res.error or "unknown", self._secret)
                    fails[res.key] = (Outcome(key=res.key, ok=False, error=err), res.retryable)
                    n_err += 1
        if batch.status != "completed":
            why = f"no_result: batch {batch.status}"
            errors = getattr(batch, "errors", None)
            if batch.status == "failed" and errors is not None and errors.data:
                why += ": " + "; ".join(str(e.message) for e in errors.data[:3])
            for key in self._file_keys(self.folder / sub["file"]):
                if key not in self.journal and key not in fails:
                    fails[key] = (Outcome(key=key, ok=False, error=why), batch.status != "failed")
        self.journal.sync()
        self._event(
            event="collected",
            stage=stage,
            batch_id=batch.id,
            status=batch.status,
            answered=n_ok,
            errors=n_err,
        )
        log.info(
            "%s: batch %s %s: %d answered, %d errors", stage, batch.id, batch.status, n_ok, n_err
        )

    def _result_lines(self, client: Any, file_id: str) -> Iterator[ResultLine]:
        with client.files.with_streaming_response.content(file_id) as resp:
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    log.warning("batch result file %s: a line is not JSON; skipped", file_id)
                    continue
                yield parse_result_line(obj)

    # ------------------------------------------------------------------------- file runner

    def _import(self) -> None:
        """Import every ``batch_results`` file into the journal (once per run; idempotent)."""
        if self._imported is not None:
            return
        self._imported = set()
        self._secret = os.environ.get(self.config.api_key_env) or None
        for path in self.results:
            if not path.is_file():
                raise FileNotFoundError(f"batch_results: {path} does not exist")
            n = 0
            for lineno, obj in iter_jsonl_objects(path):
                res = parse_result_line(obj)
                if res.key is None:
                    raise BadRecordError(
                        path, lineno, "no custom_id in the result line", "custom_id"
                    )
                n += 1
                self._imported.add(res.key)
                if res.response is not None:
                    if self._record(res, None, None):
                        self._fresh.add(res.key)
                    self._import_errors.pop(res.key, None)
                elif res.key not in self.journal:
                    self._import_errors[res.key] = (res.error or "unknown", res.retryable)
            log.info("imported %d batch results from %s", n, path)
        self.journal.sync()

    def _fill_file(self, requests: Iterable[ChatRequest], stage: str) -> FillResult:
        self._import()
        assert self._imported is not None
        ledger = Ledger()
        path = self.folder / f"{stage}.requests.jsonl"
        fails: dict[str, Outcome] = {}
        seen: set[str] = set()
        covered = False
        n = 0
        with atomic_write(path, "wb") as f:
            for req in requests:
                key = req.key_for(self.config.model)
                if key in self.journal:
                    self._cached(key, ledger)
                    continue
                if key in seen:
                    continue
                seen.add(key)
                covered = covered or key in self._imported
                err = self._import_errors.get(key)
                if err is not None:
                    fails[key] = Outcome(key=key, ok=False, error=err[0])
                    if not err[1]:
                        continue  # will fail the same way again: not in the retry file
                else:
                    fails[key] = Outcome(
                        key=key, ok=False, error="no_result: not in the batch results"
                    )
                f.write(self._line(req))
                n += 1
        if n == 0:
            path.unlink(missing_ok=True)
        info: dict[str, Any] = {
            "runner": "file",
            "results": [str(p) for p in self.results],
            "request_file": str(path) if n else None,
        }
        if n and not covered:
            results = self.folder / f"{stage}.results.jsonl"
            command = VLLM_COMMAND.format(inp=path, out=results, model=self.config.model)
            listed = [str(p) for p in self.results] + [str(results)]
            more = f"'[{', '.join(listed)}]'" if len(listed) > 1 else str(results)
            raise BatchPending(
                f"{stage}: wrote {n} requests to {path}\n"
                f"run them offline with vLLM's batch runner (same format as the OpenAI Batch "
                f"API):\n  {command}\n"
                f"(--model is the weights; add --served-model-name {self.config.model} if it "
                f"differs), then rerun this command with\n  --batch_results {more}",
                {**info, "stage": stage, "requests": n, "command": command},
            )
        for out in fails.values():
            ledger.add_failed(out.error)
        if n:
            info["retry_file"] = str(path)
            log.warning(
                "%s: %d requests got no usable answer; the retryable ones are in %s",
                stage,
                len(fails),
                path,
            )
        return FillResult(ledger, fails, batch=info)
