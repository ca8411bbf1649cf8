"""LLaVA-Med's VQA normalisation and metrics: hand-worked golden values, one per quirk."""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch

from biomedvital.evaluation.metrics import (
    BLEU_WEIGHTS,
    VQAClosedAccuracy,
    VQAOpenMetrics,
    bleu,
    closed_hit,
    exact_match_llava,
    normalize_answer,
    normalize_word,
    normalized_exact_match,
    open_hit,
    open_item_scores,
    sentence_bleu,
    token_f1,
)

# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a character with no space next to it anywhere in the text becomes a space...
        ("left-sided", "left sided"),
        ("(yes)", "yes"),
        ("t1/t2", "t1 t2"),
        # ...but one that has a space next to it somewhere is deleted everywhere, even where it
        # joins two words (the test reads the original text, not the partly cleaned one)
        ("t1/t2 / flair", "t1t2 flair"),
        ("is it (yes)or(no)", "is it yes orno"),  # "(" has a space before it, ")" never does
        ("x-ray, left-sided", "x ray left sided"),
        ("x-ray ,left-sided", "x ray left sided"),
        # a digit-comma-digit anywhere deletes every listed character, hyphens included
        ("1,000 cases-left", "1000 casesleft"),
        ("grade 1,2 / x-ray", "grade 12 xray"),
        # ':' and "'" are not in the list
        ("human: it's ok", "human: it's ok"),
        # periods go unless a digit follows
        ("3.5 cm.", "3.5 cm"),
        ("e.g. lung", "eg lung"),
        (".5", ".5"),
        # number words become digits, articles go, contractions get their apostrophe
        ("two lesions", "2 lesions"),
        ("none", "0"),
        ("the one on the left", "1 on left"),
        ("an a the", ""),
        ("dont know, isnt it", "don't know isn't it"),
        ("somebody'd", "somebodyd"),
        # the table's capitalised keys ("Im", "Ive") never match lower-cased text
        ("im here", "im here"),
        ("  multiple   spaces\tand\nlines ", "multiple spaces and lines"),
        ("?!", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_normalize_lowercases_and_stringifies_ints() -> None:
    assert normalize_answer("The LEFT Lung") == "left lung"
    assert normalize_answer(12) == "12"


def test_only_the_first_32_periods_are_removed() -> None:
    text = "x." * 40
    once = normalize_answer(text)
    assert once == "x" * 32 + "x." * 8
    assert normalize_word(once) == "x" * 40  # a second pass removes the rest


def test_second_pass_is_what_separates_f1_from_bleu() -> None:
    # f1/recall/exact re-normalise (33rd period gone); BLEU uses the once-normalised words
    pred, ref = "x." * 33, "x" * 33
    assert token_f1(pred, ref) == (1.0, 1.0, 1.0)
    assert exact_match_llava(pred, ref) == 1.0
    assert bleu(pred, ref, (1.0,)) == 0.0


# ----------------------------------------------------------------------------- open questions


def test_token_f1_golden() -> None:
    # "the" is dropped: pred {left, lung}, ref {left, lung, base} -> tp 2, fp 0, fn 1
    f1, p, r = token_f1("Left lung.", "the left lung base")
    assert (p, r) == (1.0, pytest.approx(2 / 3))
    assert f1 == pytest.approx(0.8)
    # 15 prediction words, one shared with a 3-word reference (a real VQA-RAD item, qid 263)
    f1, p, r = token_f1(
        "The abnormality is located in the left temporal region of the brain, which is a part "
        "of the cerebral hemisphere.",
        "right temporal lobe",
    )
    assert (p, r) == (pytest.approx(1 / 15), pytest.approx(1 / 3))
    assert f1 == pytest.approx(2 * (1 / 15) * (1 / 3) / (1 / 15 + 1 / 3))


def test_recall_counts_prediction_repeats() -> None:
    # tp adds the word's count in the prediction: tp 2, fn 1 for "lung lung" (recall 2/3),
    # where "lung" alone has tp 1, fn 1 (recall 1/2)
    f1, p, r = token_f1("lung lung", "left lung")
    assert (p, r) == (1.0, pytest.approx(2 / 3))
    assert f1 == pytest.approx(0.8)
    assert token_f1("lung", "left lung")[2] == 0.5
    # and a repeated wrong word costs precision once per repeat: tp 1, fp 2
    assert token_f1("lung x x", "lung")[1] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("pred", "ref"), [("", "lung"), ("lung", ""), ("heart", "lung"), ("the", "the")]
)
def test_token_f1_zero_cases(pred: str, ref: str) -> None:
    assert token_f1(pred, ref) == (0.0, 0.0, 0.0)


def test_exact_match_llava_is_a_word_ratio() -> None:
    assert exact_match_llava("left left lung", "left lung") == pytest.approx(2 / 3)
    assert exact_match_llava("lung", "left lung") == 1.0  # a partial answer scores 1
    assert exact_match_llava("", "lung") == 0.0
    assert normalized_exact_match("lung", "left lung") == 0.0
    assert normalized_exact_match("The Left-Lung.", "left lung") == 1.0


def test_open_hit_is_a_substring_test() -> None:
    assert open_hit("in the left lung", "Left") == 1.0
    assert open_hit("cleft", "left") == 1.0
    assert open_hit("right", "left") == 0.0


def test_open_item_scores_collects_everything() -> None:
    s = open_item_scores("Left lung.", "the left lung base")
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["exact"] == 1.0 and s["exact_normalized"] == 0.0 and s["hit"] == 0.0
    # hyp [left, lung] vs ref [left, lung, base]: p1 = 1, p2 = 1, bp = exp(1 - 3/2)
    assert s["bleu1"] == pytest.approx(math.exp(-0.5))
    assert s["bleu2"] == pytest.approx(math.exp(-0.5))
    assert s["bleu_2gram"] == pytest.approx(math.exp(-0.5))
    assert 0 < s["bleu3"] < 1e-100 and 0 < s["bleu4"] < 1e-100
    assert set(s) >= set(BLEU_WEIGHTS)


# ----------------------------------------------------------------------------- BLEU


def _tok(s: str) -> list[str]:
    return s.split()


def test_bleu_golden_values() -> None:
    ref = _tok("a b c d e f")
    assert sentence_bleu([ref], ref) == pytest.approx(1.0)
    # all n-grams match, hypothesis 4 vs reference 6: BLEU-4 is the brevity penalty exp(1 - 6/4)
    assert sentence_bleu([ref], _tok("a b c d")) == pytest.approx(math.exp(-0.5))
    # p1 = 4/5, p2 = 2/4, equal lengths (bp = 1): BLEU-2 = sqrt(0.4); one order only: p2
    hyp = _tok("a b x d e")
    assert sentence_bleu([_tok("a b c d e")], hyp, (0.5, 0.5)) == pytest.approx(math.sqrt(0.4))
    assert sentence_bleu([_tok("a b c d e")], hyp, (0, 1, 0, 0)) == pytest.approx(0.5)
    # clipping: "the" x4 against one "the" -> 1/4
    assert sentence_bleu([_tok("the cat")], _tok("the the the the"), (1,)) == 0.25


def test_bleu_edge_cases_follow_nltk() -> None:
    # no unigram match (or an empty hypothesis) is exactly 0
    assert sentence_bleu([_tok("a b")], _tok("c d")) == 0.0
    assert sentence_bleu([_tok("a b")], []) == 0.0
    # a zero higher-order precision counts as the smallest float: ~0, not 0
    tiny = sentence_bleu([_tok("a c")], _tok("a b"), (0, 1, 0, 0))
    assert 0 < tiny < 1e-300
    # closest reference length, ties to the shorter one: refs 2 and 4, hypothesis 3 -> bp = 1
    refs = [_tok("a b"), _tok("a b c d")]
    assert sentence_bleu(refs, _tok("a b c"), (1,)) == 1.0
    with pytest.raises(ValueError):
        sentence_bleu([], _tok("a"))


def test_bleu_matches_nltk_when_installed() -> None:
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    rng = random.Random(0)
    vocab = list("abcde")
    weight_sets = list(BLEU_WEIGHTS.values())
    for _ in range(300):
        refs = [
            [rng.choice(vocab) for _ in range(rng.randint(0, 8))] for _ in range(rng.randint(1, 2))
        ]
        hyp = [rng.choice(vocab) for _ in range(rng.randint(0, 8))]
        for w in weight_sets:
            expected = nltk_bleu.sentence_bleu(refs, hyp, weights=w)
            assert sentence_bleu(refs, hyp, w) == pytest.approx(expected, rel=1e-12, abs=0)


# ----------------------------------------------------------------------------- closed questions

RULES = ("llava_med", "llava_med_original", "strict")


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("No, there is no effusion.", "no", (1.0, 1.0, 1.0)),
        ("Yes", "no", (0.0, None, 0.0)),
        # "cannot" contains "no": a yes/no-bearing miss, left out by the original code
        ("I cannot tell from this image.", "yes", (0.0, None, 0.0)),
        # "normal" contains "no": a substring hit for "no" that strict refuses
        ("The heart looks normal.", "no", (1.0, 1.0, 0.0)),
        # echoing the options hits under the substring rule; strict takes the first word
        ("Please choose from [yes, no]", "no", (1.0, 1.0, 0.0)),
        # no yes/no anywhere is a miss in all rules
        ("Pleural effusion", "yes", (0.0, 0.0, 0.0)),
        # a closed question whose answer is not yes/no: a miss unless "no"/"yes" happens to occur
        ("MRI", "MRI", (0.0, 0.0, 1.0)),
        ("It is an MRI, not a CT.", "mri", (1.0, 1.0, 0.0)),
        ("Left.", "left", (0.0, 0.0, 1.0)),
        ("yes.", "Yes", (1.0, 1.0, 1.0)),
        # VQA-RAD's one "Maybe" answer (qid 2156, a closed question): right only by accident
        ("Assistant: Maybe", "Maybe", (0.0, 0.0, 0.0)),
        ("No, maybe.", "Maybe", (1.0, 1.0, 0.0)),
        ("Yes", "Maybe", (0.0, None, 0.0)),
        # an int reference (VQA-RAD stores five counts as ints) is compared as its string
        ("four", 4, (0.0, 0.0, 1.0)),
    ],
)
def test_closed_rules(pred: str, ref: str | int, expected: tuple) -> None:
    assert tuple(closed_hit(pred, ref, rule) for rule in RULES) == expected


def test_closed_rule_is_checked() -> None:
    with pytest.raises(ValueError, match="closed_rule"):
        closed_hit("yes", "yes", "lenient")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="closed_rule"):
        VQAClosedAccuracy("lenient")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- torchmetrics

OPEN = [
    ("Left lung.", "the left lung base"),
    ("lung lung", "left lung"),
    ("", "heart"),
    ("The right kidney", "Right kidney"),
    ("x." * 33, "x" * 33),
]
CLOSED = [
    ("No, there is no effusion.", "no"),
    ("Yes", "no"),
    ("I cannot tell.", "yes"),
    ("MRI", "mri"),
    ("yes", "yes"),
]


def test_open_metric_is_the_mean_of_item_scores() -> None:
    metric = VQAOpenMetrics()
    metric.update([p for p, _ in OPEN[:2]], [r for _, r in OPEN[:2]])
    metric.update([p for p, _ in OPEN[2:]], [r for _, r in OPEN[2:]])
    got = metric.compute()
    items = [open_item_scores(p, r) for p, r in OPEN]
    for key in ("recall", "precision", "f1", "exact", "exact_normalized", "hit"):
        expected = 100 * sum(s[key] for s in items) / len(items)
        assert got[f"open_{key}"].item() == pytest.approx(expected)
    for key in BLEU_WEIGHTS:
        assert got[key].item() == pytest.approx(100 * sum(s[key] for s in items) / len(items))
    # recall by hand: 2/3, 2/3, 0, 1, 1
    assert got["open_recall"].item() == pytest.approx(100 * (2 / 3 + 2 / 3 + 0 + 1 + 1) / 5)
    assert got["n_open"].item() == 5


def test_metric_states_are_sums_that_merge() -> None:
    full, a, b = VQAOpenMetrics(), VQAOpenMetrics(), VQAOpenMetrics()
    full.update(*zip(*OPEN, strict=True))
    a.update(*zip(*OPEN[:3], strict=True))
    b.update(*zip(*OPEN[3:], strict=True))
    # every state is reduced by a plain sum across processes
    assert {fx.__name__ for fx in a._reductions.values()} == {"dim_zero_sum"}
    assert a.recall.dtype == torch.float64 and a.n.dtype == torch.int64
    a.merge_state(b)
    for key, value in full.compute().items():
        assert a.compute()[key].item() == pytest.approx(value.item())

    closed_full, c1, c2 = (VQAClosedAccuracy("llava_med_original") for _ in range(3))
    closed_full.update(*zip(*CLOSED, strict=True))
    c1.update(*zip(*CLOSED[:2], strict=True))
    c2.update(*zip(*CLOSED[2:], strict=True))
    c1.merge_state(c2)
    assert {k: v.item() for k, v in c1.compute().items()} == pytest.approx(
        {k: v.item() for k, v in closed_full.compute().items()}
    )


def test_closed_accuracy_per_rule() -> None:
    expected = {
        # hits: effusion, yes -> 2 of 5
        "llava_med": (40.0, 5, 5),
        # "Yes" vs no and "cannot" are yes/no-bearing misses: left out -> 2 of 3
        "llava_med_original": (pytest.approx(200 / 3), 5, 3),
        # effusion, MRI, yes -> 3 of 5
        "strict": (60.0, 5, 5),
    }
    for rule, (acc, n, counted) in expected.items():
        metric = VQAClosedAccuracy(rule)
        metric.update([p for p, _ in CLOSED], [r for _, r in CLOSED])
        got = metric.compute()
        assert got["closed_acc"].item() == acc
        assert (got["n_closed"].item(), got["n_closed_counted"].item()) == (n, counted)


def test_metrics_accept_single_items_and_check_lengths() -> None:
    metric = VQAClosedAccuracy()
    metric.update("yes", "yes")
    metric.update(["no"], [0])  # an int answer is a string "0"
    assert metric.compute()["n_closed"].item() == 2
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metric.update(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="strings"):
        VQAOpenMetrics().update([None], ["a"])  # type: ignore[list-item]


def test_empty_metric_is_nan() -> None:
    with pytest.warns(UserWarning):
        assert math.isnan(VQAOpenMetrics().compute()["open_recall"].item())
    with pytest.warns(UserWarning):
        assert math.isnan(VQAClosedAccuracy().compute()["closed_acc"].item())


def test_float_min_is_what_nltk_uses() -> None:
    # guard for the constant BLEU relies on (a platform with another double would differ)
    assert sys.float_info.min == 2.2250738585072014e-308
