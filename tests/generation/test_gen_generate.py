"""``generate`` end to end against the fake API, plus prompts and parsing rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakeapi import KEY_ENV, SECRET, SHARED, FakeAPI, default_responder, fake_client, write_inputs

from biomedvital.data.records import Candidate, Demonstration, read_demonstrations, read_figures
from biomedvital.generation.generate import generate
from biomedvital.generation.parse import REJECT_REASONS, Rejected, parse_conversation, parse_pairs
from biomedvital.generation.prompts import MODALITIES, build_messages, select_demonstrations


def _gen(
    api: FakeAPI, inputs: dict, out: Path, store: str, client: dict | None = None, **kw
) -> dict:
    settings = dict(
        concurrency=3,
        max_attempts=2,
        timeout_s=5,
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        price_per_million={"input": 10.0, "output": 30.0},
    )
    settings.update(client or {})
    args = dict(client=fake_client(api, "fake-vlm", **settings), store=store, progress=False)
    args.update(kw)
    return generate(out=out, **inputs, **args)


def test_generate_writes_candidates_and_resumes(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=4, markers={2: "FAIL-ME", 3: "REFUSE-ME"})
    api.arm("FAIL-ME", "400")
    api.arm("REFUSE-ME", "refusal")
    out = tmp_path / "out"
    m = _gen(api, inputs, out, mlstore)
    c = m["counts"]
    assert (c["done"], c["failed"], c["rejected"], c["written"]) == (3, 1, 1, 2)
    assert c["rejected_by_reason"] == {"refusal": 1}
    cands = [Candidate.model_validate_json(x) for x in (out / "candidates.jsonl").open()]
    assert [x.id for x in cands] == ["PMC0_F0", "PMC1_F1"]
    first = cands[0].conversations
    assert first[0].value.startswith("<image>\n") and "<image>" not in first[1].value
    assert "second line" in first[1].value  # multi-line answers kept
    assert cands[0].generator["model"] == "fake-vlm" and cands[0].generator["params"]["seed"] == 0
    # the image went out as a data URL
    assert api.seen[0]["messages"][-1]["content"][2]["image_url"]["url"].startswith(
        "data:image/jpeg;base64,"
    )
    failed = [json.loads(x) for x in (out / "failed.jsonl").open()]
    assert {(f["stage"], f["reason"].split(":")[0]) for f in failed} == {
        ("request", "http_400"),
        ("parse", "refusal"),
    }
    assert m["ledger"]["cost_usd"] == pytest.approx(3 * (1000 * 10 + 200 * 30) / 1e6)

    # full rerun: only the failed request is retried (failures are not cached); it now succeeds
    api.reset()
    m2 = _gen(api, inputs, out, mlstore)
    assert api.count() == 1 and api.count("FAIL-ME") == 1
    assert m2["ledger"]["cached"] == 3 and m2["counts"]["written"] == 3
    before = (out / "candidates.jsonl").read_bytes()

    # crash mid-write of the journal's last line: only that request is redone
    j = out / "journal.jsonl"
    data = j.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    j.write_bytes(data[: start + 10])
    api.reset()
    m3 = _gen(api, inputs, out, mlstore)
    assert m3["counts"]["torn_journal_lines"] == 1
    assert api.count() == 1 and api.count("FAIL-ME") == 1  # the torn line was the last success
    api.reset()
    _gen(api, inputs, out, mlstore)
    assert api.count() == 0
    after = [json.loads(x)["id"] for x in (out / "candidates.jsonl").open()]
    assert after == ["PMC0_F0", "PMC1_F1", "PMC2_F2"]
    assert (out / "candidates.jsonl").read_bytes() == before
    keys = [json.loads(x)["key"] for x in j.open()]
    assert len(keys) == len(set(keys)) == 4


def test_secret_never_written(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    """The key reaches the server only: not the journal, outputs, manifest, MLflow params, tags
    or artifacts, not even when a server echoes it back in an error or an answer."""
    inputs = write_inputs(tmp_path / "in", n_figures=3, markers={1: "ECHO-ERR", 2: "ECHO-OK"})
    api.arm("ECHO-ERR", "echo-auth-400")  # an item error (a 401 would stop the run)
    api.arm("ECHO-OK", "echo-auth-content")
    m = _gen(api, inputs, tmp_path / "out", mlstore, tags={"grid": "g", "cell": "c1"})
    assert api.auth[0] == f"Bearer {SECRET}"
    failed = {f["pair_id"]: f for f in map(json.loads, (tmp_path / "out" / "failed.jsonl").open())}
    assert failed["PMC1_F1"]["reason"] == "http_400: bad key: Bearer ***"
    assert "Bearer ***" in failed["PMC2_F2"]["raw"]
    for root in (tmp_path, Path(mlstore)):
        for p in root.rglob("*"):
            if p.is_file():
                assert SECRET.encode() not in p.read_bytes(), p
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(mlstore).resolve() / 'mlflow.db'}")
    run = client.get_run(m["mlflow_run_id"])
    assert run.data.params["api_key_env"] == KEY_ENV
    blob = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in blob and run.data.metrics["generate/written"] == 1
    assert run.data.tags["grid"] == "g" and run.data.tags["cell"] == "c1"  # a grid's cell tags


def test_urls_are_masked_in_records() -> None:
    from biomedvital.llm.config import ClientConfig
    from biomedvital.llm.redact import safe_url

    assert (
        safe_url("https://u:pw@host/v1?api-key=abc&x=1")
        == "https://u:***@host/v1?api-key=***&x=***"
    )
    assert (
        ClientConfig(base_url="http://tok@h/v1", model="m").public()["base_url"]
        == "http://***@h/v1"
    )


def test_dry_run_calls_nothing(api: FakeAPI, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV)  # a dry run needs no key
    inputs = write_inputs(tmp_path / "in", n_figures=2)
    res = _gen(api, inputs, tmp_path / "out", str(tmp_path / "ml"), dry_run=True)
    assert api.count() == 0 and not (tmp_path / "out").exists()
    text = capsys.readouterr().out
    assert "--- system ---" in text and "Axial scan number 0" in text and "estimated cost" in text
    assert res["estimate"]["requests"] == 2 and res["estimate"]["cost_usd_upper_bound"] > 0


def test_answer_pairs_mode(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=2)
    out = tmp_path / "out"
    m = _gen(api, inputs, out, mlstore, answers=2, vision=False)
    assert "Answer A:" in api.seen[0]["messages"][0]["content"]
    assert all(p.get("type") == "text" for p in api.seen[0]["messages"][-1]["content"])
    rows = [json.loads(x) for x in (out / "pairs.jsonl").open()]
    assert m["counts"]["written"] == len(rows) == 8
    r = rows[0]
    assert set(r) >= {"id", "image", "question", "answers", "fig_caption", "in_text_mention"}
    assert r["answers"] == ["First answer 0.\nStill the first answer.", "Second answer 0."]
    assert r["in_text_mention"] == "The lesion (Fig. 0) measured 2 cm."


def test_real_figures_text_only(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    figs = SHARED / "llava-med" / "llava_med_eval_qa50_fig_captions.json"
    demos = SHARED / "biomed-vital" / "doctor_few_shot_examples.json"
    if not figs.is_file() or not demos.is_file():
        pytest.skip("shared data absent")
    m = _gen(
        api,
        {"figures": figs, "image_root": tmp_path, "demonstrations": demos},
        tmp_path / "out",
        mlstore,
        vision=False,
        client={"concurrency": 8},
    )
    assert m["counts"]["figures"] == 50 and m["counts"]["written"] == 50
    msgs = api.seen[0]["messages"]
    assert len(msgs) == 1 + 2 * 5 + 1
    assert not any(p["type"] == "image_url" for p in msgs[-1]["content"])


def test_real_demonstrations_one_per_modality() -> None:
    path = SHARED / "biomed-vital" / "doctor_few_shot_examples.json"
    if not path.is_file():
        pytest.skip("shared data absent")
    demos = read_demonstrations(path)
    assert len(demos) == 58
    picks = select_demonstrations(demos, 5, seed=0, figure_id="fig-a")
    assert len(picks) == 5 and len({d.id for d in picks}) == 5
    for mod, d in zip(MODALITIES, picks, strict=True):
        assert d.domain[mod]
    assert [d.id for d in picks] == [
        d.id for d in select_demonstrations(demos, 5, seed=0, figure_id="fig-a")
    ]
    draws = {tuple(d.id for d in select_demonstrations(demos, 5, 0, f"f{i}")) for i in range(20)}
    assert len(draws) > 1  # figures see different examples
    assert len(select_demonstrations(demos, 2, 0, "x")) == 2


def test_build_messages_parts(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path, n_figures=1)
    fig = read_figures(inputs["figures"])[0]
    demos = [
        Demonstration.model_validate(d) for d in json.loads(inputs["demonstrations"].read_text())
    ]
    msgs = build_messages(fig, demos[:1], "data:image/jpeg;base64,AAA")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    query = msgs[-1]["content"]
    assert (
        query[0]["text"].startswith("Figure 0: Axial scan") and "measured 2 cm" in query[1]["text"]
    )
    assert query[2]["type"] == "image_url"
    assert msgs[2]["content"].startswith("User: What is shown in demo 0?\nAssistant:")


# ----------------------------------------------------------------------------- parsing

GOOD = """Here is the conversation.
User: What imaging modality was used?
Assistant: This is a contrast-enhanced CT.
The arterial phase is shown.
**User:** Is there a mass?
**Assistant:** Yes.
1. User: Where is it?
Assistant: In the left lobe:
- segment 2
- segment 3
User: How large is it?
Assistant: About 3 cm."""


def test_parse_keeps_multiline_and_places_image() -> None:
    turns = parse_conversation(GOOD)
    assert len(turns) == 8 and [t["from"] for t in turns[:2]] == ["human", "gpt"]
    assert turns[0]["value"] == "<image>\nWhat imaging modality was used?"
    assert turns[1]["value"] == "This is a contrast-enhanced CT.\nThe arterial phase is shown."
    assert turns[5]["value"].endswith("- segment 2\n- segment 3")
    # a trailing unanswered question is dropped
    assert len(parse_conversation(GOOD + "\nUser: And then?")) == 8


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty_output"),
        ("Just prose, no tags.", "no_turns"),
        ("User: a?\nUser: b?\nAssistant: c", "not_alternating"),
        ("User: a?\nAssistant:\nUser: b?\nAssistant: c", "empty_turn"),
        ("User: a?\nAssistant: b", "too_few_turns"),
        ("I'm sorry, I can't help with that.", "refusal"),
        (GOOD.replace("About 3 cm.", "As the caption says, 3 cm."), "mentions_caption"),
        (
            GOOD.replace("About 3 cm.", "According to the context provided, 3 cm."),
            "mentions_context",
        ),
        (GOOD.replace("Yes.", "As an AI, I cannot view images."), "refusal"),
    ],
)
def test_parse_rejects_with_reason(text: str, reason: str) -> None:
    assert reason in REJECT_REASONS
    with pytest.raises(Rejected) as e:
        parse_conversation(text)
    assert e.value.reason == reason


def test_parse_api_refusal_field() -> None:
    with pytest.raises(Rejected, match="refusal"):
        parse_conversation(GOOD, refusal="I can't help with that")


def test_parse_pairs_rules() -> None:
    items = parse_pairs(
        "Question: q1?\nAnswer A: a\nmore a\nAnswer B: b\nQuestion: q2?\nAnswer A: x"
    )
    assert len(items) == 1 and items[0].answers == ["a\nmore a", "b"]
    with pytest.raises(Rejected) as e:
        parse_pairs("Question: q?\nAnswer A: same\nAnswer B: same")
    assert e.value.reason == "identical_answers"
    with pytest.raises(Rejected) as e:
        parse_pairs("Question: q?\nAnswer B: b\nAnswer A: a")
    assert e.value.reason == "not_alternating"


def test_images_are_references_until_sent(tmp_path: Path) -> None:
    """Queued messages hold a path + hash, not base64; the hash follows the bytes."""
    import shutil

    import skimage.data

    from biomedvital.llm.images import IMAGE_REF, image_ref, inline_images

    img = tmp_path / "retina.jpg"
    shutil.copy(Path(skimage.data.__file__).parent / "retina.jpg", img)
    ref = image_ref(img)
    assert ref.startswith(IMAGE_REF) and len(ref) < 300
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}}]}]
    sent = inline_images(msgs)
    assert sent[0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert msgs[0]["content"][0]["image_url"]["url"] == ref  # the queued copy is untouched
    img.write_bytes(img.read_bytes()[:-10])
    assert image_ref(img) != ref


def test_figures_in_a_json_array_stream_like_jsonl(
    api: FakeAPI, tmp_path: Path, mlstore: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLaVA-Med releases figures as one JSON array: read element by element (never whole
    through ``read_figures``), with the same candidates as from JSONL."""
    import biomedvital.generation.generate as gen

    inputs = write_inputs(tmp_path / "in", n_figures=3)
    rows = [json.loads(x) for x in inputs["figures"].read_text().splitlines()]
    array = tmp_path / "in" / "figures.json"
    array.write_text(json.dumps(rows, indent=2))
    from_jsonl = _gen(api, inputs, tmp_path / "jsonl", mlstore)

    def whole(*args: object, **kw: object) -> None:
        raise AssertionError("a JSON array of figures was read whole")

    monkeypatch.setattr(gen, "read_figures", whole)
    from_array = _gen(api, {**inputs, "figures": array}, tmp_path / "array", mlstore)
    assert from_array["counts"] == from_jsonl["counts"]
    assert (tmp_path / "array" / "candidates.jsonl").read_text() == (
        tmp_path / "jsonl" / "candidates.jsonl"
    ).read_text()


def test_moving_the_image_folder_keeps_the_journal_keys(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    """Keys follow the image bytes, not their absolute path: a rerun with the images moved to
    another folder sends (pays for) nothing, while a request still carries the image itself."""
    import shutil

    from biomedvital.data.images import ImageRoot
    from biomedvital.llm.images import image_ref
    from biomedvital.llm.keys import request_key

    inputs = write_inputs(tmp_path / "in", n_figures=3)
    out = tmp_path / "out"
    m = _gen(api, inputs, out, mlstore, vision=True)
    assert m["counts"]["written"] == 3 and api.count() == 3
    assert api.seen[0]["messages"][-1]["content"][2]["image_url"]["url"].startswith(
        "data:image/jpeg;base64,"
    )
    moved = tmp_path / "elsewhere" / "imgs"
    shutil.copytree(inputs["image_root"], moved)
    shutil.rmtree(inputs["image_root"])

    def key(root: Path) -> str:
        ref = image_ref(ImageRoot(root).resolve("PMC0_F0.jpg"))
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}}]}]
        return request_key("m", msgs, {})

    shutil.copytree(moved, tmp_path / "copy")
    assert key(tmp_path / "copy") == key(moved)
    api.reset()
    m2 = _gen(api, {**inputs, "image_root": moved}, out, mlstore, vision=True)
    assert api.count() == 0 and m2["ledger"]["cached"] == 3 and m2["counts"]["written"] == 3
    # other bytes are another request
    (tmp_path / "copy" / "PMC0_F0.jpg").write_bytes(b"\xff\xd8 not the same image")
    assert key(tmp_path / "copy") != key(moved)


@pytest.mark.parametrize("answers", [1, 2])
def test_reply_cut_off_by_max_tokens_is_rejected(
    api: FakeAPI, tmp_path: Path, mlstore: str, answers: int
) -> None:
    """A reply that hit ``max_tokens`` parses (its last answer half-written): it is rejected as
    ``truncated``, counted and kept with its text in failed.jsonl, not written as training data."""
    inputs = write_inputs(tmp_path / "in", n_figures=2, markers={1: "CUT-ME"})
    if answers == 1:
        body = "\n".join(f"User: Q{i}?\nAssistant: The lesion is {i} cm." for i in range(3))
        cut = f"{body}\nUser: What is the diagnosis?\nAssistant: Most consistent with a diag"
    else:
        cut = "Question: Q?\nAnswer A: A mass.\nAnswer B: A cyst in the left"
    api.arm("CUT-ME", f"length:{cut}")
    out = tmp_path / "out"
    m = _gen(api, inputs, out, mlstore, answers=answers, vision=False)
    c = m["counts"]
    assert (c["done"], c["failed"], c["rejected"]) == (2, 0, 1)
    assert c["rejected_by_reason"] == {"truncated": 1}
    (f,) = [json.loads(x) for x in (out / "failed.jsonl").open()]
    assert (f["pair_id"], f["stage"], f["reason"], f["raw"]) == (
        "PMC1_F1",
        "parse",
        "truncated",
        cut,
    )
    assert "max_tokens" in f["detail"] and "truncated" in REJECT_REASONS
    name = "candidates.jsonl" if answers == 1 else "pairs.jsonl"
    written = [json.loads(x) for x in (out / name).open()]
    assert written and all(r["pair_id"] == "PMC0_F0" for r in written)
    assert c["kept_truncated"] == 0

    # ``truncated_replies: keep`` (the released script keeps every tagged line): the journal is
    # re-parsed, nothing is sent, the cut reply is written with its finish_reason and counted
    api.reset()
    m2 = _gen(api, inputs, out, mlstore, answers=answers, vision=False, truncated_replies="keep")
    assert api.count() == 0 and m2["config"]["truncated_replies"] == "keep"
    c2 = m2["counts"]
    assert (c2["rejected"], c2["kept_truncated"]) == (0, 1)
    kept = [json.loads(x) for x in (out / name).open() if "PMC1_F1" in x]
    assert kept and {r["generator"]["finish_reason"] for r in kept} == {"length"}
    last = kept[-1]["conversations"][-1]["value"] if answers == 1 else kept[-1]["answers"][1]
    assert last.endswith(("a diag", "in the left"))
    assert (out / "failed.jsonl").read_text() == ""


def test_empty_reply_is_retried_not_kept(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    """An empty reply is not journaled as the figure's answer: the next attempt's text is used,
    and a figure whose every attempt came back empty is asked again by a rerun."""
    inputs = write_inputs(tmp_path / "in", n_figures=3, markers={0: "EMPTY-ONCE", 1: "EMPTY-ALL"})
    api.arm("EMPTY-ONCE", "text:")
    api.arm("EMPTY-ALL", "text:", "null-content")
    out = tmp_path / "out"
    m = _gen(api, inputs, out, mlstore, vision=False)
    c = m["counts"]
    assert (c["done"], c["failed"], c["rejected"], c["written"]) == (2, 1, 0, 2)
    failed = [json.loads(x) for x in (out / "failed.jsonl").open()]
    assert [(f["pair_id"], f["reason"].split(":")[0]) for f in failed] == [
        ("PMC1_F1", "empty_content")
    ]
    api.reset()
    m2 = _gen(api, inputs, out, mlstore, vision=False)
    assert api.count() == 1 and api.count("EMPTY-ALL") == 1
    assert m2["counts"]["written"] == 3


def test_flagged_answer_drops_its_exchange_and_is_reported(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    """One answer citing the caption costs its exchange, not the conversation (LLaVA-Med's
    post-processing); the exchange is written to dropped_exchanges.jsonl and counted. Rerun
    under ``reject``: the journal is re-parsed, nothing is sent, the reply is rejected."""
    inputs = write_inputs(tmp_path / "in", n_figures=2, markers={1: "GIVEAWAY"})

    def responder(body: dict) -> str:
        reply = default_responder(body)
        if "GIVEAWAY" in json.dumps(body["messages"][-1]):
            reply += "\nUser: What is the finding?\nAssistant: The caption says a mass."
        return reply

    api.responder = responder
    out = tmp_path / "out"
    m = _gen(api, inputs, out, mlstore)
    assert m["counts"]["written"] == 2 and m["counts"]["rejected"] == 0
    assert m["counts"]["dropped_exchanges_by_reason"] == {"mentions_caption": 1}
    (gone,) = [json.loads(x) for x in (out / "dropped_exchanges.jsonl").open()]
    assert gone["pair_id"] == "PMC1_F1" and gone["reason"] == "mentions_caption"
    assert gone["question"] == "What is the finding?"
    assert gone["answer"] == "The caption says a mass."
    cands = {c["id"]: c for c in map(json.loads, (out / "candidates.jsonl").open())}
    assert len(cands["PMC1_F1"]["conversations"]) == 8
    assert "caption" not in json.dumps(cands["PMC1_F1"]["conversations"])

    api.reset()
    m2 = _gen(api, inputs, out, mlstore, flagged_answers="reject")
    assert api.count() == 0
    assert m2["counts"]["rejected_by_reason"] == {"mentions_caption": 1}
    assert m2["counts"]["dropped_exchanges"] == 0
    assert (out / "dropped_exchanges.jsonl").read_text() == ""

    # ``keep`` (the released script filters nothing): the answer stays, counted by reason
    api.reset()
    m3 = _gen(api, inputs, out, mlstore, flagged_answers="keep")
    assert api.count() == 0 and m3["counts"]["written"] == 2
    assert m3["counts"]["rejected"] == m3["counts"]["dropped_exchanges"] == 0
    assert m3["counts"]["kept_flagged_answers_by_reason"] == {"mentions_caption": 1}
    assert m3["counts"]["kept_flagged_answers"] == 1
    cands = {c["id"]: c for c in map(json.loads, (out / "candidates.jsonl").open())}
    assert len(cands["PMC1_F1"]["conversations"]) == 10
    assert cands["PMC1_F1"]["conversations"][-1]["value"] == "The caption says a mass."
    assert (out / "dropped_exchanges.jsonl").read_text() == ""
