"""``make grid`` reruns exactly the cells whose stages' identity changed: command, config file
contents, input files, library hash. Run through make in a temporary copy of the repository
(its own git checkout, package and MLflow store), on a cheap two-stage grid."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"]

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("git") is None, reason="needs make and git"
)

# select (a config, a cell overlay, input files) then select again from its output: a chain of
# cheap pipeline verbs (no torch to import), each rewriting its done file when it runs
GRID = {
    "stages": {
        "select": {
            "verb": "select",
            "config": ["conf/tiny/select.yaml"],
            "args": {"out": "{cell_dir}/selected"},
            "done": "{cell_dir}/selected/manifest.json",
        },
        "narrow": {
            "verb": "select",
            "args": {
                "scores": "data/tiny/scores.jsonl",
                "top_percent": 50,
                "candidates": "{cell_dir}/selected/selected.json",
                "out": "{cell_dir}/narrow",
            },
            "done": "{cell_dir}/narrow/manifest.json",
        },  # fmt: skip
    },
    "cells": {
        "a": {"select": {"config": ["conf/tiny/k50.yaml"]}},
        "b": {
            "select": {
                "config": ["conf/tiny/k25.yaml"],
                "args": {"scores": "data/tiny/scores_b.jsonl"},
            }
        },  # fmt: skip
        "c": {},
    },
}


def _copy_repo(dst: Path) -> None:
    """The repository's files as git would commit them (tracked and untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file() and not name.startswith(("tests/", "bench/", "mlruns/")):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def _write_inputs(repo: Path, candidates: Path) -> None:
    data = repo / "data" / "tiny"
    data.mkdir(parents=True)
    shutil.copy(candidates, data / "candidates.jsonl")
    ids = [json.loads(line)["id"] for line in candidates.read_text().splitlines()]
    for name, k in (("scores.jsonl", 37), ("scores_b.jsonl", 13)):
        (data / name).write_text("".join(
            json.dumps({"id": i, "score": (j * k % 11) / 10}) + "\n" for j, i in enumerate(ids)
        ))  # fmt: skip
    conf = repo / "conf" / "tiny"
    conf.mkdir(parents=True)
    (conf / "select.yaml").write_text(
        "scores: data/tiny/scores.jsonl\ncandidates: data/tiny/candidates.jsonl\ntop_percent: 100\n"
    )
    (conf / "k50.yaml").write_text("top_percent: 50\n")
    (conf / "k25.yaml").write_text("top_percent: 25\n")
    (repo / "conf" / "grids" / "tiny.yaml").write_text(yaml.safe_dump(GRID, sort_keys=False))


@pytest.fixture
def repo(tmp_path: Path, pool: dict[str, Path]) -> Path:
    """A committed copy of the repository with the tiny grid, and a stand-in venv whose python
    is this one (nothing installed)."""
    root = tmp_path / "repo"
    _copy_repo(root)
    _write_inputs(root, pool["candidates"])
    venv = root / ".venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (venv / ".installed").touch()
    subprocess.run([*GIT, "init", "-q"], cwd=root, check=True)
    subprocess.run([*GIT, "add", "."], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "copy"], cwd=root, check=True)
    return root


def _make(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    env["PYTHONPATH"] = str(repo)  # the copy's package, whatever the caller's path
    proc = subprocess.run(
        ["make", "--no-print-directory", *args, "GRID=tiny"],
        cwd=repo, capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


DONE = ("selected/manifest.json", "narrow/manifest.json")  # each stage's done file


def _written(repo: Path) -> dict[str, tuple]:
    """When each cell's stages last wrote their done files (a stage that runs rewrites it)."""
    out = {}
    for cell in GRID["cells"]:
        folder = repo / "outputs" / "grids" / "tiny" / cell
        if (folder / DONE[0]).is_file():
            out[cell] = tuple((folder / d).stat().st_mtime_ns for d in DONE)
    return out


def _grid(repo: Path) -> tuple[set[str], str]:
    """``make grid``; the cells whose stages ran (done files rewritten), checked against the
    cells make entered, and make's output."""
    before = _written(repo)
    proc = _make(repo, "grid")
    after = _written(repo)
    ran = {c for c in after if before.get(c) != after[c]}
    entered = set(re.findall(r"grid --grid \S+ .*--cell (\S+)", proc.stdout))
    assert entered == ran, proc.stdout
    for cell in ran:  # a cell that runs, runs all its stages after the first changed one
        assert all(
            a != b for a, b in zip(before.get(cell, (None, None)), after[cell], strict=True)
        ), cell
    return ran, proc.stdout + proc.stderr


def _kept(repo: Path, cell: str) -> int:
    folder = repo / "outputs" / "grids" / "tiny" / cell / "selected"
    return json.loads((folder / "manifest.json").read_text())["kept"]


@pytest.mark.heavy
def test_make_grid_reruns_exactly_the_cells_whose_identity_changed(repo: Path) -> None:
    n_all = len((repo / "data" / "tiny" / "candidates.jsonl").read_text().splitlines())
    ran, _ = _grid(repo)
    assert ran == {"a", "b", "c"}
    assert (_kept(repo, "a"), _kept(repo, "c")) == (n_all // 2, n_all)

    # unchanged: nothing runs; a commit outside the package (docs) leaves every cell current
    ran, out = _grid(repo)
    assert ran == set() and "nothing to run" in out
    (repo / "docs").mkdir(exist_ok=True)
    (repo / "docs" / "note.md").write_text("A note.\n")
    subprocess.run([*GIT, "add", "docs"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "docs"], cwd=repo, check=True)
    assert "3 cells, 0 to run (3 current)" in _make(repo, "plan").stdout

    # an overlay one cell reads: that cell, both its stages; the plan (printed first) says why
    (repo / "conf" / "tiny" / "k50.yaml").write_text("top_percent: 75\n")
    ran, out = _grid(repo)
    assert ran == {"a"} and _kept(repo, "a") == n_all * 3 // 4
    assert re.search(r"\n  a +stale +select: config conf/tiny/k50.yaml changed; then narrow", out)
    assert re.search(r"\n  b +current", out) and "1 to run" in out, out

    # an input file one cell reads (its manifest hashed it)
    scores_b = repo / "data" / "tiny" / "scores_b.jsonl"
    scores_b.write_text(scores_b.read_text().replace('"score": 0.0', '"score": 0.05'))
    ran, out = _grid(repo)
    assert ran == {"b"}
    assert re.search(
        r"\n  b +stale +select: input data/tiny/scores_b.jsonl changed; then narrow", out
    )

    # a changed line in the library, not committed: every cell
    losses = repo / "biomedvital" / "selection" / "losses.py"
    losses.write_text(losses.read_text().replace('"""', '"""Pair losses. ', 1))
    ran, out = _grid(repo)
    assert ran == {"a", "b", "c"}
    stale = re.findall(
        r"(?m)^  (\w) +stale +select: library changed \(\w+ → \w+\); then narrow$", out
    )
    assert stale == ["a", "b", "c"], out
    assert "3 to run (3 stale)" in out, out


# -- in-process: identity parts, reuse_stale, the report's provenance --------------------------


def _select_grid(tmp_path: Path, pool: dict[str, Path]) -> tuple[Path, Path]:
    """select (its base config names the scores) then win-rate, cells k50 and k100; the grid
    file and that config."""
    ids = [json.loads(line)["id"] for line in pool["candidates"].read_text().splitlines()]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"id": i, "score": (k * 37 % 11) / 10}) + "\n"
                              for k, i in enumerate(ids)))  # fmt: skip
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text("".join(
        json.dumps({"question_id": q, "order": o, "verdict": f"[[{v}]]"}) + "\n"
        for q in range(6) for o, v in (("ab", "A"), ("ba", "B" if q % 3 else "A"))
    ))  # fmt: skip
    store = str(tmp_path / "mlruns")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"scores": str(scores), "candidates": str(pool["candidates"]),
                                    "store": store}))  # fmt: skip
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({
        "stages": {
            "select": {"verb": "select", "config": [str(base)],
                       "args": {"out": "{cell_dir}/selected"},
                       "done": "{cell_dir}/selected/manifest.json"},
            "judge": {"verb": "win-rate", "done": "{cell_dir}/win.json", "args": {
                "verdicts": str(verdicts), "out": "{cell_dir}/win.json", "store": store,
                "n_boot": 50}},
        },
        "cells": {"k50": {"select": {"args": {"top_percent": 50}}}, "k100": {}},
    }))  # fmt: skip
    return grid, base


def _report(tmp_path: Path, grid: Path, *args: str) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", REPO / "experiments" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    out = tmp_path / "reports"
    report.main(["--grid", grid.stem, "--store", str(tmp_path / "mlruns"), "--out", str(out),
                 "--grid_file", str(grid), "--grid_root", str(tmp_path / "grids"), *args])  # fmt: skip
    return out


def test_identity_covers_configs_named_inside_configs_and_inputs_outside_own_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from biomedvital.grid_identity import config_files, file_state, recorded_inputs

    monkeypatch.chdir(tmp_path)
    Path("inner.yaml").write_text("a: 1\n")
    Path("outer.yaml").write_text("nested: {file: inner.yaml}\nother: not_a_file.yaml\n")
    Path("arg.yml").write_text("b: 2\n")
    argv = ["fit", "--config", "outer.yaml", "--x", "arg.yml", "--y", '["inner.yaml"]']
    assert config_files(argv) == ["outer.yaml", "arg.yml", "inner.yaml"]

    Path("in.jsonl").write_text("x\n")
    Path("bench").mkdir()
    (Path("bench") / "p0.parquet").write_text("0")
    Path("out").mkdir()
    Path("out/preds.jsonl").write_text("p\n")
    good = file_state("in.jsonl")
    manifest = Path("out/scores.json")
    manifest.write_text(json.dumps({
        "data": {"path": str(tmp_path / "in.jsonl"), "sha256": good["sha256"]},  # kept relative
        "bench": {"path": "bench", "files": ["p0.parquet"], "sha256": "joint"},
        "predictions": {"path": "out/preds.jsonl", "sha256": "x" * 64},  # its own output
    }))  # fmt: skip
    inputs = recorded_inputs([manifest], [Path("out")])
    assert sorted(inputs) == ["bench/p0.parquet", "in.jsonl"]
    assert inputs["in.jsonl"] == good
    # a file edited while the stage ran keeps the stage's hash, without the stat shortcut
    Path("in.jsonl").write_text("edited\n")
    assert recorded_inputs([manifest], [Path("out")])["in.jsonl"] == {"sha256": good["sha256"]}


def test_reuse_stale_keeps_a_cell_and_the_report_marks_it(
    tmp_path: Path, pool: dict[str, Path]
) -> None:
    """A config edit makes both cells stale; --reuse_stale keeps k50 (named in its cell.json,
    its old record kept, so a plain run reruns it), the report marks it and will not publish;
    once rerun, the report is published with the one library hash and the run days."""
    from biomedvital.grid import plan_cell, run_cell
    from biomedvital.tracking.mlflow import PipelineRun
    from biomedvital.tracking.provenance import library_hash

    grid, base = _select_grid(tmp_path, pool)
    root = str(tmp_path / "grids")
    for cell in ("k50", "k100"):
        run_cell(grid, cell, root)
    assert plan_cell(grid, "k50", root).state == "current"
    base.write_text(base.read_text() + "top_n: null\n")
    plan = plan_cell(grid, "k50", root, reuse_stale=True)
    assert (plan.state, plan.to_run) == ("reused", True)
    record = run_cell(grid, "k50", root, reuse_stale=True)
    assert record["reused_stale"] == {"select": [f"config {base} changed"]}
    assert [s["ran"] for s in record["stages"]] == [False, False]
    assert plan_cell(grid, "k50", root).state == "stale"  # the old record stayed

    out = _report(tmp_path, grid)
    rows = {r["cell"]: r for r in csv.DictReader((out / "g" / "table.csv").open())}
    assert rows["k50"]["status"] == f"stale (kept by --reuse_stale): select: config {base} changed"
    assert rows["k100"]["status"].startswith("stale: select: config")
    assert "**Not current**" in (out / "g" / "table.md").read_text()
    with pytest.raises(SystemExit, match="made of current cells only"):
        _report(tmp_path, grid, "--publish", "true")

    for cell in ("k50", "k100"):
        run_cell(grid, cell, root)
    out = _report(tmp_path, grid, "--publish", "true")
    published = out / "published" / "g"
    rows = list(csv.DictReader((published / "table.csv").open()))
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert {(r["status"], r["library"], r["runs"]) for r in rows} == {
        ("current", library_hash(), today)
    }
    record = json.loads((published / "report.json").read_text())
    assert record["libraries"] == {library_hash(): ["k50", "k100"]} and not record["mixed"]
    assert f"library `{library_hash()}`" in (published / "table.md").read_text().splitlines()[0]

    # a run logged outside the grid with a cell's tags (a manual rerun) is what a report reads:
    # the status says these are not the runs the cell recorded
    tags = {"grid": "g", "cell": "k100", "base_cell": "k100", "stage": "select"}
    with PipelineRun("selection", "select", str(tmp_path / "mlruns"), tags):
        pass
    assert _status(tmp_path, grid, "k100").startswith("current, but the latest runs in the store")


def test_report_refuses_mixed_library_hashes_unless_allowed(tmp_path: Path) -> None:
    from biomedvital.tracking.mlflow import PipelineRun

    grid = tmp_path / "m.yaml"
    grid.write_text("verb: fit\nbase: []\nseeds: [0, 1]\ncells: {a: [], b: []}\n")
    store = str(tmp_path / "mlruns")
    for cell, seed, lib in (("a", 0, "aaaa"), ("a", 1, "aaaa"), ("b", 0, "aaaa"), ("b", 1, "bbbb")):
        tags = {"grid": "m", "cell": f"{cell}-s{seed}", "base_cell": cell, "seed": str(seed),
                "stage": "fit", "library_hash": lib}  # fmt: skip
        with PipelineRun("selection", "fit", store, tags) as run:
            run.log_metrics({"val/align_rate": 0.5 + seed / 10 + (cell == "b") / 5})
    with pytest.raises(
        SystemExit, match=r"2 library hashes:\n  aaaa: a-s0, a-s1, b-s0\n  bbbb: b-s1"
    ):
        _report(tmp_path, grid)
    out = _report(tmp_path, grid, "--allow_mixed", "true")
    summary = (out / "m" / "summary.md").read_text()
    assert (
        "**Mixed library hashes** (made with --allow_mixed true): `aaaa`: a-s0, a-s1, b-s0; `bbbb`: b-s1"
        in summary
    )  # noqa: E501
    rows = {r["cell"]: r for r in csv.DictReader((out / "m" / "summary.csv").open())}
    assert (rows["a"]["library"], rows["b"]["library"]) == ("aaaa", "aaaa+bbbb")
    diffs = list(csv.DictReader((out / "m" / "differences.csv").open()))
    (d,) = [x for x in diffs if x["metric"] == "val/align_rate"]
    assert d["comparison"] == "b/a/val/align_rate" and float(d["diff"]) == pytest.approx(0.2)
    assert float(d["se"]) == pytest.approx(0.1 / 2**0.5)  # sd 0.1/sqrt(2) each, 2 seeds each
    assert d["exceeds_2se"] == "yes"


@pytest.mark.slow
def test_make_report_mixed_libraries_and_publishing(repo: Path) -> None:
    """Through make: a report refuses cells of two library hashes (one cell rerun after a code
    edit), says so with ALLOW_MIXED=true and will not publish them; once the grid is rerun,
    PUBLISH=true writes the committable copy, whose figure a doc can cite."""
    spec = yaml.safe_load((repo / "conf" / "grids" / "tiny.yaml").read_text())
    verdicts = repo / "data" / "tiny" / "verdicts.jsonl"
    verdicts.write_text("".join(
        json.dumps({"question_id": q, "order": o, "verdict": f"[[{v}]]"}) + "\n"
        for q in range(6) for o, v in (("ab", "A"), ("ba", "B" if q % 3 else "A"))
    ))  # fmt: skip
    spec["stages"]["judge"] = {
        "verb": "win-rate",
        "args": {"verdicts": str(verdicts.relative_to(repo)), "out": "{cell_dir}/win.json",
                 "n_boot": 50, "seed": 0, "store": "mlruns"},
        "done": "{cell_dir}/win.json",
    }  # fmt: skip
    (repo / "conf" / "grids" / "tiny.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    _make(repo, "grid")
    report = _make(repo, "report").stdout
    assert "win_rate_half_ties" in report and "library" in report

    losses = repo / "biomedvital" / "selection" / "losses.py"
    losses.write_text(losses.read_text().replace('"""', '"""Pair losses. ', 1))
    _make(repo, "outputs/grids/tiny/a/cell.json")  # one cell rerun with the edited library
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    refused = subprocess.run(
        ["make", "--no-print-directory", "report", "GRID=tiny"],
        cwd=repo, capture_output=True, text=True, check=False, env={**env, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert refused.returncode != 0 and "2 library hashes" in refused.stderr, refused.stderr
    mixed = repo / "experiments" / "reports" / "tiny" / "table.md"
    _make(repo, "report", "ALLOW_MIXED=true")
    assert "**Mixed library hashes**" in mixed.read_text()
    assert "| stale: select: library changed" in mixed.read_text()  # b's and c's status

    _make(repo, "grid")
    out = _make(repo, "report", "PUBLISH=true").stdout
    published = repo / "experiments" / "reports" / "published" / "tiny"
    assert "written to experiments/reports/published/tiny/" in out
    row = next(r for r in csv.DictReader((published / "table.csv").open()) if r["cell"] == "a")
    status = subprocess.run(["git", "status", "--porcelain", "--ignored", "-uall", "experiments"],
                            cwd=repo, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "?? experiments/reports/published/tiny/table.csv" in status  # committable
    assert "!! experiments/reports/tiny/table.csv" in status  # the scratch copy stays ignored
    doc = repo / "docs" / "results.md"
    doc.parent.mkdir(exist_ok=True)
    rate = float(row["win_rate_half_ties"])
    doc.write_text(f"Cell a wins [{rate:.1f} %](../experiments/reports/published/tiny/table.csv"
                   f"#a:win_rate_half_ties) of 6 questions.\n")  # fmt: skip
    subprocess.run([*GIT, "add", "experiments/reports/published", "docs"], cwd=repo, check=True)
    check = subprocess.run([sys.executable, "experiments/quoted.py"], cwd=repo,
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert check.returncode == 0 and "0 mismatch(es)" in check.stdout, check.stdout
    doc.write_text(doc.read_text().replace(f"[{rate:.1f} %]", f"[{rate + 1:.1f} %]"))
    check = subprocess.run([sys.executable, "experiments/quoted.py"], cwd=repo,
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert check.returncode == 1 and "1 mismatch(es)" in check.stdout, check.stdout
    assert f"docs/results.md:1: [{rate + 1:.1f} %]: the report says {rate}" in check.stdout


def test_a_cell_finished_before_identities_were_recorded_is_stale(tmp_path: Path) -> None:
    """A stages.json of command lines only (the earlier format) says nothing of the code or
    configs the cell ran with: the plan marks the cell stale, and says why."""
    from biomedvital.grid import STAGES_FILE, plan_cell, stage_commands

    grid = tmp_path / "g.yaml"
    stages = {
        "s": {
            "verb": "select",
            "done": "{cell_dir}/out/manifest.json",
            "args": {"scores": "s.jsonl", "candidates": "c.jsonl", "out": "{cell_dir}/out"},
        }
    }
    grid.write_text(yaml.safe_dump({"stages": stages, "cells": {"a": {}}}))  # fmt: skip
    root = str(tmp_path / "grids")
    (stage,) = stage_commands(grid, "a", root)
    Path(stage["done"]).parent.mkdir(parents=True)
    Path(stage["done"]).write_text("{}")
    (Path(root) / "g" / "a" / STAGES_FILE).write_text(json.dumps({"s": stage["argv"]}))
    plan = plan_cell(grid, "a", root)
    assert plan.state == "stale" and plan.to_run
    assert plan.why() == "s: finished before stage identities were recorded (command only)"


def _status(tmp_path: Path, grid: Path, cell: str) -> str:
    out = _report(tmp_path, grid)
    return next(
        r for r in csv.DictReader((out / grid.stem / "table.csv").open()) if r["cell"] == cell
    )["status"]


def test_a_stage_after_one_that_reruns_keeps_no_record_until_it_finishes_again(
    tmp_path: Path, pool: dict[str, Path]
) -> None:
    """select's config changes, select reruns, then narrow (which reads select's output) fails:
    narrow's record of its previous run is gone, so the next run cannot take narrow's old
    output, made from select's old one, for current."""
    from biomedvital.grid import STAGES_FILE, plan_cell, run_cell

    grid, base = _select_grid(tmp_path, pool)
    spec = yaml.safe_load(grid.read_text())
    spec["stages"] = {"select": spec["stages"]["select"], "narrow": {
        "verb": "select", "done": "{cell_dir}/narrow/manifest.json",
        "args": {"scores": yaml.safe_load(base.read_text())["scores"], "top_percent": 50,
                 "candidates": "{cell_dir}/selected/selected.json", "out": "{cell_dir}/narrow",
                 "store": str(tmp_path / "mlruns")}}}  # fmt: skip
    spec["cells"] = {"k100": {}}
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))  # stages run in file order
    root = str(tmp_path / "grids")
    run_cell(grid, "k100", root)
    folder = tmp_path / "grids" / "g" / "k100"
    base.write_text(base.read_text() + "top_percent: 60\n")
    (folder / "narrow" / "selected.json").unlink()
    (folder / "narrow" / "selected.json").mkdir()  # narrow cannot write its output
    with pytest.raises(SystemExit, match="stage 'narrow' failed"):
        run_cell(grid, "k100", root)
    assert list(json.loads((folder / STAGES_FILE).read_text())["stages"]) == ["select"]
    (folder / "narrow" / "selected.json").rmdir()
    plan = plan_cell(grid, "k100", root)
    assert [s.action for s in plan.stages] == ["current", "run"]
    assert plan.why() == "narrow: no record of what it ran with"
