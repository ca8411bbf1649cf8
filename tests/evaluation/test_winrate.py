"""``win_rate``: verdict parsing, position-swap combination, hand-computed rates, the bootstrap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from biomedvital.data.report import BadRecordError
from biomedvital.evaluation.winrate import (
    combine,
    model_outcome,
    parse_verdict,
    rates_with_ci,
    win_rate,
)


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pair(qid: Any, ab: str, ba: str) -> list[dict[str, Any]]:
    return [
        {"question_id": qid, "order": "ab", "verdict": ab},
        {"question_id": qid, "order": "ba", "verdict": ba},
    ]


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Assistant A is more accurate. [[A]]", "A"),
        ("[[B]]", "B"),
        ("They are equally good: [[C]]", "C"),
        ("verdict: [[ tie ]]", "C"),
        ("[[ a ]] lower case and spaces", "A"),
        ("Output [[A]], [[B]] or [[C]]. ... Final verdict: [[B]]", "B"),  # the last one wins
        ("A is better", None),
        ("[A]", None),
        ("[[D]]", None),
        ("", None),
    ],
)
def test_parse_verdict(text: str, label: str | None) -> None:
    assert parse_verdict(text) == label


def test_model_outcome_follows_the_model_position() -> None:
    assert [model_outcome(v, "ab") for v in "ABC"] == ["win", "loss", "tie"]
    assert [model_outcome(v, "ba") for v in "ABC"] == ["loss", "win", "tie"]


@pytest.mark.parametrize(
    ("first", "second", "summed", "strict"),
    [
        ("win", "win", "win", "win"),
        ("loss", "loss", "loss", "loss"),
        ("tie", "tie", "tie", "tie"),
        ("win", "loss", "tie", "tie"),  # position-biased split
        ("loss", "win", "tie", "tie"),
        ("win", "tie", "win", "tie"),
        ("tie", "win", "win", "tie"),
        ("loss", "tie", "loss", "tie"),
    ],
)
def test_combine(first: str, second: str, summed: str, strict: str) -> None:
    assert combine(first, second, "sum") == summed  # type: ignore[arg-type]
    assert combine(first, second, "strict") == strict  # type: ignore[arg-type]


def _hand_file(tmp_path: Path) -> Path:
    rows = [
        *_pair(1, "[[A]]", "[[B]]"),  # model wins in both positions -> win
        *_pair(2, "[[B]]", "[[A]]"),  # loses in both -> loss
        *_pair(3, "[[A]]", "[[A]]"),  # always picks position A -> split -> tie
        *_pair(4, "[[C]]", "[[B]]"),  # tie + win -> win (sum) / tie (strict)
        *_pair(5, "I cannot decide.", "[[B]]"),  # unparseable -> counted failure
        *_pair("6", "Choose [[A]] or [[B]]. Final: [[C]]", "[[tie]]"),  # tie + tie -> tie
    ]
    return _write(tmp_path / "v.jsonl", rows)


def test_hand_computed_rates(tmp_path: Path) -> None:
    path = _hand_file(tmp_path)
    res = win_rate(path, out=tmp_path / "o" / "wr.json", n_boot=200)
    # sum rule: win, loss, tie, win, tie -> n 5, 2 wins, 2 ties, 1 loss
    assert (res["n"], res["wins"], res["ties"], res["losses"]) == (5, 2, 2, 1)
    assert res["n_questions"] == 6
    assert (res["n_failed"], res["failed_question_ids"]) == (1, ["5"])
    assert res["n_multi_marker"] == 1
    assert res["win_rate_half_ties"] == pytest.approx((2 + 0.5 * 2) / 5 * 100)
    assert res["win_rate_excl_ties"] == pytest.approx(2 / 3 * 100)
    assert res["position_consistency"] == pytest.approx(3 / 5 * 100)  # questions 1, 2, 6 agree
    assert res["by_order"]["ab"] == {"win": 2, "tie": 2, "loss": 1, "failed": 1}
    assert res["by_order"]["ba"] == {"win": 3, "tie": 1, "loss": 2, "failed": 0}
    assert json.loads((tmp_path / "o" / "wr.json").read_text()) == res

    strict = win_rate(path, n_boot=200, rule="strict")
    assert (strict["wins"], strict["ties"], strict["losses"]) == (1, 3, 1)
    assert strict["win_rate_half_ties"] == pytest.approx(50.0)
    assert strict["win_rate_excl_ties"] == pytest.approx(50.0)


def test_bootstrap_contains_estimate_narrows_and_is_seeded() -> None:
    widths = []
    for scale in (4, 40, 400):  # same 60 % / 20 % / 20 % mix, growing n
        outcomes = ["win"] * 3 * scale + ["tie"] * scale + ["loss"] * scale
        res = rates_with_ci(outcomes, n_boot=1000, seed=0)  # type: ignore[arg-type]
        for key in ("win_rate_half_ties", "win_rate_excl_ties"):
            lo, hi = res[f"{key}_ci"]
            assert lo <= res[key] <= hi
        lo, hi = res["win_rate_half_ties_ci"]
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # n = 2000, p = 0.7 (wins + half ties): the normal interval is ±1.96·sqrt(p(1-p)/n) minus
    # the tie variance; the bootstrap should be within 15 % of the exact multinomial s.d.
    var = (0.6 * 1 + 0.2 * 0.25) - 0.7**2  # E[x²] − E[x]² with x ∈ {1, ½, 0}
    expected = 2 * 1.96 * (var / 2000) ** 0.5 * 100
    assert widths[2] == pytest.approx(expected, rel=0.15)

    outcomes = ["win", "tie", "loss", "win", "win"]
    a = rates_with_ci(outcomes, n_boot=300, seed=7)  # type: ignore[arg-type]
    b = rates_with_ci(outcomes, n_boot=300, seed=7)  # type: ignore[arg-type]
    c = rates_with_ci(outcomes, n_boot=300, seed=8)  # type: ignore[arg-type]
    assert a == b
    assert a["win_rate_half_ties"] == c["win_rate_half_ties"]
    assert (a["n_boot"], a["seed"]) == (300, 7)


def test_undefined_rates_are_none() -> None:
    ties = rates_with_ci(["tie", "tie"], n_boot=50)  # type: ignore[list-item]
    assert ties["win_rate_half_ties"] == 50.0
    assert ties["win_rate_excl_ties"] is None and ties["win_rate_excl_ties_ci"] is None
    assert ties["n_boot_all_ties"] == 50
    empty = rates_with_ci([], n_boot=50)
    assert empty["n"] == 0 and empty["win_rate_half_ties"] is None
    with pytest.raises(ValueError, match="n_boot"):
        rates_with_ci(["win"], n_boot=0)  # type: ignore[list-item]


def test_all_failed_is_counted_not_tied(tmp_path: Path) -> None:
    path = _write(tmp_path / "v.jsonl", [*_pair(1, "A wins", "B wins"), *_pair(2, "??", "[[A]]")])
    res = win_rate(path, n_boot=10)
    assert (res["n"], res["ties"], res["n_failed"]) == (0, 0, 2)
    assert res["win_rate_half_ties"] is None and res["position_consistency"] is None


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            [*_pair(1, "[[A]]", "[[B]]"), {"question_id": "1", "order": "ab", "verdict": "[[B]]"}],
            r"v\.jsonl:3: field 'question_id': duplicate verdict for question_id '1' order 'ab'",
        ),
        ([{"question_id": 1, "order": "ab", "verdict": "[[A]]"}], r"lack one of the two orders"),
        ([{"question_id": 1, "order": "AB", "verdict": "[[A]]"}], r"v\.jsonl:1: field 'order'"),
        ([{"question_id": 1, "order": "ab"}], r"v\.jsonl:1: field 'verdict': missing"),
        ([{"question_id": 1, "order": "ab", "verdict": 3}], r"field 'verdict': expected a str"),
        ([{"question_id": True, "order": "ab", "verdict": ""}], r"field 'question_id'"),
        ([], "no verdicts"),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, rows: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(BadRecordError, match=match):
        win_rate(_write(tmp_path / "v.jsonl", rows), n_boot=10)


def test_logs_to_mlflow_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    store = str(tmp_path / "mlruns")
    win_rate(_hand_file(tmp_path), n_boot=50, store=store)
    client = MlflowClient(tracking_uri=tracking_uri(store))
    (run,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["win_rate/win_rate_half_ties"] == pytest.approx(60.0)
    assert run.data.metrics["win_rate/n_failed"] == 1
    assert run.data.params["rule"] == "sum"
    # each order and each rule too: ab = win, loss, win, tie, tie of 5 (question 5 failed in ab)
    assert run.data.metrics["win_rate/ab/win_rate_half_ties"] == pytest.approx(60.0)
    assert run.data.metrics["win_rate/strict/win_rate_half_ties"] == pytest.approx(50.0)
    assert run.data.metrics["win_rate/ba/n"] == 6


def test_identical_answer_ties_do_not_count_as_judge_consistency(tmp_path: Path) -> None:
    # The judge picks position A every time: zero consistency, whatever the ties pairwise adds
    # for identical answers (never shown to the judge). Those ties still count in the rates.
    rows = [r for q in range(4) for r in _pair(q, "[[A]]", "[[A]]")]
    rows += [
        {"question_id": q, "order": o, "verdict": "[[C]]", "identical": True}
        for q in range(4, 8)
        for o in ("ab", "ba")
    ]
    # flagged in one order only: not an identical pair, judged as usual (a consistent tie)
    rows += [
        {"question_id": 8, "order": "ab", "verdict": "[[C]]", "identical": True},
        {"question_id": 8, "order": "ba", "verdict": "[[C]]"},
    ]
    res = win_rate(_write(tmp_path / "v.jsonl", rows), n_boot=20)
    assert (res["n"], res["wins"], res["ties"], res["losses"]) == (9, 0, 9, 0)
    assert res["n_identical"] == 4
    assert res["position_consistency"] == pytest.approx(1 / 5 * 100)
    assert res["by_order"]["ab"] == {"win": 4, "tie": 1, "loss": 0, "failed": 0}
    assert res["by_order"]["ba"] == {"win": 0, "tie": 1, "loss": 4, "failed": 0}


def test_rates_per_category(tmp_path: Path) -> None:
    def pair(qid: int, ab: str, ba: str, cat: str) -> list[dict[str, Any]]:
        return [{**r, "category": cat} for r in _pair(qid, ab, ba)]

    rows = [
        *pair(1, "[[A]]", "[[B]]", "closed"),  # win
        *pair(2, "[[A]]", "[[B]]", "closed"),  # win
        *pair(3, "[[B]]", "[[A]]", "closed"),  # loss
        *pair(4, "[[C]]", "[[C]]", "open"),  # tie
        *pair(5, "??", "[[A]]", "open"),  # failed
        *pair(6, "[[B]]", "[[A]]", "open"),  # loss
    ]
    res = win_rate(_write(tmp_path / "v.jsonl", rows), n_boot=50)
    closed, opened = res["by_category"]["closed"], res["by_category"]["open"]
    assert list(res["by_category"]) == ["closed", "open"]
    assert (closed["n"], closed["wins"], closed["ties"], closed["n_failed"]) == (3, 2, 0, 0)
    assert closed["win_rate_half_ties"] == pytest.approx(2 / 3 * 100)
    assert (opened["n"], opened["wins"], opened["ties"], opened["n_failed"]) == (2, 0, 1, 1)
    assert opened["win_rate_half_ties"] == pytest.approx(25.0)
    assert opened["win_rate_excl_ties"] == pytest.approx(0.0)
    assert res["n"] == 5 and "by_category" not in win_rate(_hand_file(tmp_path), n_boot=10)

    rows[1]["category"] = "open"  # the two orders of question 1 disagree
    with pytest.raises(BadRecordError, match=r"v2\.jsonl:2: field 'category'.*differs"):
        win_rate(_write(tmp_path / "v2.jsonl", rows), n_boot=10)


def _fake_judge(qid: int, outcomes: tuple[str, str]) -> list[dict[str, Any]]:
    """The verdicts a judge gives when the model's outcome is ``outcomes`` = (ab, ba):
    the model sits at A in order ab and at B in order ba; ``failed``: a reply without a marker."""
    label = {"ab": {"win": "A", "loss": "B"}, "ba": {"win": "B", "loss": "A"}}
    texts = []
    for order, outcome in zip(("ab", "ba"), outcomes, strict=True):
        marker = "C" if outcome == "tie" else label[order].get(outcome)
        texts.append(f"Compared with the reference: [[{marker}]]" if marker else "Hard to say.")
    return _pair(qid, *texts)


def test_each_order_alone_and_both_rules_under_both_tie_conventions(tmp_path: Path) -> None:
    """Per-order tallies (the released script's one-order count is ``single_order.ab``) and the
    combined ``sum`` and ``strict`` results, each with both rates, hand-computed."""
    judged = [
        ("win", "win"),
        ("win", "win"),
        ("win", "tie"),
        ("win", "loss"),  # the judge prefers position A
        ("tie", "tie"),
        ("loss", "loss"),
        ("loss", "win"),  # the judge prefers position B
        ("failed", "win"),  # one order unparsed: a failure of the pair, counted in ba alone
    ]
    rows = [r for q, o in enumerate(judged) for r in _fake_judge(q, o)]
    rows += [
        {"question_id": 8, "order": o, "verdict": "[[C]]", "identical": True} for o in ("ab", "ba")
    ]
    res = win_rate(_write(tmp_path / "v.jsonl", rows), n_boot=100, rule="strict")

    def tally(part: dict[str, Any]) -> tuple[float, ...]:
        return (part["n"], part["wins"], part["ties"], part["losses"])

    ab, ba = res["single_order"]["ab"], res["single_order"]["ba"]
    assert tally(ab) == (8, 4, 2, 2) and ab["n_failed"] == 1  # the identical pair: a tie
    assert ab["win_rate_half_ties"] == pytest.approx((4 + 0.5 * 2) / 8 * 100)
    assert ab["win_rate_excl_ties"] == pytest.approx(4 / 6 * 100)
    assert tally(ba) == (9, 4, 3, 2) and ba["n_failed"] == 0
    assert ba["win_rate_half_ties"] == pytest.approx((4 + 0.5 * 3) / 9 * 100)
    assert ba["win_rate_excl_ties"] == pytest.approx(4 / 6 * 100)
    summed, strict = res["by_rule"]["sum"], res["by_rule"]["strict"]
    assert tally(summed) == (8, 3, 4, 1)
    assert summed["win_rate_half_ties"] == pytest.approx((3 + 0.5 * 4) / 8 * 100)
    assert summed["win_rate_excl_ties"] == pytest.approx(3 / 4 * 100)
    assert tally(strict) == (8, 2, 5, 1)
    assert strict["win_rate_half_ties"] == pytest.approx((2 + 0.5 * 5) / 8 * 100)
    assert strict["win_rate_excl_ties"] == pytest.approx(2 / 3 * 100)
    for part in (ab, ba, summed, strict):
        low, high = part["win_rate_half_ties_ci"]
        assert low <= part["win_rate_half_ties"] <= high
    # ``rule`` picks the headline; the other rule is reported all the same
    assert {k: res[k] for k in strict} == strict
    assert win_rate(tmp_path / "v.jsonl", n_boot=100)["by_rule"] == res["by_rule"]
    with pytest.raises(ValueError, match="rule must be 'sum' or 'strict'"):
        win_rate(tmp_path / "v.jsonl", rule="majority")  # type: ignore[arg-type]


def test_the_pairwise_prompt_makes_a_tie_the_last_resort() -> None:
    """The judge is shown the question, the ground truth and both answers; the task asks for A
    or B first and allows a tie only as the last resort."""
    from biomedvital.evaluation.pairwise import PAIRWISE_TASK, pairwise_messages

    task = " ".join(PAIRWISE_TASK.split())
    assert "A or B, in double square brackets" in task
    assert "A tie is the last resort" in task
    assert task.index("A or B") < task.index("last resort") < task.index("give C")
    (_, user) = pairwise_messages("Is it the liver?", "yes", "Yes.", "No.")
    body = user["content"]
    assert "[Reference answer]\nyes" in body and "[Assistant A]\nYes." in body
    assert body.endswith(PAIRWISE_TASK)
