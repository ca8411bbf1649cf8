"""The grid plan's cost estimates (biomedvital.grid_costs): each paper grid's plan lists every
cell with its commands and estimates; dollars come from the stage's configured prices, GPU-hours
from the committed bench result; the sizes a grid assumes are the ones measured on real files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from biomedvital.grid import cell_names, format_plan, load_grid, plan_grid, stage_commands
from biomedvital.grid_costs import (
    THROUGHPUT,
    InputSize,
    cell_costs,
    judge_prompt_chars,
    load_throughput,
    measure,
    size_of,
    tuner_run_key,
)
from biomedvital.llm.keys import CHARS_PER_TOKEN

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PAPER_GRIDS = ("paper_w", "paper_topk", "paper_size")


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(REPO)
    return REPO


@pytest.mark.parametrize("name", PAPER_GRIDS)
def test_a_paper_grids_plan_lists_every_cell_its_commands_and_estimates(
    name: str, in_repo: Path, tmp_path: Path
) -> None:
    grid = Path("conf/grids") / f"{name}.yaml"
    spec = load_grid(grid)
    text = format_plan(grid, plan_grid(grid, str(tmp_path)), str(tmp_path))
    for need in spec["needs"]:  # the inputs a user provides, each with where to get it
        assert f"{need['path']}: {need['get']}" in text
    for cell in cell_names(spec):
        assert f"\n  {cell}  " in text
        for stage in stage_commands(grid, cell, str(tmp_path)):
            assert f"python -m biomedvital {stage['argv'][0]} " in text
            assert f"{tmp_path}/{name}/{cell}/" in text
    if name == "paper_w":  # the selector has no committed GPU measurement: said, not guessed
        assert "GPU: not estimated: no committed GPU measurement of fit" in text
        return
    bench = load_throughput(THROUGHPUT)
    assert text.count(f"tokens/s/GPU ({bench.card}, {bench.date}") == len(spec["cells"])
    assert text.count("API gpt-4o: 193 requests") == len(spec["cells"])
    assert "prices as of 2025-06-03" in text and "\n  to run: GPU ≈ " in text


def _topk_k10() -> list[dict]:
    return [{"stage": c["stage"], "argv": c["argv"]}
            for c in stage_commands(Path("conf/grids/paper_topk.yaml"), "k10")]  # fmt: skip


def _with_config(commands: list[dict], old: str, new: Path) -> list[dict]:
    return [{**c, "argv": [str(new) if a == old else a for a in c["argv"]]} for c in commands]


def test_dollars_follow_the_stages_prices_and_gpu_hours_the_committed_bench_file(
    in_repo: Path, tmp_path: Path
) -> None:
    """The judge's dollars are its tokens at conf/paper's prices; the tuner's GPU-hours are its
    tokens at the bench file's tokens/s/GPU for the matching run. Editing a copy of either file
    changes the estimate by exactly that much."""
    stated = load_grid(Path("conf/grids/paper_topk.yaml"))["estimates"]
    commands = _topk_k10()
    base = {c.stage: c for c in cell_costs(commands, stated, THROUGHPUT)}
    judge = yaml.safe_load(Path("conf/paper/judge.yaml").read_text())
    prices = judge["client"]["price_per_million"]
    tokens_in, tokens_out = base["chat_judge"].tokens
    want = (tokens_in * prices["input"] + tokens_out * prices["output"]) / 1e6
    assert base["chat_judge"].dollars == pytest.approx(want)
    assert f"as of {judge['client']['prices_as_of']}" in base["chat_judge"].text

    judge["client"]["price_per_million"] = {k: 3 * v for k, v in prices.items()}
    dearer = tmp_path / "judge.yaml"
    dearer.write_text(yaml.safe_dump(judge))
    costs = cell_costs(_with_config(commands, "conf/paper/judge.yaml", dearer), stated)
    assert costs[-1].dollars == pytest.approx(3 * want)
    del judge["client"]["prices_as_of"]
    dearer.write_text(yaml.safe_dump(judge))
    assert "(undated)" in cell_costs(_with_config(commands, "conf/paper/judge.yaml", dearer),
                                     stated)[-1].text  # fmt: skip

    bench = json.loads(THROUGHPUT.read_text())
    tuner = yaml.safe_load(Path("conf/paper/tuner.yaml").read_text())
    key = tuner_run_key(tuner)
    (run,) = [r for r in bench["runs"].values() if all(r[k] == v for k, v in key.items())]
    rate = run["tokens_per_s_per_gpu"]
    assert base["tune"].gpu_hours == pytest.approx(base["tune"].train_tokens / rate / 3600)
    run["tokens_per_s_per_gpu"] /= 2
    slower = tmp_path / "bench.json"
    slower.write_text(json.dumps(bench))
    costs = cell_costs(commands, stated, slower)
    assert costs[1].gpu_hours == pytest.approx(2 * base["tune"].gpu_hours)
    assert "tokens/s/GPU" not in cell_costs(commands, stated, tmp_path / "none.json")[1].text


def test_the_tuners_tokens_are_epochs_times_the_selected_records(in_repo: Path) -> None:
    """k % of the pool's records, each its text at CHARS_PER_TOKEN plus the image tokens, times
    the epochs; the records the grid assumes until the pool exists."""
    spec = load_grid(Path("conf/grids/paper_topk.yaml"))
    pool = spec["estimates"]["data/vital/candidates.jsonl"]
    tuner = yaml.safe_load(Path("conf/paper/tuner.yaml").read_text())
    bench = load_throughput(THROUGHPUT)
    per_record = bench.image_tokens + pool["text_chars"] / CHARS_PER_TOKEN
    for cell, k in (("k10", 10), ("k90", 90)):
        commands = stage_commands(Path("conf/grids/paper_topk.yaml"), cell)
        tune = cell_costs(commands, spec["estimates"])[1]
        tokens = tuner["trainer"]["max_epochs"] * pool["records"] * k / 100 * per_record
        rate = next(r for r in bench.runs if r["batch_size"] == 4 and r["size"] == "13b"
                    and r["checkpoint_every"] == 1)["tokens_per_s_per_gpu"]  # fmt: skip
        assert tune.gpu_hours == pytest.approx(tokens / rate / 3600)
        assert f"top {k} % of the pool (assumed)" in tune.text


def test_an_input_is_measured_once_it_exists(tmp_path: Path) -> None:
    """Until a file exists the grid's statement stands (and says so); then it is counted."""
    pool = tmp_path / "pool.jsonl"
    stated = {str(pool): {"records": 1000, "text_chars": 50.0}}
    assert size_of(str(pool), "conversation", {}, stated) == InputSize(1000, 50.0, "assumed")
    rows = [{"id": i, "conversations": [{"from": "human", "value": "ab"},
                                        {"from": "gpt", "value": "x" * i}]} for i in range(4)]  # fmt: skip
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert size_of(str(pool), "conversation", {}, stated) == InputSize(4, 3.5, "measured")
    written = {"out/selected.json": InputSize(7, 9.0, "top 10 %")}
    assert size_of("out/selected.json", "conversation", written, {}).records == 7


def test_the_judge_prompt_read_from_source_is_the_prompt_judge_builds() -> None:
    """The plan counts the judge's fixed text from its source (no torch import); the count is the
    length of what ``judge_messages`` sends, less the five fields it fills in."""
    from biomedvital.evaluation.judge import judge_messages

    fields = ("question?", "a caption", "a mention", "the reference", "the answer")
    for vision in (False, True):
        msgs = judge_messages(*fields, image_url="data:," if vision else None)
        sent = sum(len(m["content"]) if isinstance(m["content"], str)
                   else sum(len(p.get("text", "")) for p in m["content"]) for m in msgs)  # fmt: skip
        assert judge_prompt_chars(vision) == sent - sum(len(f) for f in fields)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_the_sizes_the_grids_assume_are_measured_on_the_released_files() -> None:
    """The conversation length the paper grids assume is the mean of BioMed-VITAL's released
    clinician-selected demonstrations; LLaVA-Med-Bench's is its question file's."""
    demos = measure(SHARED / "biomed-vital" / "doctor_few_shot_examples.json", "conversation")
    bench = measure(SHARED / "llava-med" / "llava_med_eval_qa50_qa.jsonl", "judge")
    for name in ("paper_topk", "paper_size"):
        stated = yaml.safe_load((REPO / "conf" / "grids" / f"{name}.yaml").read_text())["estimates"]
        for path, size in stated.items():
            want = bench if path.endswith("qa50_qa.jsonl") else demos
            assert size["text_chars"] == round(want.text_chars), (name, path)
        assert stated["/data/llava-med/llava_med_eval_qa50_qa.jsonl"]["records"] == bench.records


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lists_and_dry_runs_every_cell_of_a_paper_grid(tmp_path: Path) -> None:
    """``make list`` and ``make -n grid`` for GRID=paper_topk name every cell; the stand-in
    venv's python is this one, so nothing is installed."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (venv / ".installed").touch()
    args = ["make", "--no-print-directory", f"VENV={venv}", "GRID=paper_topk",
            f"GRID_ROOT={tmp_path / 'grids'}"]  # fmt: skip
    listed = subprocess.run([*args, "list"], cwd=REPO, capture_output=True, text=True, check=True)
    cells = list(load_grid(REPO / "conf" / "grids" / "paper_topk.yaml")["cells"])
    assert listed.stdout.split() == cells
    dry = subprocess.run([*args, "-n", "grid"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert "--plan true --check_needs true" in dry
    assert [c for c in cells if f"--cell {c}" in dry] == cells


PLACEHOLDER = re.compile(r"(?<!\w)([HTERPQID])(?!\w)")
NUMBER = r"[\d.,]+[kMB]?"


def _line_pattern(line: str) -> re.Pattern[str]:
    """An excerpt line as a pattern: ``…`` stands for anything, a lone capital for a figure."""
    parts = []
    for piece in line.split("…"):
        chunks = PLACEHOLDER.split(piece)
        parts.append("".join(NUMBER if i % 2 else re.escape(c) for i, c in enumerate(chunks)))
    return re.compile(".*".join(parts))


def test_the_plan_excerpt_in_the_docs_is_the_plan(in_repo: Path, tmp_path: Path) -> None:
    """docs/grids.md's plan excerpt for paper_topk: each line, in order, is a line the plan
    prints (``…`` elides, a letter stands for a figure); no figure is quoted there."""
    text = (REPO / "docs" / "grids.md").read_text(encoding="utf-8")
    block = re.search(r"```text\n(conf/grids/paper_topk\.yaml:.*?)```", text, re.S)
    assert block, "the paper_topk plan excerpt is missing from docs/grids.md"
    excerpt = [x for x in block.group(1).splitlines() if x.strip() != "…"]
    grid = Path("conf/grids/paper_topk.yaml")
    plan = format_plan(grid, plan_grid(grid, str(tmp_path)), str(tmp_path)).splitlines()
    at = 0
    for line in excerpt:
        pattern = _line_pattern(line)
        found = next((i for i in range(at, len(plan)) if pattern.fullmatch(plan[i])), None)
        assert found is not None, f"not in the plan (after line {at}): {line}"
        at = found + 1
    assert _line_pattern("GPU ≈ H h").fullmatch("GPU ≈ 1.7 h")
    assert not _line_pattern("GPU ≈ H h").fullmatch("GPU ≈ 1.7 days")
