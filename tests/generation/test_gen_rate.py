"""``rate`` (judge scores, re-ask, failures, clinician alignment) and ``import_preferences``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fakeapi import FakeAPI, default_responder, fake_client

from biomedvital.data.records import Rating, read_preferences
from biomedvital.data.report import BadRecordError
from biomedvital.generation.preferences import import_preferences
from biomedvital.generation.rate import parse_score, rate
from biomedvital.llm.errors import ApiAccessError


def _cand(i: int, pair_id: str, **fields: object) -> dict:
    return {
        "id": f"c{i}",
        "image": f"c{i}.jpg",
        "pair_id": pair_id,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": f"A lesion {i}."},
        ],
        **fields,
    }


def _cands(path: Path, tags: list[str]) -> Path:
    rows = [_cand(i, f"p{i}", fig_caption=f"CT of case {i} {tag}") for i, tag in enumerate(tags)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rate(
    api: FakeAPI, cands: Path, out: Path, store: str, client_settings: dict | None = None, **kw
) -> dict:
    settings = dict(max_attempts=2, timeout_s=5, backoff_base_s=0.01, backoff_max_s=0.02)
    settings.update(client_settings or {})
    client = fake_client(api, "judge", **settings)
    args = dict(client=client, store=store, progress=False)
    args.update(kw)
    return rate(cands, out, **args)


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("8\nGood.", 8),
        ("Score: 7/10 - clear", 7),
        ("**10**", 10),
        ("\n\n  0 - useless", 0),
        ("11", None),
        ("8.5", None),
        ("Good answers.\n8", None),
        ("", None),
        (None, None),
        # the scale or an item number is not the score
        ("Score (0-10): 7", 7),
        ("Score (0–10): 7", 7),
        ("**Score (out of 10): 8**", 8),
        ("Rating for conversation 1: 6", 6),
        ("Score (on a scale of 0 to 10): 4", 4),
        ("8/10", 8),
        ("10 / 10 - excellent", 10),
        ("9 out of 10", 9),
        ("**Score:** 9", 9),
        ("Score 9", 9),
        ("8. Clear and relevant.", 8),
        # negatives, ranges and out-of-range are refused (re-asked), not read as another number
        ("-3", None),
        ("Score: -3", None),
        ("Score: 12/10", None),
        ("Score: 7-8", None),
        ("Rating: 3.5", None),
        ("Conversation 2 of the set: 9", None),
    ],
)
def test_parse_score(text: str | None, score: int | None) -> None:
    assert parse_score(text) == score


def test_rate_reasks_once_then_fails(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    cands = _cands(tmp_path / "c.jsonl", ["plain", "REASK-OK", "REASK-BAD", "HTTP-BAD"])
    api.arm("REASK-OK", "text:A thorough conversation.\nScore 9")
    api.arm("REASK-BAD", "text:Excellent.", "text:I would say quite good.")
    api.arm("HTTP-BAD", "400")
    out = tmp_path / "out"
    m = _rate(api, cands, out, mlstore)
    assert m["counts"] == {
        "candidates": 4,
        "no_caption": 0,
        "rated": 2,
        "failed": 2,
        "reasked": 2,
        "unparsable_after_reask": 1,
    }
    assert api.count("REASK-OK") == 2 and api.count("REASK-BAD") == 2 and api.count("HTTP-BAD") == 1
    ratings = [Rating.model_validate_json(x) for x in (out / "ratings.jsonl").open()]
    assert [r.candidate_id for r in ratings] == ["c0", "c1"]
    assert "[re-asked]" in ratings[1].raw and ratings[0].judge == "judge"
    failed = {f["id"]: f["reason"] for f in map(json.loads, (out / "failed.jsonl").open())}
    assert failed["c2"].startswith("unparsable_score") and failed["c3"].startswith("http_400")
    # rerun: everything answered comes from the journal, only the 400 is asked again
    api.reset()
    _rate(api, cands, out, mlstore)
    assert api.count() == 1 and api.count("HTTP-BAD") == 1


def test_rate_alignment_with_clinicians(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    def judge(body: dict) -> str:
        text = json.dumps(body["messages"][-1])
        if "GOODANS" in text:
            return "9\nfine"
        if "TIEANS" in text:
            return "5\nmeh"
        if "BADANS" in text:
            return "2\npoor"
        return default_responder(body)

    api.responder = judge
    prefs = tmp_path / "prefs.jsonl"
    rows = [
        {
            "id": "a",
            "image": "x.jpg",
            "question": "q?",
            "preferred": "GOODANS 1",
            "rejected": "BADANS 1",
        },
        {
            "id": "b",
            "image": "x.jpg",
            "question": "q?",
            "preferred": "BADANS 2",
            "rejected": "GOODANS 2",
        },
        {
            "id": "c",
            "image": "x.jpg",
            "question": "q?",
            "preferred": "TIEANS 1",
            "rejected": "TIEANS 2",
        },
        {
            "id": "d",
            "image": "x.jpg",
            "question": "q?",
            "preferred": "GOODANS 3",
            "rejected": "BADANS 3",
        },
    ]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = _rate(
        api, _cands(tmp_path / "c.jsonl", ["x"]), tmp_path / "out", mlstore, preferences=prefs
    )
    al = m["alignment"]
    assert (al["aligned"], al["misaligned"], al["ties"], al["unscored"]) == (2, 1, 1, 0)
    assert al["align_rate"] == pytest.approx(0.5)
    assert al["align_rate_without_ties"] == pytest.approx(2 / 3)
    scores = [json.loads(x) for x in (tmp_path / "out" / "preference_scores.jsonl").open()]
    assert scores[0] == {"id": "a", "preferred_score": 9, "rejected_score": 2}


def test_rate_dry_run(api: FakeAPI, tmp_path: Path, capsys) -> None:
    res = _rate(
        api, _cands(tmp_path / "c.jsonl", ["x", "y"]), tmp_path / "o", "unused", dry_run=True
    )
    assert api.count() == 0 and res["estimate"]["requests"] == 2
    assert "medical expert" in capsys.readouterr().out


# ----------------------------------------------------------------------------- preferences


def test_import_csv_pairs_and_marks(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "id,image,question,preferred,rejected,annotator\n"
        'p1,a.jpg,What is it?,"A mass, 2 cm",No idea,dr-x\n'
        "p2,b.jpg,Which organ?,Liver,Spleen,\n"
    )
    m = import_preferences(pairs, tmp_path / "out1.jsonl", annotator="panel")
    assert m["preferences"] == 2
    got = read_preferences(tmp_path / "out1.jsonl")
    assert got[0].preferred == "A mass, 2 cm" and got[0].annotator == "dr-x"
    assert got[1].annotator == "panel"

    marks = tmp_path / "marks.csv"
    marks.write_text(
        "id,image,question,answer,acceptable\n"
        "q1,a.jpg,Is there a mass?,Yes in the left lobe,yes\n"
        "q1,a.jpg,Is there a mass?,No,no\n"
        "q2,b.jpg,Modality?,CT,yes\n"
        "q2,b.jpg,Modality?,Computed tomography,yes\n"
    )
    m = import_preferences(marks, tmp_path / "out2.jsonl")
    assert m["preferences"] == 1 and m["no_contrast"] == 1
    (p,) = read_preferences(tmp_path / "out2.jsonl")
    assert p.id == "q1#0>1" and p.preferred == "Yes in the left lobe"


def test_import_generated_pairs_after_marking(tmp_path: Path) -> None:
    src = tmp_path / "marked.jsonl"
    rec = {
        "id": "f-q0",
        "image": "f.jpg",
        "question": "What is shown?",
        "answers": ["A cyst.", "A tumour."],
        "acceptable": ["reject", "accept"],
        "fig_caption": "c",
        "in_text_mention": "m",
        "pair_id": "f",
        "generator": {"model": "x"},
    }
    src.write_text(json.dumps(rec) + "\n")
    import_preferences(src, tmp_path / "o.jsonl")
    (p,) = read_preferences(tmp_path / "o.jsonl")
    assert (p.preferred, p.rejected, p.id) == ("A tumour.", "A cyst.", "f-q0#1>0")


@pytest.mark.parametrize(
    ("content", "line", "needle"),
    [
        ("id,image,question\nx,a.jpg,q\n", 1, "missing column"),
        ("id,image,question,answer,acceptable\nq1,a.jpg,q,A,maybe\n", 2, "maybe"),
        ("id,image,question,preferred,rejected\np1,a.jpg,q,Same,Same\n", 2, "identical"),
        ("id,image,question,preferred,rejected\np1,a.jpg,,A,B\n", 2, "question"),
        (
            "id,image,question,answer,acceptable\nq1,a.jpg,q,A,yes\nq1,b.jpg,q,B,no\n",
            3,
            "another question or image",
        ),
    ],
)
def test_import_csv_errors_name_file_and_line(
    tmp_path: Path, content: str, line: int, needle: str
) -> None:
    src = tmp_path / "bad.csv"
    src.write_text(content)
    with pytest.raises(BadRecordError) as e:
        import_preferences(src, tmp_path / "o.jsonl")
    assert e.value.line == line and str(src) in str(e.value) and needle in str(e.value)
    assert not (tmp_path / "o.jsonl").exists()


def test_import_skip_counts(tmp_path: Path) -> None:
    src = tmp_path / "mixed.csv"
    src.write_text("id,image,question,preferred,rejected\np1,a.jpg,q,A,B\np2,a.jpg,q,Same,Same\n")
    m = import_preferences(src, tmp_path / "o.jsonl", on_bad_record="skip")
    assert m["preferences"] == 1 and m["records"]["skipped"] == 1


def test_extra_body_is_sent_and_keys_the_cache(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    """``extra_body`` (llama.cpp's grammar, vLLM's guided decoding) reaches the endpoint, is part
    of the cache key (a run with another grammar is not answered from the journal) and is
    recorded in the manifest."""
    cands = _cands(tmp_path / "c.jsonl", ["plain"])
    grammar = {"grammar": 'root ::= ("10" | [0-9]) "\\n" [^\\n]*'}
    m = _rate(api, cands, tmp_path / "a", mlstore, extra_body=grammar)
    assert api.seen[-1]["grammar"] == grammar["grammar"]
    assert json.dumps(grammar) in json.dumps(m)
    n = api.n_requests
    _rate(api, cands, tmp_path / "a", mlstore, extra_body=grammar)  # a rerun: the journal answers
    assert api.n_requests == n
    _rate(api, cands, tmp_path / "a", mlstore)  # without it: another key, asked again
    assert api.n_requests == n + 1 and "grammar" not in api.seen[-1]


def test_import_a_repeated_marks_record_names_its_line_and_counts_it_once(tmp_path: Path) -> None:
    """A marks record giving two pairs, repeated on line 3 (a blank line between): the error
    names line 3 and line 1; skipped, the record leaves the kept count once (not per pair)."""
    rec = {
        "id": "f-q0",
        "image": "f.jpg",
        "question": "What is shown?",
        "answers": ["A tumour.", "A cyst.", "Nothing."],
        "acceptable": ["accept", "reject", "reject"],
    }
    src = tmp_path / "marked.jsonl"
    src.write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    with pytest.raises(BadRecordError, match=r"marked.jsonl:3: .*line 3 repeats line 1"):
        import_preferences(src, tmp_path / "o.jsonl")
    m = import_preferences(src, tmp_path / "o.jsonl", on_bad_record="skip")
    assert m["preferences"] == 2
    assert m["records"]["kept"] == 1 and m["records"]["skipped_by_reason"] == {"duplicate:id": 2}


# ----------------------------------------------------------------------------- caption context


def _bare_cands(path: Path, pair_ids: list[str], **fields: object) -> Path:
    """Candidates as ``generate`` writes them: a pair_id, no caption (plus ``fields``)."""
    rows = [_cand(i, pid, **fields) for i, pid in enumerate(pair_ids)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _user_text(body: dict) -> str:
    return "\n".join(p.get("text", "") for p in body["messages"][-1]["content"])


def test_rate_without_figures_counts_and_warns_no_caption(
    api: FakeAPI, tmp_path: Path, mlstore: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``generate``'s candidates carry no caption: rated without ``figures`` the judge sees
    "Caption: (none)", which is counted and warned about once (with the fix), not silent."""
    cands = _bare_cands(tmp_path / "c.jsonl", ["p0", "p1", "p2"])
    with caplog.at_level(logging.WARNING, logger="biomedvital.generation.rate"):
        m = _rate(api, cands, tmp_path / "out", mlstore)
    assert m["counts"]["no_caption"] == 3 and m["counts"]["rated"] == 3
    warned = [r.getMessage() for r in caplog.records if "without a caption" in r.getMessage()]
    assert len(warned) == 1 and "3 of 3" in warned[0] and "--figures" in warned[0]
    assert all("Caption: (none)" in _user_text(b) for b in api.seen)


def test_rate_reads_list_mentions_and_own_caption(
    api: FakeAPI, tmp_path: Path, mlstore: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A candidate's own list-form ``in_text_mention`` reaches the judge (it was dropped), and
    a candidate with its own caption is not counted; a malformed one is a bad record."""
    mentions = [{"tokens": "LISTMENTION one."}, {"tokens": "LISTMENTION two."}]
    cands = _bare_cands(
        tmp_path / "c.jsonl", ["p0", "p1"], fig_caption="OWNCAPTION", in_text_mention=mentions
    )
    with caplog.at_level(logging.WARNING, logger="biomedvital.generation.rate"):
        m = _rate(api, cands, tmp_path / "out", mlstore)
    assert m["counts"]["no_caption"] == 0
    assert not [r for r in caplog.records if "without a caption" in r.getMessage()]
    text = _user_text(api.seen[0])
    assert "Caption: OWNCAPTION" in text and "LISTMENTION one. LISTMENTION two." in text
    bad = _bare_cands(tmp_path / "bad.jsonl", ["p0", "p1"], in_text_mention=[{"no": "tokens"}])
    api.reset()
    with pytest.raises(BadRecordError, match=r"bad.jsonl:1: .*in_text_mention") as info:
        _rate(api, bad, tmp_path / "out2", mlstore)
    assert info.value.category == "invalid:in_text_mention" and api.count() == 0


def test_rate_unknown_figure_is_a_bad_record(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    """With ``figures``, a candidate whose pair_id is not there would be judged blind: raise
    naming its line before anything is sent, or skip it counted as ``unknown_figure``."""
    figs = tmp_path / "figures.jsonl"
    rows = [{"pair_id": f"p{i}", "fig_caption": f"FIGCAPTION {i}"} for i in range(2)]
    figs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cands = _bare_cands(tmp_path / "c.jsonl", ["p0", "p9", "p1"])
    with pytest.raises(BadRecordError, match=r"c.jsonl:2: .*'p9'.*figures.jsonl") as info:
        _rate(api, cands, tmp_path / "out", mlstore, figures=figs)
    assert info.value.category == "unknown_figure" and api.count() == 0
    m = _rate(api, cands, tmp_path / "out", mlstore, figures=figs, on_bad_record="skip")
    assert m["counts"]["candidates"] == 2 and m["counts"]["no_caption"] == 0
    assert m["records"]["candidates"]["skipped_by_reason"] == {"unknown_figure": 1}
    assert sorted("FIGCAPTION 1" in _user_text(b) for b in api.seen) == [False, True]
    rated = [json.loads(x)["candidate_id"] for x in (tmp_path / "out" / "ratings.jsonl").open()]
    assert rated == ["c0", "c2"]


def test_rate_refuses_a_repeated_figure(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    """Captions are joined on pair_id: a figure repeated in the figures file is refused naming
    its line (or skipped and counted), never a silent last-one-wins caption."""
    figs = tmp_path / "figures.jsonl"
    rows = [{"pair_id": "p0", "fig_caption": "FIRST"}, {"pair_id": "p0", "fig_caption": "SECOND"}]
    figs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cands = _bare_cands(tmp_path / "c.jsonl", ["p0"])
    with pytest.raises(BadRecordError, match=r"figures.jsonl:2: .*line 2 repeats line 1"):
        _rate(api, cands, tmp_path / "out", mlstore, figures=figs)
    assert api.count() == 0
    m = _rate(api, cands, tmp_path / "out", mlstore, figures=figs, on_bad_record="skip")
    assert m["records"]["figures"]["skipped_by_reason"] == {"duplicate:pair_id": 1}
    assert ["FIRST" in _user_text(b) for b in api.seen] == [True]


# ----------------------------------------------------------------------------- preference ids


def test_rate_refuses_or_counts_duplicate_preference_ids(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    """Pair scores are kept by id: a repeated id would overwrite the first pair's scores."""
    prefs = tmp_path / "prefs.jsonl"
    rows = [
        {"id": "a", "image": "x.jpg", "question": "q?", "preferred": "P1", "rejected": "R1"},
        {"id": "b", "image": "x.jpg", "question": "q?", "preferred": "P2", "rejected": "R2"},
        {"id": "a", "image": "x.jpg", "question": "q?", "preferred": "P3", "rejected": "R3"},
    ]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cands = _cands(tmp_path / "c.jsonl", ["x"])
    with pytest.raises(BadRecordError, match=r"prefs.jsonl:3: .*line 3 repeats line 1"):
        _rate(api, cands, tmp_path / "out", mlstore, preferences=prefs)
    assert api.count() == 0
    m = _rate(api, cands, tmp_path / "out", mlstore, preferences=prefs, on_bad_record="skip")
    rec = m["records"]["preferences"]
    assert rec["kept"] == 2 and rec["skipped_by_reason"] == {"duplicate:id": 1}
    assert m["alignment"]["pairs"] == 2 and api.count("P3") == 0
    scores = [json.loads(x) for x in (tmp_path / "out" / "preference_scores.jsonl").open()]
    assert [s["id"] for s in scores] == ["a", "b"]


# ----------------------------------------------------------------------------- circuit breaker


def test_rate_stops_on_spent_quota_and_resumes(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    """A 429 ``insufficient_quota`` stops the run (it does not "finish" with every item failed);
    what was answered stays journaled and the rerun pays only for the rest."""
    cands = _cands(tmp_path / "c.jsonl", ["a", "b", "QUOTA", "d", "e"])
    api.arm("QUOTA", "quota")
    out = tmp_path / "out"
    with pytest.raises(ApiAccessError, match="insufficient_quota"):
        _rate(api, cands, out, mlstore, client_settings={"concurrency": 1})
    assert api.count() == 3 and not (out / "manifest.json").exists()
    assert not (out / "ratings.jsonl").exists()
    assert len((out / "journal.jsonl").read_text().splitlines()) == 2
    api.reset()
    m = _rate(api, cands, out, mlstore, client_settings={"concurrency": 1})
    assert api.count() == 3 and m["counts"]["rated"] == 5 and m["ledger"]["first"]["cached"] == 2
