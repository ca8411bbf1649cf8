"""``generate --prompt_style suite | vital``: each style's prompt carries each of its requirements,
and ``vital`` asks for what BioMed-VITAL's released scripts ask for where the suite differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakeapi import FakeAPI, fake_client, write_inputs

from biomedvital.data.records import SourceFigure
from biomedvital.generation.generate import generate
from biomedvital.generation.prompts import (
    build_messages,
    prompt_requirements,
    prompt_template,
    prompt_version,
)

# What each prompt must ask for, by id. The vital ids are the released scripts' requirements
# (reference-method.md, stage 1): a requirement lost from a prompt fails here.
REQUIRED_IDS = {
    ("vital", 1): {
        "conversation",  # a dialogue about the figure, both looking at the image
        "user_first",
        "exchanges",  # a minimum of 4-5, more for information-rich figures
        "diverse_questions",  # modality, organ, location, disease, size, count, reasoning
        "visual_first",
        "text_linked",  # caption and context worked in, their links to the image made explicit
        "terminology",
        "responsible",  # neither overconfident nor vague
        "training_value",  # data to train another medical VLM
    },
    ("vital", 2): {
        "two_answers",
        "image_focus",  # the released two-answer script keeps the text's specifics out
        "diverse_questions",
        "questions",  # a minimum of 3-4 questions
        "responsible",  # no overconfidence, no medical advice
        "user_first",
        "visual_detail",
    },
    ("suite", 1): {
        "conversation",
        "user_first",
        "exchanges",
        "diverse_questions",
        "terminology",
        "no_source",
        "specific",
        "supported",
        "multi_line",
    },
    ("suite", 2): {
        "questions",
        "two_answers",
        "diverse_questions",
        "terminology",
        "no_source",
        "distinct",
    },
}

FIG = SourceFigure.model_validate(
    {
        "pair_id": "P1",
        "fig_label": "Figure 1",
        "fig_caption": "Axial CT showing a lesion.",
        "in_text_mention": [{"tokens": "The lesion (Fig. 1) measured 2 cm."}],
        "domain": {"ct_scan": True},
    }
)


def _system(style: str, answers: int) -> str:
    return build_messages(FIG, [], None, answers, style)[0]["content"]


@pytest.mark.parametrize(("style", "answers"), sorted(REQUIRED_IDS))
def test_each_prompt_carries_each_of_its_requirements(style: str, answers: int) -> None:
    reqs = prompt_requirements(answers, style)
    ids = [i for i, _ in reqs]
    assert len(ids) == len(set(ids)) and set(ids) == REQUIRED_IDS[style, answers]
    system = _system(style, answers)
    for rid, phrase in reqs:
        assert phrase in system, (style, answers, rid)
    tags = ("User:", "Assistant:") if answers == 1 else ("Question:", "Answer A:", "Answer B:")
    assert all(f'"{t}"' in system for t in tags)  # the format the parser reads


def test_vital_asks_for_a_minimum_where_the_suite_caps() -> None:
    """The released script asks for a minimum of 4-5 exchanges and more for rich figures; the
    suite writes 4 to 5. The suite's rule against naming the caption is not the released one."""
    vital = dict(prompt_requirements(1, "vital"))
    suite = dict(prompt_requirements(1, "suite"))
    assert "no fewer than 4 to 5" in vital["exchanges"] and "add more" in vital["exchanges"]
    assert suite["exchanges"] == "Write 4 to 5 question-answer exchanges."
    vital_text, suite_text = _system("vital", 1), _system("suite", 1)
    assert suite["exchanges"] not in vital_text
    assert not any(w in suite_text for w in ("no fewer than", "at least", "minimum"))
    assert "yes/no" in vital["diverse_questions"] and "open" in vital["diverse_questions"]
    assert "overstate certainty" in vital["responsible"] and "vague" in vital["responsible"]
    assert "relates to what is visible" in vital["text_linked"]
    assert "Never say" in suite_text and "Never say" not in vital_text
    assert "overstate" not in suite_text
    pair_vital, pair_suite = (dict(prompt_requirements(2, s)) for s in ("vital", "suite"))
    assert "no fewer than 3 to 4" in pair_vital["questions"]
    assert pair_suite["questions"] == "Write 4 to 5 questions about the image"
    assert "do not repeat" in pair_vital["image_focus"]


def test_suite_prompts_are_unchanged() -> None:
    """The suite's prompts are the default: their hashes are every existing candidate's
    ``prompt_version`` and part of every journaled request, so adding a style leaves them be."""
    assert prompt_version(1) == prompt_version(1, "suite") == "963838cd9b9b7321"
    assert prompt_version(2, "suite") == "974a8bd3508b34ec"
    versions = {prompt_version(a, s) for s in ("suite", "vital") for a in (1, 2)}
    assert len(versions) == 4
    assert "{examples}" in prompt_template(2, "vital")
    with pytest.raises(ValueError, match="prompt_style must be one of suite, vital, got 'paper'"):
        prompt_template(1, "paper")  # type: ignore[arg-type]


@pytest.mark.parametrize("answers", [1, 2])
def test_dry_run_shows_the_vital_prompt(
    api: FakeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str], answers: int
) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=1)
    generate(
        out=tmp_path / "out",
        client=fake_client(api),
        store=str(tmp_path / "ml"),
        progress=False,
        dry_run=True,
        answers=answers,
        prompt_style="vital",
        **inputs,
    )
    text = capsys.readouterr().out
    assert api.count() == 0
    for _, phrase in prompt_requirements(answers, "vital"):
        assert phrase in text
    if answers == 2:  # the drawn demonstrations are shown as examples of questions
        assert "Examples of questions and answers" in text and "Demo caption" in text


def test_vital_run_sends_the_vital_prompt_and_records_it(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=2)
    out = tmp_path / "out"
    m = generate(
        out=out,
        client=fake_client(api, concurrency=2),
        store=mlstore,
        progress=False,
        vision=False,
        prompt_style="vital",
        **inputs,
    )
    assert api.count() == 2
    assert all(b["messages"][0]["content"] == prompt_template(1, "vital") for b in api.seen)
    assert m["config"]["prompt_style"] == "vital" and m["counts"]["written"] == 2
    assert m["prompt_version"] == prompt_version(1, "vital")
    cands = [json.loads(x) for x in (out / "candidates.jsonl").open()]
    assert {c["generator"]["prompt_version"] for c in cands} == {prompt_version(1, "vital")}
