"""fetch-figures against a loopback HTTP server holding PMC-like packages: one member out of
each, retried on 5xx, failures recorded with their reason, a rerun fetching only what is
missing, the download stopped at the member."""

from __future__ import annotations

import io
import json
import random
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from biomedvital.cli import main
from biomedvital.data.report import BadRecordError
from biomedvital.figures.fetch import FAILED, MANIFEST, fetch_figures

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def _package(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Server:
    """Packages by path; ``flaky`` paths answer 503 on their first request; ``cut`` paths send
    half their bytes under the full Content-Length, then close (a dropped connection)."""

    def __init__(self, packages: dict[str, bytes], flaky: set[str], cut: set[str]) -> None:
        self.packages, self.flaky, self.cut = packages, flaky, cut
        self.hits: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.hits[self.path] += 1
                body = server.packages.get(self.path)
                if body is None or (self.path in server.flaky and server.hits[self.path] == 1):
                    self.send_response(404 if body is None else 503)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.cut:
                    body = body[: len(body) // 2]
                try:
                    for i in range(0, len(body), 4096):  # a stream the client may stop reading
                        self.wfile.write(body[i : i + 4096])
                        server.bytes_sent[self.path] += len(body[i : i + 4096])
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[_Server]:
    big = random.Random(0).randbytes(32 << 20)  # 32 MB after the figure (a plain tar: no gzip)
    packages = {
        "/PMC1.tar.gz": _package({"PMC1/readme.txt": b"x", "PMC1/fig1.jpg": _jpeg((200, 0, 0))}),
        "/PMC2.tar.gz": _package({"PMC2/fig2.JPG": _jpeg((0, 200, 0)), "PMC2/big.bin": big}, "w"),
        "/PMC3.tar.gz": _package({"PMC3/other.jpg": _jpeg((0, 0, 200))}),
        "/PMC4.tar.gz": _package({"PMC4/fig4.jpg": b"not a jpeg at all"}),
        "/PMC6.tar.gz": _package({"PMC6/pad.bin": random.Random(1).randbytes(1 << 16),
                                  "PMC6/fig6.jpg": _jpeg((9, 9, 9))}),
    }  # fmt: skip
    s = _Server(packages, flaky={"/PMC2.tar.gz"}, cut={"/PMC6.tar.gz"})
    yield s
    s.httpd.shutdown()


def _urls(tmp: Path, base: str) -> Path:
    rows = [
        ("PMC1.tar.gz", "PMC1/fig1.jpg", "111_F1"),
        ("PMC2.tar.gz", "PMC2/fig2.JPG", "222_F2"),  # 503 first, then served
        ("PMC3.tar.gz", "PMC3/fig3.jpg", "333_F3"),  # not in its package
        ("PMC4.tar.gz", "PMC4/fig4.jpg", "444_F4"),  # not an image
        ("PMC5.tar.gz", "PMC5/fig5.jpg", "555_F5"),  # 404
        ("PMC6.tar.gz", "PMC6/fig6.jpg", "666_F6"),  # the connection drops mid-package
    ]
    path = tmp / "urls.jsonl"
    path.write_text(
        "".join(
            json.dumps({"pmc_tar_url": f"{base}/{pkg}", "image_file_path": m, "pair_id": p}) + "\n"
            for pkg, m, p in rows
        )
    )
    return path


def test_fetch_resume_and_failures(server: _Server, tmp_path: Path) -> None:
    urls, out = _urls(tmp_path, server.url), tmp_path / "images"
    store = str(tmp_path / "mlruns")
    kw = dict(workers=3, max_attempts=3, backoff_s=0.01, timeout_s=10, progress=False, store=store)
    result = fetch_figures(urls, out, **kw)
    assert result["counts"] == {
        "figures": 6, "fetched": 2, "already_there": 0, "failed": 4,
        "failed_by_reason": {"http_404": 1, "missing_member": 1, "network": 1, "not_an_image": 1},
    }  # fmt: skip
    assert server.hits["/PMC6.tar.gz"] == 3  # a dropped connection is retried, then recorded
    assert sorted(p.name for p in out.glob("*.jpg")) == ["111_F1.jpg", "222_F2.jpg"]
    with Image.open(out / "222_F2.jpg") as im:
        assert im.getpixel((5, 5))[1] > 150  # the green figure of PMC2
    assert server.hits["/PMC2.tar.gz"] == 2  # the 503 was retried
    assert server.bytes_sent["/PMC2.tar.gz"] < 16 << 20  # stopped after the figure, not 32 MB
    failed = [json.loads(x) for x in (out / FAILED).read_text().splitlines()]
    assert [f["pair_id"] for f in failed] == ["333_F3", "444_F4", "555_F5", "666_F6"]
    assert "PMC3/fig3.jpg is not in the package" in failed[0]["reason"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["images"]) == {"111_F1.jpg", "222_F2.jpg"}
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    run = MlflowClient(tracking_uri(store)).get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["fetch/fetched"] == 2 and run.data.metrics["fetch/failed"] == 4

    # a rerun asks only for what is missing: the failures, never the fetched figures
    before = Counter(server.hits)
    again = fetch_figures(urls, out, **kw)
    assert again["counts"]["fetched"] == 0 and again["counts"]["already_there"] == 2
    asked = server.hits - before
    assert set(asked) == {"/PMC3.tar.gz", "/PMC4.tar.gz", "/PMC5.tar.gz", "/PMC6.tar.gz"}
    assert json.loads((out / MANIFEST).read_text())["images"] == manifest["images"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporaries


def test_a_url_that_cannot_be_requested_is_a_recorded_failure(
    server: _Server, tmp_path: Path
) -> None:
    """A non-ASCII character, a space or a bad port: recorded as ``bad_url`` at once (no retry),
    and the run goes on to fetch the rest and write its failures and manifest."""
    port = server.url.rsplit(":", 1)[1]
    rows = [
        (f"{server.url}/PMC1.tar.gz", "PMC1/fig1.jpg", "111_F1"),
        (f"{server.url}/PMC\u00e9.tar.gz", "PMC7/fig7.jpg", "777_F7"),  # non-ASCII path
        (f"{server.url}/PMC 8.tar.gz", "PMC8/fig8.jpg", "888_F8"),  # a space
        (f"http://127.0.0.1:{port}x/PMC9.tar.gz", "PMC9/fig9.jpg", "999_F9"),  # bad port
    ]
    urls, out = tmp_path / "urls.jsonl", tmp_path / "images"
    urls.write_text(
        "".join(
            json.dumps({"pmc_tar_url": u, "image_file_path": m, "pair_id": p}) + "\n"
            for u, m, p in rows
        )
    )
    result = fetch_figures(
        urls, out, workers=2, max_attempts=3, backoff_s=0.01, timeout_s=10, progress=False,
        store=str(tmp_path / "mlruns"),
    )  # fmt: skip
    assert result["counts"]["fetched"] == 1
    assert result["counts"]["failed_by_reason"] == {"bad_url": 3}
    assert set(server.hits) == {"/PMC1.tar.gz"}  # nothing else was (re)tried
    failed = [json.loads(x) for x in (out / FAILED).read_text().splitlines()]
    assert [(f["pair_id"], f["category"]) for f in failed] == [
        ("777_F7", "bad_url"), ("888_F8", "bad_url"), ("999_F9", "bad_url"),
    ]  # fmt: skip
    assert "UnicodeEncodeError" in failed[0]["reason"] and "PMC\u00e9" in failed[0]["reason"]
    assert "InvalidURL" in failed[1]["reason"] and "InvalidURL" in failed[2]["reason"]
    assert set(json.loads((out / MANIFEST).read_text())["images"]) == {"111_F1.jpg"}


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"pmc_tar_url": "http://x/a.tar.gz", "image_file_path": "a/b.jpg", "pair_id": "../evil"}, "pair_id"),
        ({"pmc_tar_url": "gopher://x/a", "image_file_path": "a/b.jpg", "pair_id": "p1"}, "pmc_tar_url"),
        ({"pmc_tar_url": "http://x/a.tar.gz", "pair_id": "p1"}, "image_file_path"),
    ],
)  # fmt: skip
def test_bad_lines_are_named(tmp_path: Path, row: dict, field: str) -> None:
    good = {"pmc_tar_url": "http://x/a.tar.gz", "image_file_path": "a/b.jpg", "pair_id": "p0"}
    urls = tmp_path / "urls.jsonl"
    urls.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(BadRecordError) as err:
        fetch_figures(urls, tmp_path / "out", progress=False, store=str(tmp_path / "mlruns"))
    assert err.value.line == 2 and err.value.field == field
    assert not list((tmp_path / "out").glob("*.jpg"))


def test_cli_verb(server: _Server, tmp_path: Path) -> None:
    urls = _urls(tmp_path, server.url)
    main(["fetch-figures", "--urls", str(urls), "--out", str(tmp_path / "img"), "--limit", "1",
          "--progress", "false", "--store", str(tmp_path / "mlruns")])  # fmt: skip
    assert [p.name for p in (tmp_path / "img").glob("*.jpg")] == ["111_F1.jpg"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_llava_med_eval_list_parses() -> None:
    """LLaVA-Med's real list: 50 figures, names as LLaVA-Med-Bench's questions use them."""
    from biomedvital.data.report import RecordReport
    from biomedvital.evaluation.benchmarks import load_llava_med_bench
    from biomedvital.figures.fetch import read_sources

    sources = read_sources(
        SHARED / "llava-med" / "llava_med_image_urls_eval.jsonl", "raise", RecordReport()
    )
    assert len(sources) == 50
    assert all(s.url.startswith("https://ftp.ncbi.nlm.nih.gov/pub/pmc/") for s in sources)
    questions = load_llava_med_bench(SHARED / "llava-med")
    assert {it.image for it in questions} == {s.file_name for s in sources}
