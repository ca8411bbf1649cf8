"""LLaVA-Med's medical-VQA answer normalisation and metrics, reproduced quirk for quirk.

Published VQA-RAD / SLAKE / PathVQA figures (LLaVA-Med, BioMed-VITAL) come from LLaVA-Med's
``run_eval.py``; to compare with them a re-implementation must match it to 1e-4, so its quirks are
kept on purpose and each one is named where it is implemented:

* the punctuation rule looks at the *original* text (a character is deleted everywhere when the
  text has it next to a space, or has a digit-comma-digit anywhere; otherwise it becomes a space);
* only the first 32 periods are removed (``re.UNICODE`` is passed where ``re.sub`` takes a count);
* the open-question metric functions normalise a second time (only the period cap makes that
  visible), while BLEU and the closed rule use the once-normalised text;
* token recall counts a matching word as often as the *prediction* repeats it, so repeating a
  matching word raises recall ("lung lung" scores 2/3 against "left lung", "lung" 1/2);
* "exact match" is distinct reference words found / prediction word count (not string equality);
* the closed rule is a substring test (``"no"`` is in ``"normal"``), and the historic version left
  misses that contained yes/no out of the denominator (``closed_rule="llava_med_original"``).

Plain functions score one item; :class:`VQAOpenMetrics` and :class:`VQAClosedAccuracy` accumulate
sums and counts only, so they sync across processes with a plain sum.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torchmetrics import Metric

ClosedRule = Literal["llava_med", "llava_med_original", "strict"]
CLOSED_RULES: tuple[str, ...] = get_args(ClosedRule)

# ----------------------------------------------------------------------------- normalisation

# Checked and replaced in this order; the order matters only through the original-text test.
_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The original pattern starts with a look-ahead for "<=digit" that can never fail before a ".",
# so in effect: a period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_CAP = int(re.UNICODE)  # 32: the flag lands in re.sub's ``count`` argument
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The standard VQA-evaluation contraction table, as LLaVA-Med uses it. Its capitalised keys can
# never match lower-cased text, and "somebody'd" maps to "somebodyd": both kept as published.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def normalize_word(text: str) -> str:
    """One pass of LLaVA-Med's ``normalize_word`` (the caller lower-cases first, as it does)."""
    # The deletion test reads the text as it came in, not the partly cleaned one.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for ch in _PUNCT:
        if delete_all or ch + " " in text or " " + ch in text:
            out = out.replace(ch, "")
        else:
            out = out.replace(ch, " ")
    out = _PERIOD.sub("", out, count=_PERIOD_CAP)
    words = []
    for word in out.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


def normalize_answer(text: str | int) -> str:
    """Lower-case (ints as strings) and normalise once: what LLaVA-Med compares answers on."""
    return normalize_word(str(text).lower())


def _word_counts(normalized: str) -> Counter[str]:
    return Counter(normalized.lower().split())


# ----------------------------------------------------------------------------- open questions


def token_f1(prediction: str, reference: str | int) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` over words, as LLaVA-Med's ``calculate_f1score``.

    tp adds a shared word's count in the *prediction*, so "lung lung" against "left lung" has
    recall 2/3 where "lung" has 1/2. An empty side or tp = 0 gives zeros.
    """
    pred = _word_counts(normalize_word(normalize_answer(prediction)))
    ref = _word_counts(normalize_word(normalize_answer(reference)))
    return _f1(pred, ref)


def _f1(pred: Counter[str], ref: Counter[str]) -> tuple[float, float, float]:
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in pred.items() if w in ref)
    fp = sum(n for w, n in pred.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in pred)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def exact_match_llava(prediction: str, reference: str | int) -> float:
    """LLaVA-Med's "exact match": distinct reference words in the prediction / prediction words."""
    pred = _word_counts(normalize_word(normalize_answer(prediction)))
    ref = _word_counts(normalize_word(normalize_answer(reference)))
    return _exact(pred, ref)


def _exact(pred: Counter[str], ref: Counter[str]) -> float:
    total = sum(pred.values())
    if total == 0:
        return 0.0
    return sum(1 for w in ref if w in pred) / total


def normalized_exact_match(prediction: str, reference: str | int) -> float:
    """1.0 when the normalised prediction equals the normalised reference (plain exact match)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def open_hit(prediction: str, reference: str | int) -> float:
    """1.0 when the normalised reference is a substring of the normalised prediction.

    LLaVA-Med's later ``run_eval_batch.py`` calls this "open accuracy"; reported for comparison.
    """
    return float(normalize_answer(reference) in normalize_answer(prediction))


# ----------------------------------------------------------------------------- BLEU


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    if len(tokens) < n:
        return Counter()
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(
    references: Sequence[Sequence[str]],
    hypothesis: Sequence[str],
    weights: Sequence[float] = (0.25, 0.25, 0.25, 0.25),
) -> float:
    """BLEU of one hypothesis as nltk's ``sentence_bleu`` computes it without smoothing.

    Clipped n-gram precisions for n = 1..len(weights), weighted geometric mean, brevity penalty
    against the closest reference length (ties to the shorter). As in nltk: no matching unigram
    gives 0, and a zero higher-order precision is replaced by the smallest float, so its term is
    ~0 with a positive weight and no effect with weight 0 (how LLaVA-Med gets its BLEU-2/3).
    """
    if not references:
        raise ValueError("sentence_bleu needs at least one reference")
    numerators, denominators = [], []
    for n in range(1, len(weights) + 1):
        hyp_counts = _ngram_counts(hypothesis, n)
        best: dict[tuple[str, ...], int] = {}
        for ref in references:
            ref_counts = _ngram_counts(ref, n)
            for gram in hyp_counts:
                best[gram] = max(best.get(gram, 0), ref_counts[gram])
        numerators.append(sum(min(c, best[g]) for g, c in hyp_counts.items()))
        denominators.append(max(1, sum(hyp_counts.values())))
    if not numerators or numerators[0] == 0:
        return 0.0
    hyp_len = len(hypothesis)
    ref_len = min((len(r) for r in references), key=lambda r: (abs(r - hyp_len), r))
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    precisions = [
        num / den if num else sys.float_info.min
        for num, den in zip(numerators, denominators, strict=True)
    ]
    return bp * math.exp(
        math.fsum(w * math.log(p) for w, p in zip(weights, precisions, strict=True))
    )


BLEU_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bleu1": (1.0,),
    "bleu2": (0.5, 0.5),
    "bleu3": (1 / 3, 1 / 3, 1 / 3),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
    # LLaVA-Med's "bleu_score_2" / "bleu_score_3": one n-gram order only (times the brevity penalty)
    "bleu_2gram": (0.0, 1.0, 0.0, 0.0),
    "bleu_3gram": (0.0, 0.0, 1.0, 0.0),
}
"""Cumulative BLEU-1..4 (bleu1 and bleu4 are LLaVA-Med's bleu_score_1 and bleu_score) and
LLaVA-Med's single-order BLEU-2/3."""


def bleu(
    prediction: str, reference: str | int, weights: Sequence[float] = BLEU_WEIGHTS["bleu4"]
) -> float:
    """BLEU of one answer on its once-normalised words (LLaVA-Med scores BLEU before the re-pass)."""
    hyp = normalize_answer(prediction).lower().split()
    ref = normalize_answer(reference).lower().split()
    return sentence_bleu([ref], hyp, weights)


def open_item_scores(
    prediction: str,
    reference: str | int,
    bleu_weights: Mapping[str, Sequence[float]] = BLEU_WEIGHTS,
) -> dict[str, float]:
    """Every open-question score of one item, each a fraction in [0, 1]."""
    pred_once, ref_once = normalize_answer(prediction), normalize_answer(reference)
    pred = _word_counts(normalize_word(pred_once))
    ref = _word_counts(normalize_word(ref_once))
    f1, precision, recall = _f1(pred, ref)
    hyp_tokens, ref_tokens = pred_once.lower().split(), ref_once.lower().split()
    scores = {
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "exact": _exact(pred, ref),
        "exact_normalized": float(pred_once == ref_once),
        "hit": float(ref_once in pred_once),
    }
    for name, weights in bleu_weights.items():
        scores[name] = sentence_bleu([ref_tokens], hyp_tokens, weights)
    return scores


# ----------------------------------------------------------------------------- closed questions

_YES_NO = ("yes", "no")


def closed_hit(
    prediction: str, reference: str | int, rule: ClosedRule = "llava_med"
) -> float | None:
    """1.0 (hit), 0.0 (miss) or None (left out of the denominator) for one closed question.

    * ``llava_med``: a prediction containing the substring "yes" or "no" hits when the normalised
      reference is a substring of it; one containing neither misses.
    * ``llava_med_original``: the same, except that misses containing yes/no return None (the
      pre-fix code never counted them, inflating accuracy).
    * ``strict``: for a yes/no reference, the first "yes"/"no" word of the prediction must equal
      it; any other reference needs normalised exact equality.
    """
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if rule == "strict":
        if ref in _YES_NO:
            first = next((w for w in pred.split() if w in _YES_NO), None)
            return float(first == ref)
        return float(pred == ref)
    if rule not in ("llava_med", "llava_med_original"):
        raise ValueError(f"closed_rule must be one of {CLOSED_RULES}, got {rule!r}")
    if "yes" in pred or "no" in pred:
        if ref in pred:
            return 1.0
        return None if rule == "llava_med_original" else 0.0
    return 0.0


# ----------------------------------------------------------------------------- torchmetrics


def _as_lists(preds: Sequence[str] | str, targets: Sequence[Any] | Any) -> tuple[list, list]:
    preds_l = [preds] if isinstance(preds, str) else list(preds)
    targets_l = [targets] if isinstance(targets, str | int) else list(targets)
    if len(preds_l) != len(targets_l):
        raise ValueError(f"{len(preds_l)} predictions for {len(targets_l)} references")
    for p in preds_l:
        if not isinstance(p, str):
            raise TypeError(f"predictions must be strings, got {type(p).__name__}")
    return preds_l, targets_l


class VQAOpenMetrics(Metric):
    """Open-question scores summed over items; ``compute`` gives means × 100.

    Keys: ``open_recall``, ``open_precision``, ``open_f1``, ``open_exact`` (LLaVA-Med's),
    ``open_exact_normalized``, ``open_hit`` and one per BLEU weighting (``bleu1`` … by default).
    States are float64 sums and an item count, reduced by sum across processes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _SCORES = ("recall", "precision", "f1", "exact", "exact_normalized", "hit")

    def __init__(self, bleu_weights: Mapping[str, Sequence[float]] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.bleu_weights = {k: tuple(v) for k, v in (bleu_weights or BLEU_WEIGHTS).items()}
        for name in self._SCORES:
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "bleu", torch.zeros(len(self.bleu_weights), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("n", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str] | str, targets: Sequence[str | int] | str | int) -> None:
        """Add predictions (model answers) against their reference answers."""
        preds_l, targets_l = _as_lists(preds, targets)
        sums = dict.fromkeys(self._SCORES, 0.0)
        bleu_sums = [0.0] * len(self.bleu_weights)
        for pred, target in zip(preds_l, targets_l, strict=True):
            item = open_item_scores(pred, target, self.bleu_weights)
            for name in self._SCORES:
                sums[name] += item[name]
            for i, name in enumerate(self.bleu_weights):
                bleu_sums[i] += item[name]
        for name in self._SCORES:
            setattr(self, name, getattr(self, name) + sums[name])
        self.bleu += torch.tensor(bleu_sums, dtype=torch.float64, device=self.bleu.device)
        self.n += len(preds_l)

    def compute(self) -> dict[str, torch.Tensor]:
        """Means × 100 (NaN before any item)."""
        n = self.n.to(torch.float64)
        out = {f"open_{name}": getattr(self, name) / n * 100 for name in self._SCORES}
        for i, name in enumerate(self.bleu_weights):
            out[name] = self.bleu[i] / n * 100
        out["n_open"] = self.n.clone()
        return out


class VQAClosedAccuracy(Metric):
    """Closed-question accuracy under one ``closed_rule``; ``compute`` gives a dict.

    Keys: ``closed_acc`` (hits / counted × 100, NaN when nothing was counted), ``n_closed`` (items
    seen) and ``n_closed_counted`` (the denominator: smaller than ``n_closed`` only under
    ``llava_med_original``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, rule: ClosedRule = "llava_med", **kwargs: Any):
        super().__init__(**kwargs)
        if rule not in CLOSED_RULES:
            raise ValueError(f"closed_rule must be one of {CLOSED_RULES}, got {rule!r}")
        self.rule: ClosedRule = rule
        for name in ("hits", "counted", "total"):
            self.add_state(name, torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str] | str, targets: Sequence[str | int] | str | int) -> None:
        """Add predictions (model answers) against their reference answers."""
        preds_l, targets_l = _as_lists(preds, targets)
        hits = counted = 0
        for pred, target in zip(preds_l, targets_l, strict=True):
            outcome = closed_hit(pred, target, self.rule)
            if outcome is not None:
                counted += 1
                hits += int(outcome)
        self.hits += hits
        self.counted += counted
        self.total += len(preds_l)

    def compute(self) -> dict[str, torch.Tensor]:
        """Accuracy × 100 and the two counts."""
        acc = self.hits.to(torch.float64) / self.counted.to(torch.float64) * 100
        return {
            "closed_acc": acc,
            "n_closed": self.total.clone(),
            "n_closed_counted": self.counted.clone(),
        }
