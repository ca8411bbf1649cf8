"""A grid runs its cells into their own folders, tagged in MLflow; the report collects them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from biomedvital.cli import main
from biomedvital.grid import GridError, cell_names, load_grid, stage_commands

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "selection"))
from test_selector_cli import _config  # noqa: E402


@pytest.mark.heavy
def test_grid_cells_and_report(tmp_path: Path, pool: dict[str, Path], capsys) -> None:
    base = _config(tmp_path, pool)
    grid = tmp_path / "wtiny.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "verb": "fit",
                "base": [str(base)],
                "cells": {
                    c: [str(REPO / "conf" / "ablation" / f"{c}.yaml")] for c in ("w0", "w10")
                },
            }
        )
    )
    main(["grid", "--grid", str(grid)])
    assert capsys.readouterr().out.split() == ["w0", "w10"]
    for cell in ("w0", "w10"):
        main(["grid", "--grid", str(grid), "--cell", cell, "--out_root", str(tmp_path / "grids")])
        folder = tmp_path / "grids" / "wtiny" / cell
        assert (folder / "run.fit.json").is_file() and (
            folder / "checkpoints" / "last.ckpt"
        ).is_file()
        assert yaml.safe_load((folder / "config.fit.yaml").read_text())["model"]["init_args"][
            "w"
        ] == float(cell[1:])

    out = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "report.py"), "--grid", "wtiny",
         "--store", str(tmp_path / "mlruns"), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "wtiny" / "table.csv").open()))
    assert [r["cell"] for r in rows] == ["w0", "w10"]
    assert all(0.0 <= float(r["val/align_rate"]) <= 1.0 for r in rows)
    png = (out / "wtiny" / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.heavy
def test_seed_replicates_of_a_selector_fit_differ(tmp_path: Path, pool: dict[str, Path]) -> None:
    """The default ``seed_args`` (``seed_everything``) reach the selector: its ``init_seed``
    and data ``seed`` follow the global seed unless pinned, so replicates are not copies."""
    import torch

    grid = tmp_path / "seeded.yaml"
    grid.write_text(
        yaml.safe_dump({"verb": "fit", "base": [str(_config(tmp_path, pool))],
                        "seeds": [0, 1], "cells": {"a": []}})
    )  # fmt: skip
    root = tmp_path / "grids"
    weights, seeds = [], []
    for cell in ("a-s0", "a-s1"):
        main(["grid", "--grid", str(grid), "--cell", cell, "--out_root", str(root)])
        folder = root / "seeded" / cell
        ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        weights.append(ckpt["state_dict"])
        seeds.append(
            (
                ckpt["hyper_parameters"]["init_seed"],
                json.loads((folder / "run.fit.json").read_text())["data"]["seed"],
            )
        )
    assert seeds == [(0, 0), (1, 1)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _chain_grid(tmp_path: Path, pool: dict[str, Path]) -> Path:
    """select -> win-rate per cell, seeds as an axis: cheap pipeline stages, real verbs."""
    ids = [json.loads(line)["id"] for line in pool["candidates"].read_text().splitlines()]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"id": i, "score": (k * 37 % 11) / 10}) + "\n"
                              for k, i in enumerate(ids)))  # fmt: skip
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text("".join(
        json.dumps({"question_id": q, "order": o, "verdict": f"[[{v}]]"}) + "\n"
        for q in range(12) for o, v in (("ab", "A"), ("ba", "B" if q % 3 else "A"))
    ))  # fmt: skip
    store = str(tmp_path / "mlruns")
    grid = tmp_path / "chain.yaml"
    grid.write_text(yaml.safe_dump({
        "stages": {
            "select": {"verb": "select", "done": "{cell_dir}/selected/manifest.json", "args": {
                "scores": str(scores), "candidates": str(pool["candidates"]),
                "out": "{cell_dir}/selected", "store": store}},
            "judge": {"verb": "win-rate", "done": "{cell_dir}/win.json", "args": {
                "verdicts": str(verdicts), "out": "{cell_dir}/win.json", "store": store,
                "seed": "{seed}", "n_boot": 200}},
        },
        "seeds": [0, 1],
        "cells": {"k50": {"select": {"args": {"top_percent": 50}}}, "k100": {}},
    }, sort_keys=False))  # fmt: skip
    return grid


@pytest.mark.heavy
def test_grid_chain_seeds_resume_and_report(tmp_path: Path, pool: dict[str, Path], capsys) -> None:
    grid = _chain_grid(tmp_path, pool)
    main(["grid", "--grid", str(grid)])
    cells = capsys.readouterr().out.split()
    assert cells == ["k50-s0", "k50-s1", "k100-s0", "k100-s1"]
    root = tmp_path / "grids"
    for cell in cells:
        main(["grid", "--grid", str(grid), "--cell", cell, "--out_root", str(root)])
    n_all = len(pool["candidates"].read_text().splitlines())
    kept = json.loads((root / "chain" / "k50-s0" / "selected" / "manifest.json").read_text())
    assert kept["kept"] == n_all // 2
    record = json.loads((root / "chain" / "k50-s1" / "cell.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["select", "judge"]
    assert all(s["ran"] for s in record["stages"])
    # a rerun resumes: every stage is done, nothing runs again
    main(["grid", "--grid", str(grid), "--cell", "k50-s1", "--out_root", str(root)])
    record = json.loads((root / "chain" / "k50-s1" / "cell.json").read_text())
    assert not any(s["ran"] for s in record["stages"])

    out = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "report.py"), "--grid", "chain",
         "--store", str(tmp_path / "mlruns"), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "chain" / "table.csv").open()))
    assert sorted((r["cell"], r["seed"]) for r in rows) == sorted(
        (c, c[-1]) for c in cells
    )  # every cell's runs found through its grid/cell/seed tags
    summary = list(csv.DictReader((out / "chain" / "summary.csv").open()))
    assert [r["cell"] for r in summary] == ["k50", "k100"] and {r["n"] for r in summary} == {"2"}
    # 8 of 12 questions won in both orders, 4 split by position (a win, then a loss) -> ties
    assert float(summary[0]["win_rate_half_ties"]) == pytest.approx(100 * (8 + 4 / 2) / 12)
    png = (out / "chain" / "winrate.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_grid_stage_failure_stops_the_cell(tmp_path: Path, pool: dict[str, Path]) -> None:
    grid = _chain_grid(tmp_path, pool)
    spec = yaml.safe_load(grid.read_text())
    spec["cells"] = {"bad": {"select": {"args": {"top_percent": 0}}}}
    spec.pop("seeds")
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SystemExit, match="stage 'select' failed"):
        main(["grid", "--grid", str(grid), "--cell", "bad", "--out_root", str(tmp_path / "g")])
    assert not (tmp_path / "g" / "chain" / "bad" / "cell.json").exists()
    assert not (tmp_path / "g" / "chain" / "bad" / "win.json").exists()  # later stages never ran


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": 1}, "unknown key"),
        ({"cells": {"a": {"nope": {}}}}, "unknown stage"),
        ({"cells": {"a": {"select": {"argz": {}}}}}, "use 'config' and 'args'"),
        ({"seeds": ["x"]}, "list of integers"),
        ({"verb": "fit"}, "either 'verb'"),
    ],
)
def test_grid_file_errors(
    tmp_path: Path, pool: dict[str, Path], change: dict, message: str
) -> None:
    grid = _chain_grid(tmp_path, pool)
    spec = {**yaml.safe_load(grid.read_text()), **change}
    grid.write_text(yaml.safe_dump(spec))
    with pytest.raises(GridError, match=message):
        load_grid(grid)


def test_grid_stage_without_done_file(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"stages": {"s": {"verb": "select"}}, "cells": {"a": {}}}))
    with pytest.raises(GridError, match="needs a 'done' file"):
        load_grid(grid)


def test_cell_tags_go_to_the_verbs_that_log_runs(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    stages = {
        "gen": {"verb": "generate", "config": ["conf/demo/generate.yaml"], "done": "{cell_dir}/g"},
        "bench": {"verb": "demo-vqa", "args": {"out": "{cell_dir}/q.json"}, "done": "{cell_dir}/q"},
        "chat": {"verb": "score-chat", "args": {"reviews": "r.jsonl"}, "done": "{cell_dir}/c"},
    }
    grid.write_text(yaml.safe_dump({"stages": stages, "cells": {"a": {}}}))
    argvs = {s["stage"]: s["argv"] for s in stage_commands(grid, "a")}
    assert "--tags.cell" in argvs["gen"] and "--tags.cell" in argvs["chat"]
    assert not any(a.startswith("--tags") for a in argvs["bench"])  # demo-vqa logs no run
    gen = argvs["gen"]
    assert gen[gen.index("--tags.stage") + 1] == "gen"


def test_repository_grids_expand(monkeypatch: pytest.MonkeyPatch) -> None:
    # every grid in conf/grids/ loads, and each cell's stages write under its own folder
    monkeypatch.chdir(REPO)
    for path in sorted(Path("conf/grids").glob("*.yaml")):
        spec = load_grid(path)
        for cell in cell_names(spec):
            for stage in stage_commands(path, cell):
                assert stage["done"].startswith(f"outputs/grids/{path.stem}/{cell}/")
    assert len(cell_names(load_grid(Path("conf/grids/preference_source.yaml")))) == 15
    topk = stage_commands(Path("conf/grids/topk.yaml"), "k10")
    assert [s["stage"] for s in topk] == ["select", "tune", "test", "judge", "chat", "chat_judge"]
    chat = topk[5]["argv"]  # the judge's config, then this cell's answers and folder
    assert chat[:3] == ["judge", "--config", "conf/demo/judge.yaml"]
    assert chat[chat.index("--answers") + 1] == "outputs/grids/topk/k10/chat/predictions.jsonl"
    assert "local-dir:outputs/grids/topk/k10/tuner/export/merged" in topk[2]["argv"]
    judge = topk[3]["argv"]  # the judge's endpoint goes in pairwise's client block
    assert judge[judge.index("--client.base_url") + 1] == "local:smollm2"
    assert "--base_url" not in judge and "--model" not in judge


def test_report_reads_pairwise_runs(tmp_path: Path) -> None:
    """``pairwise`` logs ``pairwise/win_rate_*``: the report files it beside ``win-rate``'s."""
    import importlib.util

    from biomedvital.tracking.mlflow import PipelineRun

    spec = importlib.util.spec_from_file_location("report", REPO / "experiments" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    store = str(tmp_path / "mlruns")
    for cell, rate in (("k10", 40.0), ("k100", 55.0)):
        tags = {"grid": "pw", "cell": cell, "base_cell": cell, "stage": "judge"}
        with PipelineRun("evaluation", "pairwise", store, tags) as run:
            run.log_metrics({"pairwise/win_rate_half_ties": rate,
                             "pairwise/win_rate_half_ties_ci_low": rate - 10,
                             "pairwise/win_rate_half_ties_ci_high": rate + 10,
                             "pairwise/n": 12, "pairwise/position_consistency": 75.0})  # fmt: skip
        tags = {**tags, "stage": "chat"}  # a judge stage: LLaVA-Med-Bench relative score
        with PipelineRun("evaluation", "judge", store, tags) as run:
            run.log_metrics({"judge/relative_mean_of_ratios": rate + 1, "judge/reviewed": 30})
    rows = sorted(report.collect("pw", store), key=lambda r: report._order(r["cell"]))
    assert [(r["cell"], r["win_rate_half_ties"]) for r in rows] == [("k10", 40.0), ("k100", 55.0)]
    assert rows[0]["position_consistency"] == 75.0  # how far the judge's verdicts can be read
    # runs beyond one page of results (MLflow returns 1,000 at most per call) are read too
    assert report.collect("pw", store, page_size=1) == report.collect("pw", store)
    assert [r["judge/relative_mean_of_ratios"] for r in rows] == [41.0, 56.0]
    assert "judge/reviewed" not in rows[0]
    out = tmp_path / "out"
    out.mkdir()
    assert "winrate.png" in report.plot(rows, "pw", out)
    report.write_table(rows, ["cell", *report.metric_columns(rows)], out)
    assert "judge/relative_mean_of_ratios" in (out / "table.md").read_text().splitlines()[0]


def test_a_credential_in_a_grid_stays_out_of_cell_json(tmp_path: Path) -> None:
    """A grid naming an endpoint URL with a password and a key in its query: the stage runs with
    it, but ``cell.json`` (and the printed command line, from the same masked list) shows it
    masked, as the verbs' own logs do. The stage's output exists and ``reuse_stale`` keeps it
    (it has no record of what it ran with), so nothing runs."""
    import json

    from biomedvital.grid import run_cell

    url = "https://alice:s3cret@llm.example.org/v1?api-key=abc123"
    grid = tmp_path / "g.yaml"
    stages = {"gen": {"verb": "generate", "args": {"client.base_url": url}, "done": "{cell_dir}/g"}}
    grid.write_text(yaml.safe_dump({"stages": stages, "cells": {"a": {}}}))
    (stage,) = stage_commands(grid, "a", str(tmp_path / "out"))
    assert url in stage["argv"]  # what the stage runs with
    Path(stage["done"]).parent.mkdir(parents=True)
    Path(stage["done"]).write_text("done")
    run_cell(grid, "a", str(tmp_path / "out"), reuse_stale=True)
    written = (tmp_path / "out" / "g" / "a" / "cell.json").read_text()
    assert "s3cret" not in written and "abc123" not in written
    assert (
        "https://alice:***@llm.example.org/v1?api-key=***"
        in json.loads(written)["stages"][0]["argv"]
    )


def _resolved(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    with pytest.raises(SystemExit):
        main([*argv, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def _model_and_data(cfg: dict) -> dict:
    """What a selector cell trains: model and data arguments and the run's seed (not its
    folder, logger tags or run name, which differ per cell by construction)."""
    return {
        "model": cfg["model"]["init_args"],
        "data": cfg["data"]["init_args"],
        "seed": cfg["seed_everything"],
    }


def _leaf_diff(a: dict, b: dict, path: str = "") -> dict:
    out = {}
    for k in set(a) | set(b):
        x, y, p = a.get(k), b.get(k), f"{path}.{k}" if path else k
        out |= (
            _leaf_diff(x, y, p)
            if isinstance(x, dict) and isinstance(y, dict)
            else ({} if x == y else {p: y})
        )
    return out


def test_repository_selector_grids_resolve_to_the_intended_cells(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each cell of the selector grids, resolved through the CLI, differs from the grid's
    reference cell in exactly the switch it names, and no two cells train the same thing."""
    monkeypatch.chdir(REPO)

    def cells(name: str) -> dict[str, dict]:
        path = Path(f"conf/grids/{name}.yaml")
        out = {}
        for cell in cell_names(load_grid(path)):
            (stage,) = stage_commands(path, cell)
            out[cell] = _model_and_data(_resolved(stage["argv"], capsys))
        return out

    w = cells("w")
    ref = w["w400"]
    assert ref["model"]["backbone_mode"] == "frozen"  # the grid's base: frozen, cached features
    for cell, cfg in w.items():
        want = {} if cell == "w400" else {"model.w": float(cell[1:])}
        assert _leaf_diff(ref, cfg) == want, cell
    assert {cfg["model"]["w"] for cfg in w.values()} >= {1.0, 10.0, 100.0, 200.0, 300.0, 400.0}

    switches = cells("selector_switches")
    paper = switches["paper"]
    assert (paper["model"]["loss"], paper["model"]["backbone_mode"]) == ("hinge", "finetune")
    assert paper["data"]["text_recipe"] == "paper"
    assert {c: _leaf_diff(paper, cfg) for c, cfg in switches.items()} == {
        "paper": {},
        "ranknet": {"model.loss": "ranknet"},
        "conversation_text": {"data.text_recipe": "conversation"},
        "frozen": {"model.backbone_mode": "frozen"},
    }

    source = cells("preference_source")
    for seed in range(5):
        mixed = source[f"mixed-s{seed}"]
        assert (mixed["seed"], mixed["data"]["seed"]) == (seed, seed)
        assert mixed["model"]["w"] > 0 and mixed["data"]["model_pairs"] > 0
        assert _leaf_diff(mixed, source[f"clinician_only-s{seed}"]) == {"data.model_pairs": 0}
        assert _leaf_diff(mixed, source[f"model_only-s{seed}"]) == {"model.w": 0.0}
    everything = [*w.values(), *switches.values()]
    assert len({yaml.safe_dump(c) for c in everything}) == len(everything)
    assert len({yaml.safe_dump(c) for c in source.values()}) == len(source)


def test_topk_grid_cells_keep_their_k(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    path = Path("conf/grids/topk.yaml")
    ks = {}
    for cell in cell_names(load_grid(path)):
        select = stage_commands(path, cell)[0]
        assert select["stage"] == "select"
        argv = select["argv"]
        ks[cell] = float(argv[argv.index("--top_percent") + 1])
        assert ks[cell] == float(cell[1:])
    assert set(ks.values()) >= {10.0, 40.0, 80.0, 90.0}  # the paper's data sizes


@pytest.mark.parametrize(
    ("text", "cell", "message"),
    [
        ("cells: {a: [x\n", None, r"g\.yaml:2:1: invalid YAML"),
        ("verb: fit\ncells: {a: []}\n", "nope", "no cell 'nope'; cells: a"),
    ],
)
def test_a_bad_grid_or_cell_is_one_line_not_a_traceback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    cell: str | None,
    message: str,
) -> None:
    """A typo in a grid file or a cell name is the user's: one ``biomedvital: error:`` line
    naming the file (and line) and a non-zero exit, as for a bad config."""
    import re

    from biomedvital.__main__ import run

    grid = tmp_path / "g.yaml"
    grid.write_text(text)
    argv = ["biomedvital", "grid", "--grid", str(grid), *(["--cell", cell] if cell else [])]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("BIOMEDVITAL_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("biomedvital: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_placeholders_are_filled_in_lists_and_other_braces_are_kept(tmp_path: Path) -> None:
    """``{cell_dir}`` in a list of paths is each cell's own folder (left literal, every cell
    would write to one ``{cell_dir}`` folder), and a value's own braces (a grammar's
    repetition) reach the verb unchanged instead of failing the grid."""
    grid = tmp_path / "g.yaml"
    args = {
        "candidates": ["{cell_dir}/a.jsonl", "shared.jsonl"],
        "extra_body.grammar": 'root ::= [0-9]{1,2} " " "{cell}"',
        "out": "{cell_dir}/out",
    }
    stages = {"s": {"verb": "select", "args": args, "done": "{cell_dir}/out/manifest.json"}}
    grid.write_text(yaml.safe_dump({"stages": stages, "cells": {"k1": {}}}))
    (stage,) = stage_commands(grid, "k1", str(tmp_path / "o"))
    argv, cell_dir = stage["argv"], f"{tmp_path}/o/g/k1"
    assert json.loads(argv[argv.index("--candidates") + 1]) == [
        f"{cell_dir}/a.jsonl",
        "shared.jsonl",
    ]
    assert argv[argv.index("--extra_body.grammar") + 1] == 'root ::= [0-9]{1,2} " " "k1"'
    assert stage["done"] == f"{cell_dir}/out/manifest.json"


def test_cell_tags_are_added_to_the_tags_a_config_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config's own run tags survive in a grid cell: the cell's tags join them (one
    ``--tags {...}`` on the command line would replace them)."""
    monkeypatch.chdir(REPO)
    own = tmp_path / "own_tags.yaml"
    own.write_text(
        yaml.safe_dump({"trainer": {"logger": {"init_args": {"tags": {"owner": "alice"}}}}})
    )
    sel = tmp_path / "select.yaml"
    sel.write_text(yaml.safe_dump({"tags": {"owner": "bob"}}))
    grid = tmp_path / "g.yaml"
    stages = {
        "fit": {"verb": "fit", "config": ["conf/demo/selector.yaml", str(own)]},
        "sel": {"verb": "select", "config": [str(sel)], "done": "{cell_dir}/s",
                "args": {"scores": "s.jsonl", "candidates": "c.jsonl", "out": "{cell_dir}/s"}},
    }  # fmt: skip
    grid.write_text(yaml.safe_dump({"stages": stages, "seeds": [3], "cells": {"a": {}}}))
    fit, sel_stage = stage_commands(grid, "a-s3", str(tmp_path / "o"))
    cell = {"grid": "g", "cell": "a-s3", "base_cell": "a", "seed": "3"}
    tags = _resolved(fit["argv"], capsys)["trainer"]["logger"]["init_args"]["tags"]
    assert tags == {"owner": "alice", **cell, "stage": "fit"}
    assert _resolved(sel_stage["argv"], capsys)["tags"] == {"owner": "bob", **cell, "stage": "sel"}


def test_a_credential_inside_a_json_argument_stays_out_of_cell_json(tmp_path: Path) -> None:
    """The endpoint given as one ``client`` mapping (JSON on the command line, not the dotted
    ``client.base_url``): its password and key are masked in ``cell.json`` all the same."""
    from biomedvital.grid import run_cell

    url = "https://alice:s3cret@llm.example.org/v1?api-key=abc123"
    grid = tmp_path / "g.yaml"
    args = {"client": {"base_url": url, "model": "m"}}
    stages = {"gen": {"verb": "generate", "args": args, "done": "{cell_dir}/g"}}
    grid.write_text(yaml.safe_dump({"stages": stages, "cells": {"a": {}}}))
    (stage,) = stage_commands(grid, "a", str(tmp_path / "out"))
    assert json.loads(stage["argv"][stage["argv"].index("--client") + 1])["base_url"] == url
    Path(stage["done"]).parent.mkdir(parents=True)
    Path(stage["done"]).write_text("done")
    run_cell(grid, "a", str(tmp_path / "out"), reuse_stale=True)
    written = (tmp_path / "out" / "g" / "a" / "cell.json").read_text()
    assert "s3cret" not in written and "abc123" not in written
    argv = json.loads(written)["stages"][0]["argv"]
    shown = json.loads(argv[argv.index("--client") + 1])
    assert shown == {"base_url": "https://alice:***@llm.example.org/v1?api-key=***", "model": "m"}


def test_a_cell_whose_command_changed_runs_again(tmp_path: Path, pool: dict[str, Path]) -> None:
    """Editing a finished cell in the grid file (``top_percent`` 50 -> 25) makes ``make`` rerun
    it; its stages must run with the new command, and the stages after a rerun one too (they
    read its outputs), not be skipped because their files exist from the old command."""
    grid = _chain_grid(tmp_path, pool)
    root = str(tmp_path / "grids")
    main(["grid", "--grid", str(grid), "--cell", "k50-s0", "--out_root", root])
    folder = tmp_path / "grids" / "chain" / "k50-s0"
    spec = yaml.safe_load(grid.read_text())
    spec["cells"]["k50"]["select"]["args"]["top_percent"] = 25
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    main(["grid", "--grid", str(grid), "--cell", "k50-s0", "--out_root", root])
    n_all = len(pool["candidates"].read_text().splitlines())
    kept = json.loads((folder / "selected" / "manifest.json").read_text())["kept"]
    assert kept == n_all // 4
    record = json.loads((folder / "cell.json").read_text())
    assert [s["ran"] for s in record["stages"]] == [True, True]
    # unchanged since: nothing runs
    main(["grid", "--grid", str(grid), "--cell", "k50-s0", "--out_root", root])
    record = json.loads((folder / "cell.json").read_text())
    assert [s["ran"] for s in record["stages"]] == [False, False]


def test_report_counts_only_the_cells_the_grid_file_lists_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A seed or cell removed from the grid file leaves finished runs in the store: they must
    not enter the tables and means. Seeds sort as numbers (2 before 10)."""
    import importlib.util

    from biomedvital.tracking.mlflow import PipelineRun

    spec = importlib.util.spec_from_file_location("report", REPO / "experiments" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    store = str(tmp_path / "mlruns")
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(
        "verb: fit\nbase: [conf/demo/selector.yaml]\nseeds: [0, 2, 10]\n"
        "cells:\n  w1: [conf/ablation/w1.yaml]\n"
    )
    for cell, seed, value in (("w1", 0, 0.5), ("w1", 2, 0.6), ("w1", 10, 0.7), ("w1", 3, 0.0),
                              ("w9", 0, 0.0)):  # fmt: skip
        tags = {"grid": "g", "cell": f"{cell}-s{seed}", "base_cell": cell, "seed": str(seed)}
        with PipelineRun("selection", "fit", store, tags) as run:
            run.log_metrics({"val/align_rate": value, "val/mean_rank": 0.3})
    out = tmp_path / "reports"
    report.main(["--grid", "g", "--store", store, "--out", str(out), "--grid_file", str(grid_file)])
    printed = capsys.readouterr().out
    assert "left out 2 cell(s) no longer in" in printed and "w1-s3, w9-s0" in printed
    rows = list(csv.DictReader((out / "g" / "table.csv").open()))
    assert [r["seed"] for r in rows] == ["0", "2", "10"]
    (summary,) = list(csv.DictReader((out / "g" / "summary.csv").open()))
    assert summary["n"] == "3" and float(summary["val/align_rate"]) == pytest.approx(0.6)
    assert "val/mean_rank" in summary
    # what the runs cost: each cell's run time, their sum and the span of the grid's runs
    record = json.loads((out / "g" / "report.json").read_text())
    cells = record["cells"]
    assert all(c["run_s"] >= 0 for c in cells) and "run_s" in rows[0]
    time = record["time"]
    assert time["cells"] == 3
    assert time["run_s_total"] == pytest.approx(sum(c["run_s"] for c in cells), abs=0.2)
    assert time["span_s"] >= max(c["run_s"] for c in cells)
