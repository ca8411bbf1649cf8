"""Record models against the real released layouts and the validation rules they enforce."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from biomedvital.data.jsonio import check_unique, write_jsonl
from biomedvital.data.records import (
    AnswerMarks,
    Candidate,
    Demonstration,
    MarkedAnswer,
    Mention,
    Preference,
    Rating,
    SourceFigure,
    Turn,
    mentions_text,
    read_demonstrations,
    read_figures,
    read_preferences,
    strip_image_token,
)
from biomedvital.data.report import BadRecordError, RecordReport

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
FIGURES = SHARED / "llava-med" / "llava_med_eval_qa50_fig_captions.json"
DEMOS = SHARED / "biomed-vital" / "doctor_few_shot_examples.json"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared data not available: {path}")
    return path


def _fig(pair_id: str = "1_F1", **kw: object) -> dict:
    return {
        "pair_id": pair_id,
        "fig_caption": "Axial CT of the head.",
        "fig_label": "Figure 1",
        "in_text_mention": [{"tokens": "CT showed a bleed ( Figure 1 ) .", "entities": []}],
        "domain": {"ct_scan": True, "mri": False},
        "pmid": 123,
        **kw,
    }


def _conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in turns]


# ----------------------------------------------------------------------------- real files


def test_real_benchmark_figures_parse() -> None:
    figs = read_figures(_need(FIGURES))
    assert len(figs) == 50
    assert len({f.pair_id for f in figs}) == 50
    raw = json.loads(FIGURES.read_text())
    assert [f.pair_id for f in figs] == [r["pair_id"] for lst in raw.values() for r in lst]
    # Four figures have "in_text_mention": null in the release; they load as no mentions.
    assert sum(1 for f in figs if not f.in_text_mention) == 4
    assert all(f.model_extra and f.model_extra["graphic_ref"] for f in figs)  # extras kept
    first = figs[0]
    assert first.pair_id == "21139713_F0003" and first.pmid == "21139713"
    assert first.mentions_text().startswith("Of the 16 patients")
    assert first.modalities() == ["chest_xray"]


def test_real_demonstrations_parse_with_modality_counts() -> None:
    demos = read_demonstrations(_need(DEMOS))
    assert len(demos) == 58
    assert demos[0].id == "1" and demos[0].imgs == "28104940_F2.jpg"
    counts = Counter(tuple(d.modalities()) for d in demos)
    assert counts == {
        ("ct_scan",): 27,
        ("mri",): 15,
        ("chest_xray",): 11,
        ("gross",): 2,
        ("histology",): 2,
        ("chest_xray", "ct_scan"): 1,
    }
    both = [d.id for d in demos if len(d.modalities()) > 1]
    assert both == ["26"]
    q, a = demos[0].qa_pairs()[0]
    assert q == "What modality is used to take this image?" and "computed tomography" in a


LLAVA_MED_DEMOS = SHARED / "llava-med" / "instruct_few_shot_examples.json"


def test_llava_med_demonstrations_read_and_prompt() -> None:
    """LLaVA-Med's own demonstrations: no ``id``, no ``imgs``, mentions as plain sentences."""
    from biomedvital.data.records import SourceFigure
    from biomedvital.generation.prompts import build_messages, select_demonstrations

    demos = read_demonstrations(_need(LLAVA_MED_DEMOS))
    assert len(demos) == 8 and demos[0].id == "18627621_F2" and demos[0].imgs is None
    assert demos[0].mentions_text().startswith("His respiratory status continued to worsen")
    assert len({d.id for d in demos}) == 8
    fig = SourceFigure.model_validate(
        {"pair_id": "x", "fig_caption": "Chest CT.", "domain": {"ct_scan": True}}
    )
    chosen = select_demonstrations(demos, 3, 0, "x")
    msgs = build_messages(fig, chosen)
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    for demo, user in zip(chosen, msgs[1:-1:2], strict=True):  # each demo's text is in its turn
        assert demo.mentions_text()[:40] in json.dumps(user["content"], ensure_ascii=False)


def test_plain_sentence_mentions_and_pair_id_as_demonstration_id() -> None:
    demo = Demonstration.model_validate(
        {
            "pair_id": "p1",
            "fig_caption": "c",
            "in_text_mention": ["First sentence.", " ", "Second one."],
            "conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a."}],
        }
    )
    assert demo.id == "p1" and demo.imgs is None
    assert demo.mentions_text() == "First sentence. Second one."
    one = Demonstration.model_validate(
        {"id": "d", "pair_id": "p", "fig_caption": "c", "in_text_mention": "Only one.",
         "conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a."}]}
    )  # fmt: skip
    assert one.id == "d" and one.mentions_text() == "Only one."


def test_real_demonstrations_round_trip_losslessly() -> None:
    raw = json.loads(_need(DEMOS).read_text())
    for rec, demo in zip(raw, read_demonstrations(DEMOS), strict=True):
        dumped = demo.model_dump(by_alias=True, exclude_unset=True)
        assert dumped == {**rec, "id": str(rec["id"])}


# ----------------------------------------------------------------------------- figures


def test_figures_from_jsonl_array_and_domain_dict_agree(tmp_path: Path) -> None:
    recs = [_fig("1_F1"), _fig("2_F1", fig_id="F1", in_text_mention=None)]
    jsonl = tmp_path / "f.jsonl"
    write_jsonl(jsonl, recs)
    arr = tmp_path / "f.json"
    arr.write_text(json.dumps(recs))
    by_domain = tmp_path / "d.json"
    by_domain.write_text(json.dumps({"ct_scan": recs[:1], "mri": recs[1:]}, indent=1))
    compact = tmp_path / "c.json"
    compact.write_text(json.dumps({"ct_scan": recs}))
    loaded = [read_figures(p) for p in (jsonl, arr, by_domain, compact)]
    assert loaded[0] == loaded[1] == loaded[2] == loaded[3]
    assert loaded[0][0].pmid == "123"
    assert loaded[0][1].in_text_mention == []
    assert loaded[0][1].model_dump()["fig_id"] == "F1"


def test_domain_dict_errors_name_record_and_skip(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"ct_scan": [_fig("1")], "mri": [_fig("2"), {"fig_caption": "x"}]}))
    with pytest.raises(BadRecordError) as info:
        read_figures(path)
    assert str(info.value) == f"{path}: record 3: field 'pair_id': Field required"
    report = RecordReport()
    assert len(read_figures(path, on_bad="skip", report=report)) == 2
    assert report.as_dict()["skipped_by_reason"] == {"missing:pair_id": 1}
    assert report.n_kept == 2


def test_unknown_json_object_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"figures": 3}, indent=1))
    with pytest.raises(BadRecordError, match="domain names"):
        read_figures(path)


def test_figure_requires_caption() -> None:
    with pytest.raises(ValidationError, match="fig_caption"):
        SourceFigure.model_validate({"pair_id": "x"})


# ----------------------------------------------------------------------------- turns / candidates


def test_turn_alias_in_and_out() -> None:
    t = Turn.model_validate({"from": "gpt", "value": "x"})
    assert t.from_ == "gpt"
    assert Turn(from_="human", value="q").model_dump() == {"from": "human", "value": "q"}
    with pytest.raises(ValidationError):
        Turn.model_validate({"from": "assistant", "value": "x"})


def test_candidate_helpers_strip_image_token() -> None:
    c = Candidate.model_validate(
        {
            "id": 7,
            "image": "a.jpg",
            "conversations": _conv(
                ("human", "<image>\n What organ is shown?"),
                ("gpt", "The liver."),
                ("human", "Any lesion?\n<image>"),
                ("gpt", "A cyst."),
            ),
            "model_id": "gpt-4v",
        }
    )
    assert c.id == "7"
    assert c.first_qa() == ("What organ is shown?", "The liver.")
    assert c.conversation_text() == (
        "Question: What organ is shown? Answer: The liver. Question: Any lesion? Answer: A cyst."
    )
    assert c.model_dump(by_alias=True)["model_id"] == "gpt-4v"
    assert strip_image_token("Look at <image> here") == "Look at here"


def test_candidate_first_qa_skips_incomplete_pairs() -> None:
    c = Candidate(
        id="x",
        image="a.jpg",
        conversations=[
            Turn(from_="human", value="<image>"),
            Turn(from_="gpt", value="Hello."),
            Turn(from_="human", value="Q?"),
            Turn(from_="gpt", value="A."),
        ],
    )
    assert c.first_qa() == ("Q?", "A.")


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([], "candidate has no turns"),
        ([("gpt", "hi"), ("human", "q")], "must start with a human turn"),
        ([("human", "q"), ("human", "q2")], "turn 2 is from 'human', expected 'gpt'"),
        ([("human", "q"), ("gpt", "a"), ("human", "q2")], "unanswered question"),
        ([("human", "q"), ("gpt", "  ")], "candidate has no question-answer turn"),
        ([("human", "<image>"), ("gpt", "a")], "candidate has no question-answer turn"),
    ],
)
def test_candidate_conversation_rules(turns: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        Candidate.model_validate({"id": "c", "image": "a.jpg", "conversations": _conv(*turns)})
    assert info.value.errors()[0]["loc"] == ("conversations",)


# ----------------------------------------------------------------------------- preferences


def test_preference_normalises_mentions_and_validates() -> None:
    p = Preference.model_validate(
        {
            "id": 3,
            "image": "a.jpg",
            "question": "What is shown?",
            "preferred": "A fracture.",
            "rejected": "Nothing.",
            "in_text_mention": [{"tokens": "First ."}, {"tokens": " Second . ", "entities": []}],
        }
    )
    assert p.in_text_mention == "First . Second ."
    assert p.mentions_text() == "First . Second ."
    assert mentions_text([Mention(tokens="a"), Mention(tokens="b")]) == "a b"
    assert mentions_text(None) == ""
    with pytest.raises(ValidationError, match="identical"):
        Preference(id="1", image="a", question="q", preferred="Same ", rejected="Same")
    with pytest.raises(ValidationError, match="question"):
        Preference(id="1", image="a", question=" ", preferred="a", rejected="b")
    with pytest.raises(ValidationError, match="rejected"):
        Preference(id="1", image="a", question="q", preferred="a", rejected="")


def _marks(marks: list[bool], **kw: object) -> dict:
    return {
        "id": "m1",
        "image": "a.jpg",
        "question": "Where is the lesion?",
        "answers": [{"text": f"answer {i}", "acceptable": ok} for i, ok in enumerate(marks)],
        "annotator": "dr_a",
        **kw,
    }


def test_answer_marks_to_pairs() -> None:
    m = AnswerMarks.model_validate(_marks([True, False, True, False]))
    pairs = m.to_pairs()
    assert [p.id for p in pairs] == ["m1#0>1", "m1#0>3", "m1#2>1", "m1#2>3"]
    assert pairs[0].preferred == "answer 0" and pairs[0].rejected == "answer 1"
    assert all(p.annotator == "dr_a" and p.question == m.question for p in pairs)
    assert AnswerMarks.model_validate(_marks([True, True])).to_pairs() == []
    assert AnswerMarks.model_validate(_marks([False, False, False])).to_pairs() == []


def test_answer_marks_refuses_contradictory_marks() -> None:
    answers = [
        MarkedAnswer(text="Same answer", acceptable=True),
        MarkedAnswer(text="Same answer ", acceptable=False),
    ]
    with pytest.raises(ValidationError, match="both acceptable and not"):
        AnswerMarks(id="x", image="a", question="q", answers=answers)


def test_read_preferences_mixes_pairs_and_marks(tmp_path: Path) -> None:
    pair = {"id": "p1", "image": "a.jpg", "question": "q", "preferred": "a", "rejected": "b"}
    path = tmp_path / "prefs.jsonl"
    lines = [
        json.dumps(pair),
        json.dumps(_marks([True, False, False])),
        json.dumps(_marks([True, True], id="m2")),
        json.dumps({**pair, "id": "p2", "rejected": "a"}),
        "",
        json.dumps(_marks([False, False], id="m3")),
    ]
    path.write_text("\n".join(lines) + "\n")

    report = RecordReport()
    prefs = read_preferences(path, on_bad="skip", report=report)
    assert [p.id for p in prefs] == ["p1", "m1#0>1", "m1#0>2"]
    d = report.as_dict()
    assert d["kept"] == 2
    assert d["skipped_by_reason"] == {"invalid_record": 1, "no_contrast": 2}
    assert any(e.startswith(f"{path}:3: field 'answers':") for e in d["examples"])

    with pytest.raises(BadRecordError) as info:
        read_preferences(path)
    assert info.value.line == 4 and "identical" in str(info.value)


def test_duplicate_preferences_name_the_line_and_keep_counts_exact(tmp_path: Path) -> None:
    """A repeated marks record gives 2 duplicate pairs; its one line leaves the kept count once."""
    pair = {"id": "p1", "image": "a.jpg", "question": "q", "preferred": "a", "rejected": "b"}
    path = tmp_path / "prefs.jsonl"
    lines = [json.dumps(_marks([True, False, False])), "", json.dumps(pair)]
    lines += [json.dumps(_marks([True, False, False])), json.dumps(pair)]
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(BadRecordError) as info:
        check_unique(read_preferences(path), "id", path)
    assert str(info.value).startswith(f"{path}:4: field 'id': duplicate id 'm1#0>1'")
    assert "(line 4 repeats line 1)" in str(info.value)

    report = RecordReport()
    prefs = read_preferences(path, on_bad="skip", report=report)
    assert report.n_kept == 4
    prefs = check_unique(prefs, "id", path, on_bad="skip", report=report)
    assert [p.id for p in prefs] == ["m1#0>1", "m1#0>2", "p1"]
    assert report.n_kept == 2  # lines 1 and 3; lines 4 and 5 gave only duplicates
    assert report.skipped_by_reason == {"duplicate:id": 3}


def test_duplicate_figures_in_the_domain_layout_name_the_record(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"ct_scan": [_fig("1")], "mri": [_fig("2"), _fig("1")]}))
    report = RecordReport()
    figs = read_figures(path, on_bad="skip", report=report)
    kept = check_unique(figs, "pair_id", path, on_bad="skip", report=report)
    assert len(kept) == report.n_kept == 2
    assert report.examples == [
        f"{path}: record 3: field 'pair_id': duplicate pair_id '1' (record 3 repeats record 1)"
    ]


def test_read_preferences_logs_no_contrast_without_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([_marks([True, True]), _marks([True, False], id="m2")]))
    with caplog.at_level(logging.WARNING):
        prefs = read_preferences(path)
    assert [p.id for p in prefs] == ["m2#0>1"]
    assert "1 answer-marks records gave no preference pair" in caplog.text


# ----------------------------------------------------------------------------- ratings


@pytest.mark.parametrize(("score", "expected"), [(0, 0.0), (10, 10.0), ("7.5", 7.5), (" 3 ", 3.0)])
def test_rating_accepts_numbers(score: object, expected: float) -> None:
    r = Rating.model_validate({"candidate_id": 12, "score": score, "judge": "gpt-4"})
    assert r.candidate_id == "12" and r.score == expected


@pytest.mark.parametrize(
    ("score", "message"),
    [
        (12.5, "must be between 0 and 10 (got 12.5)"),
        (-1, "must be between 0 and 10"),
        (float("nan"), "must be between 0 and 10 (got nan)"),
        (float("inf"), "must be between 0 and 10"),
        ("seven", "must be a number (got 'seven')"),
        (True, "must be a number"),
        ("nan", "must be between 0 and 10"),
    ],
)
def test_rating_rejects_bad_scores(score: object, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        Rating.model_validate({"candidate_id": "c", "score": score, "judge": "j"})
    err = info.value.errors()[0]
    assert err["loc"] == ("score",)
    assert message in err["msg"]


def test_demonstration_requires_conversations() -> None:
    with pytest.raises(ValidationError, match="conversations"):
        Demonstration.model_validate({"id": 1, "imgs": "a.jpg", "fig_caption": "c"})
