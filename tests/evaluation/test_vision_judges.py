"""``vision: true`` shows the judge (``judge``, ``pairwise``) the figure, checked before any
request; the default stays text only. Demo questions and images, the loopback fake API."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generation"))
from fakeapi import FakeAPI, fake_client, running_api  # noqa: E402

from biomedvital.data.demo import materialize_demo  # noqa: E402
from biomedvital.data.report import BadRecordError  # noqa: E402
from biomedvital.evaluation.demo_vqa import write_demo_vqa  # noqa: E402
from biomedvital.evaluation.judge import JUDGE_SYSTEM, JUDGE_SYSTEM_VISION, judge  # noqa: E402
from biomedvital.evaluation.pairwise import PAIRWISE_SYSTEM_VISION, pairwise  # noqa: E402

N = 3


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    yield from running_api(monkeypatch)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("vision")
    images = materialize_demo(tmp / "demo").images
    vqa = write_demo_vqa(tmp / "demo_vqa.json")
    chat = vqa.with_name("demo_chat.jsonl")
    answers = tmp / "answers.jsonl"
    rows = [json.loads(x) for x in chat.read_text().splitlines()]
    answers.write_text(
        "".join(json.dumps({"question_id": r["question_id"], "text": "yes"}) + "\n" for r in rows)
    )
    other = tmp / "other.jsonl"
    other.write_text(answers.read_text().replace('"yes"', '"no"'))
    return {"images": images, "vqa": vqa, "chat": chat, "answers": answers, "other": other}


def _client(api: FakeAPI):
    return fake_client(api, "judge-v", backoff_base_s=0.01)


def _figures(body: dict) -> list[str]:
    content = body["messages"][1]["content"]
    parts = content if isinstance(content, list) else []
    return [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]


def test_judge_with_the_figure(api: FakeAPI, demo: dict[str, Path], tmp_path: Path) -> None:
    api.responder = lambda body: "9 4\nthe second answer is terse"
    kw = dict(client=_client(api), limit=N, store=str(tmp_path / "mlruns"), progress=False)
    seen = judge(demo["chat"], demo["answers"], tmp_path / "vision", vision=True,
                 image_root=demo["images"], **kw)  # fmt: skip
    assert seen["counts"]["reviewed"] == N and seen["config"]["vision"] is True
    bodies = list(api.seen)
    assert len(bodies) == N
    for body in bodies:
        assert body["messages"][0]["content"] == JUDGE_SYSTEM_VISION
        (url,) = _figures(body)
        assert url.startswith("data:image/")  # inlined when sent, a reference until then
    text_only = judge(demo["chat"], demo["answers"], tmp_path / "text", **kw)
    assert text_only["counts"]["reviewed"] == N
    assert all(_figures(b) == [] for b in api.seen[N:])  # other requests: not taken from cache
    assert api.seen[N]["messages"][0]["content"] == JUDGE_SYSTEM


def test_pairwise_with_the_image(api: FakeAPI, demo: dict[str, Path], tmp_path: Path) -> None:
    api.responder = lambda body: "[[C]]"
    result = pairwise(
        demo["vqa"], demo["answers"], demo["other"], tmp_path / "pw", client=_client(api),
        vision=True, image_root=demo["images"], limit=N, n_boot=10,
        store=str(tmp_path / "mlruns"), progress=False,
    )  # fmt: skip
    assert len(api.seen) == 2 * N and result["config"]["vision"] is True
    for body in api.seen:
        assert body["messages"][0]["content"] == PAIRWISE_SYSTEM_VISION
        assert len(_figures(body)) == 1


def test_missing_figure_fails_before_any_request(
    api: FakeAPI, demo: dict[str, Path], tmp_path: Path
) -> None:
    rows = [json.loads(x) for x in demo["chat"].read_text().splitlines()]
    rows[1]["image"] = "not_there.png"
    questions = tmp_path / "chat.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(client=_client(api), limit=N, store=str(tmp_path / "mlruns"), progress=False)
    with pytest.raises(BadRecordError, match=f"question_id '{rows[1]['question_id']}'"):
        judge(
            questions, demo["answers"], tmp_path / "j", vision=True, image_root=demo["images"], **kw
        )
    with pytest.raises(ValueError, match="needs image_root"):
        judge(questions, demo["answers"], tmp_path / "j2", vision=True, **kw)
    assert api.seen == []
