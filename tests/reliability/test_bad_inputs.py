"""The bad-input corpus (``tests/bad_inputs/cases.yaml``) through the real readers and verbs.

Every case must fail with an error naming the file and the record (line, array element, config
key or question id), or, where the reader is configured to skip, be counted under its category;
and it must leave no file in the output folder (no partial output, no temporary, no lock). A few
cases also run as separate ``python -m biomedvital`` processes: exit status, one error line, no
traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kill_harness import ForkServer

from biomedvital.cli import main
from biomedvital.data.images import ImageRoot
from biomedvital.data.jsonio import check_unique
from biomedvital.data.records import (
    read_candidates,
    read_demonstrations,
    read_figures,
    read_preferences,
    read_ratings,
)
from biomedvital.data.report import RecordReport

CORPUS = Path(__file__).resolve().parents[1] / "bad_inputs"
GOOD = CORPUS / "_good"
CASES: list[dict[str, Any]] = yaml.safe_load((CORPUS / "cases.yaml").read_text())
RECORD_READERS = ("figures", "demonstrations", "candidates", "ratings", "preferences", "llava_data")


def _huge_caption(path: Path) -> None:
    """Two figures, the second with a 2 MB caption (written at test time, not committed)."""
    good = {
        "pair_id": "PMC0_F1",
        "fig_caption": "CT showing a lesion.",
        "domain": {"ct_scan": True},
    }
    huge = {**good, "pair_id": "PMC1_F1", "fig_caption": "x" * 2_000_000}
    path.write_text(json.dumps(good) + "\n" + json.dumps(huge) + "\n")


def _file(case: dict[str, Any], tmp: Path) -> Path:
    name = case["file"]
    if name.startswith("@"):
        path = tmp / name[1:]
        {"@huge_caption.jsonl": _huge_caption}[name](path)
        return path
    return CORPUS / name


def _where(case: dict[str, Any], path: Path) -> str:
    """The fragment that locates the record in the message."""
    at = case.get("at")
    if at is None:
        return path.name
    if at.startswith("line "):
        return f"{path.name}:{at.removeprefix('line ')}:"
    if at.startswith("record "):
        return f"{path.name}: record {at.removeprefix('record ')}:"
    if at.startswith("key "):  # the file, then the key's dotted path
        return f"{path.name}: {at.removeprefix('key ')} "
    return at


@pytest.fixture(scope="module")
def processor() -> Any:
    from biomedvital.tuning.models import create_llava

    return create_llava("tiny:tiny-llava", seed=0).processor


def _read(reader: str, path: Path, on_bad: str, processor: Any) -> RecordReport:
    """Run a record reader; the report of what it kept and skipped."""
    report = RecordReport()
    if reader == "figures":
        figs = read_figures(path, on_bad, report)  # type: ignore[arg-type]
        check_unique(figs, "pair_id", path, on_bad=on_bad, report=report)  # type: ignore[arg-type]
    elif reader == "candidates":
        cands = read_candidates(path, on_bad, report)  # type: ignore[arg-type]
        check_unique(cands, "id", path, on_bad=on_bad, report=report)  # type: ignore[arg-type]
    elif reader == "demonstrations":
        read_demonstrations(path, on_bad, report)  # type: ignore[arg-type]
    elif reader == "ratings":
        read_ratings(path, on_bad, report)  # type: ignore[arg-type]
    elif reader == "preferences":
        read_preferences(path, on_bad, report)  # type: ignore[arg-type]
    elif reader == "llava_data":
        from biomedvital.tuning.datamodule import TunerDataModule

        dm = TunerDataModule(
            str(path),
            str(GOOD / "images"),
            max_length=256,
            num_workers=0,
            on_bad_record=on_bad,  # type: ignore[arg-type]
            verify_images=True,
        )
        dm.processor, dm.root = processor, ImageRoot(dm.image_root)
        dm.read()
        report = dm.report
    else:
        raise AssertionError(f"unknown record reader {reader!r}")
    return report


def _load(reader: str, path: Path) -> None:
    """Run a benchmark loader or the evaluator's data module."""
    from biomedvital.evaluation import benchmarks

    if reader == "vqa_images":
        from biomedvital.evaluation.vqa_eval import VQADataModule

        VQADataModule("vqa_rad", str(path), str(GOOD / "images")).setup("test")
        return
    layout = reader.split(":", 1)[1]
    loader = {
        "vqa_rad": benchmarks.load_vqa_rad,
        "slake": benchmarks.load_slake,
        "pathvqa": benchmarks.load_pathvqa,
        "llava": benchmarks.load_llava_vqa,
        "llava_med_bench": benchmarks.load_llava_med_bench,
    }[layout]
    loader(path, "test")


def _argv(case: dict[str, Any], path: Path, tmp: Path) -> list[str]:
    subs = {
        "{file}": str(path),
        "{good}": str(GOOD),
        "{out}": str(tmp / "out"),
        "{store}": str(tmp / "mlruns"),
    }
    out = []
    for arg in case["argv"]:
        for key, value in subs.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _run(case: dict[str, Any], path: Path, tmp: Path, processor: Any) -> str:
    """The error message the case raises (in this process)."""
    reader = case["reader"]
    with pytest.raises(Exception) as err:  # noqa: PT011 - the message is what is checked
        if reader in RECORD_READERS:
            _read(reader, path, "raise", processor)
        elif reader == "cli":
            main(_argv(case, path, tmp))
        else:
            _load(reader, path)
    assert not isinstance(err.value, AssertionError | KeyError | TypeError | AttributeError), (
        f"{case['kind']}: a crash, not an error about the input: {err.value!r}"
    )
    return str(err.value)


def _cases() -> Iterator[Any]:
    for case in CASES:
        yield pytest.param(case, id=case["kind"])


def test_corpus_size() -> None:
    """At least 25 kinds of bad input, across every reader, with unique names."""
    kinds = [c["kind"] for c in CASES]
    assert len(kinds) == len(set(kinds)) >= 25
    readers = {c["reader"].split(":")[0] for c in CASES}
    assert readers >= {*RECORD_READERS, "benchmark", "vqa_images", "cli"}
    verbs = {c["argv"][0] for c in CASES if c["reader"] == "cli"}
    assert verbs >= {"select", "score-vqa", "score-chat", "win-rate", "fit"}
    for case in CASES:
        if not case["file"].startswith("@"):
            assert (CORPUS / case["file"]).is_file(), case["file"]


@pytest.mark.parametrize("case", _cases())
def test_bad_input_names_file_and_record(
    case: dict[str, Any], tmp_path: Path, processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # configs write relative to the working folder
    path = _file(case, tmp_path)
    msg = _run(case, path, tmp_path, processor)
    assert path.name in msg, f"the message does not name the file: {msg}"
    assert _where(case, path) in msg, f"the message does not locate the record: {msg}"
    for fragment in case.get("expect", []):
        assert fragment in msg, f"{fragment!r} not in: {msg}"
    out = tmp_path / "out"
    assert not out.exists() or _files(out) == [], "output left behind"
    if case.get("skip"):
        report = _read(case["reader"], path, "skip", processor)
        assert report.skipped_by_reason.get(case["skip"]) == 1, report.as_dict()
        assert report.n_skipped == 1


@pytest.mark.parametrize("case", [c for c in _cases() if c.values[0].get("process")])
def test_bad_input_in_a_process(
    case: dict[str, Any], tmp_path: Path, fork_server: ForkServer
) -> None:
    """``python -m biomedvital``: non-zero exit, one ``biomedvital: error:`` line, no traceback,
    nothing in the output folder."""
    path = _file(case, tmp_path)
    log = tmp_path / "log.txt"
    rc = fork_server.run(_argv(case, path, tmp_path), tmp_path, log)
    text = log.read_text()
    assert rc == (2 if case["kind"].startswith("config_") else 1), text
    errors = [line for line in text.splitlines() if line.startswith("biomedvital: error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    assert path.name in errors[0] and _where(case, path) in errors[0], text
    out = tmp_path / "out"
    assert not out.exists() or _files(out) == []
