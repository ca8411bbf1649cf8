"""Bad input to ``generate``: an error naming the file and the record before anything is sent,
or (``on_bad_record: skip``) a skip counted by reason in the manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fakeapi import FakeAPI, fake_client, write_inputs

from biomedvital.data.report import BadRecordError
from biomedvital.generation.generate import generate

GOOD = {
    "fig_caption": "Axial CT showing a lesion.",
    "in_text_mention": [{"tokens": "The lesion (Fig. 1) measured 2 cm."}],
    "domain": {"ct_scan": True},
}

BAD_FIGURES = {
    "no caption": (
        {"pair_id": "X", "domain": {"ct_scan": True}},
        "fig_caption",
        "missing:fig_caption",
    ),
    "blank caption": (
        {**GOOD, "pair_id": "X", "fig_caption": "  "},
        "empty caption",
        "empty_caption",
    ),
    "unknown domain flag": (
        {**GOOD, "pair_id": "X", "domain": {"xray": True}},
        "unknown domain flag(s) ['xray']",
        "unknown_domain",
    ),
    "non-boolean flag": (
        {**GOOD, "pair_id": "X", "domain": {"ct_scan": "often"}},
        "domain",
        "invalid:domain.ct_scan",
    ),
    "missing image": ({**GOOD, "pair_id": "NOIMG"}, "image not found", "missing_image"),
    "duplicate pair_id": ({**GOOD, "pair_id": "PMC0_F0"}, "duplicate pair_id", "duplicate:pair_id"),
    "not an object": ([1, 2], "expected a JSON object", "not_an_object"),
}


def _gen(api: FakeAPI, inputs: dict, out: Path, store: str, **kw) -> dict:
    args = dict(
        client=fake_client(api, concurrency=2, max_attempts=1, timeout_s=5),
        store=store,
        progress=False,
    )
    args.update(kw)
    return generate(out=out, **inputs, **args)


def _append(path: Path, *rows: object, raw: str = "") -> None:
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(raw)


@pytest.mark.parametrize("case", sorted(BAD_FIGURES))
def test_bad_figure_raises_naming_file_and_line(api: FakeAPI, tmp_path: Path, case: str) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=2)
    record, needle, _ = BAD_FIGURES[case]
    _append(inputs["figures"], record)
    with pytest.raises(BadRecordError) as e:
        _gen(api, inputs, tmp_path / "out", "unused")
    assert e.value.path == str(inputs["figures"]) and e.value.line == 3
    assert f"{inputs['figures']}:3:" in str(e.value) and needle in str(e.value)
    assert api.count() == 0 and not (tmp_path / "out").exists()  # nothing paid, nothing written


def test_bad_figures_skipped_and_counted(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=2)
    _append(inputs["figures"], *(r for r, _, _ in BAD_FIGURES.values()), raw="{broken\n")
    m = _gen(api, inputs, tmp_path / "out", mlstore, on_bad_record="skip")
    rep = m["records"]["figures"]
    expected = {cat: 1 for _, _, cat in BAD_FIGURES.values()} | {"invalid_json": 1}
    assert rep["skipped_by_reason"] == expected and rep["kept"] == 2
    assert m["counts"]["figures"] == 2 + len(expected) and m["counts"]["written"] == 2
    assert api.count() == 2
    assert any(f"{inputs['figures']}:" in x for x in rep["examples"])


def _demo(i: int, **kw: object) -> dict:
    return {
        "id": i,
        "imgs": f"d{i}.jpg",
        "fig_caption": f"Demo {i}.",
        "domain": {"mri": True},
        "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}],
    } | kw


BAD_DEMOS = {
    "no conversations": (_demo(90, conversations=None), "conversations", "invalid:conversations"),
    "empty turn": (
        _demo(
            91, conversations=[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}]
        ),
        "turn 1 is empty",
        "malformed_conversation",
    ),
    "questions only": (
        _demo(92, conversations=[{"from": "human", "value": "Q?"}]),
        "needs at least one question and one answer",
        "malformed_conversation",
    ),
    "unknown role": (
        _demo(93, conversations=[{"from": "doctor", "value": "Q?"}]),
        "conversations",
        "invalid:conversations.0.from",
    ),
    "unknown domain flag": (
        _demo(94, domain={"ultrasound": True}),
        "unknown domain",
        "unknown_domain",
    ),
    "duplicate id": (_demo(0), "duplicate id '0'", "duplicate:id"),
}


@pytest.mark.parametrize("case", sorted(BAD_DEMOS))
def test_bad_demonstration_raises_naming_record(api: FakeAPI, tmp_path: Path, case: str) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=1)
    demos = json.loads(inputs["demonstrations"].read_text())
    record, needle, _ = BAD_DEMOS[case]
    inputs["demonstrations"].write_text(json.dumps([*demos, record]))
    with pytest.raises(BadRecordError) as e:
        _gen(api, inputs, tmp_path / "out", "unused")
    assert e.value.line == len(demos) + 1 and e.value.kind == "record"
    assert str(inputs["demonstrations"]) in str(e.value) and needle in str(e.value)
    assert api.count() == 0


def test_bad_demonstrations_skipped_counted_and_none_left(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=1)
    demos = json.loads(inputs["demonstrations"].read_text())
    bad = [r for r, _, _ in BAD_DEMOS.values()]
    non_alternating = _demo(
        95,
        conversations=[
            {"from": "human", "value": "Q?"},
            {"from": "gpt", "value": "A."},
            {"from": "gpt", "value": "More."},
        ],
    )
    inputs["demonstrations"].write_text(json.dumps([*demos, *bad, non_alternating]))
    m = _gen(api, inputs, tmp_path / "out", mlstore, on_bad_record="skip")
    rep = m["records"]["demonstrations"]
    assert rep["skipped"] == len(bad) and rep["kept"] == len(demos) + 1
    assert rep["repaired"] == {"non_alternating_turns": 1}  # kept as released (2 in the real file)
    assert m["counts"]["written"] == 1

    inputs["demonstrations"].write_text(json.dumps(bad[:3]))
    with pytest.raises(ValueError, match="no usable demonstrations"):
        _gen(api, inputs, tmp_path / "out2", mlstore, on_bad_record="skip")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--client.concurrency", "0", "client.concurrency must be >= 1, got 0"),
        ("--client.requests_per_minute", "-5", "client.requests_per_minute must be > 0"),
        ("--client.price_per_million", "{inputs: 1}", "client.price_per_million keys"),
        ("--sampling.max_tokens", "0", "sampling.max_tokens must be >= 1, got 0"),
    ],
)
def test_bad_client_setting_is_one_line_before_any_request(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "biomedvital", "rate", "--config", "conf/demo/rate.yaml",
         "--out", str(tmp_path / "rate"), "--store", str(tmp_path / "mlruns"), flag, value],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"biomedvital: error: {message}")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "rate").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("key", ["prompt_style", "flagged_answers", "truncated_replies"])
def test_bad_choice_is_one_error_naming_the_key(api: FakeAPI, tmp_path: Path, key: str) -> None:
    """A value outside a switch's choices stops the verb before anything is read or sent, from
    the command line (the parser names the key) and from Python alike."""
    from biomedvital.cli import ConfigError, main

    paper = Path(__file__).resolve().parents[2] / "conf" / "paper" / "generate.yaml"
    with pytest.raises(ConfigError) as info:
        main(["generate", "--config", str(paper), f"--{key}", "bogus", "--dry_run", "true"])
    assert re.fullmatch(
        f"generate: the command line: {key} must be one of '.*', got 'bogus'", str(info.value)
    )
    inputs = write_inputs(tmp_path / "in", n_figures=1)
    with pytest.raises(ValueError, match=f"^{key} must be one of .*, got 'bogus'$"):
        _gen(api, inputs, tmp_path / "out", str(tmp_path / "ml"), **{key: "bogus"})
    assert api.count() == 0 and not (tmp_path / "out").exists()
    assert not (tmp_path / "ml").exists()
