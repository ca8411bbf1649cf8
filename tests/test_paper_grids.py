"""The paper-scale grids as shipped (conf/grids/paper_*.yaml).

Each grid's first cell runs on CPU through an overlay (tests/paper_grids/<grid>.yaml) that may
change models, paths and sizes only: its keys are checked against :data:`ALLOWED`, and the slow
run compares every stage's resolved config with and without the overlay, key by key, before it
runs the cell through ``run_cell``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from biomedvital.cli import main
from biomedvital.grid import CELL_FILE, cell_names, load_grid, run_cell, stage_commands

REPO = Path(__file__).resolve().parents[1]
GRIDS = ("paper_w", "paper_topk", "paper_size")
OVERLAYS = Path(__file__).resolve().parent / "paper_grids"

ALLOWED = {
    "models": (
        r"model\.init_args\.(model|backbone)",
        r"client\.(base_url|model)",
    ),
    "paths": (
        r"(data\.init_args\.)?(data|image_root)",
        r"data\.init_args\.pool\.init_args\.\w+",
        r"scores|candidates|questions|answers|captions|out|ckpt_path",
        r"(trainer\.logger\.init_args\.)?store",
        r"trainer\.default_root_dir",
    ),
    "sizes": (
        r"trainer\.(max_epochs|max_steps|limit_\w+_batches|devices|num_nodes)",
        r"trainer\.(accumulate_grad_batches|strategy\.init_args\.data_parallel_size)",
        r"data\.init_args\.(batch_size|num_workers|predict_chunk)",
        r"data\.init_args\.(model_pairs|val_model_pairs|clinician_train_pairs)",
        r"model\.init_args\.(decoding\.)?max_new_tokens|sampling\.max_tokens|limit",
        r"client\.concurrency",
        r"trainer\.accelerator",  # where it runs: the CPU
    ),
}
"""The keys an overlay may set: which model, where files are, how much runs (and on what)."""


def allowed(key: str) -> bool:
    return any(re.fullmatch(p, key) for ps in ALLOWED.values() for p in ps)


def overlay(grid: str) -> dict[str, dict[str, dict[str, Any]]]:
    return yaml.safe_load((OVERLAYS / f"{grid}.yaml").read_text(encoding="utf-8"))


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves of a config (a list is one leaf)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


@pytest.mark.parametrize("grid", GRIDS)
def test_an_overlay_sets_models_paths_and_sizes_only(grid: str) -> None:
    """Every key of the CPU overlay is a model, a path or a size, and names a stage the grid
    has; the rule refuses the method's settings."""
    stages = load_grid(REPO / "conf" / "grids" / f"{grid}.yaml")["stages"]
    for stage, value in overlay(grid).items():
        assert stage in stages and set(value) == {"args"}, stage
        refused = [k for k in flat(value["args"]) if not allowed(k)]
        assert not refused, f"{grid}/{stage}: {refused}"
    method = ("model.init_args.w", "model.init_args.lr", "model.init_args.lora.r")
    assert not any(allowed(k) for k in (*method, "trainer.precision", "sampling.temperature"))


# -- the slow runs ----------------------------------------------------------------------------


def _bench_files(root: Path, images: list[str]) -> None:
    """Four questions in LLaVA-Med's converted layout (each VQA loader reads it) and three chat
    questions in LLaVA-Med-Bench's, over the pool's images; the captions file for the judge."""
    vqa = []
    for k, image in enumerate(images):
        closed = k % 2 == 0
        answer = "yes" if closed else f"organ {k}"
        question = "Is there a finding?" if closed else "Which organ is shown?"
        vqa.append({"id": f"q{k}", "image": image, "answer_type": "CLOSED" if closed else "OPEN",
                    "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                      {"from": "gpt", "value": answer}]})  # fmt: skip
    for name in ("vqa_rad/test.json", "slake/test.json", "pathvqa/pvqa_test.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(vqa))
    chat, captions = [], {"ct_scan": []}
    for k, image in enumerate(images[:3]):
        fig = {"pair_id": f"fig{k}", "fig_caption": f"Figure {k}: organ {k} with finding {k}.",
               "in_text_mention": [{"tokens": f"Figure {k} shows finding {k}."}]}  # fmt: skip
        captions["ct_scan"].append(fig)
        chat.append({"question_id": k, "image": image, "text": "What does the image show?",
                     "gpt4_answer": f"Organ {k} with finding {k}.", "type": "conversation",
                     "domain": {"ct_scan": True}, **fig})  # fmt: skip
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat))
    (root / "captions.json").write_text(json.dumps(captions))


def _inputs(data: Path, pool: dict[str, Path]) -> None:
    """Scores for the pool's candidates (its ratings scaled) and the benchmark files."""
    ratings = [json.loads(x) for x in pool["ratings"].read_text().splitlines()]
    scores = [{"id": r["candidate_id"], "score": r["score"] / 10} for r in ratings]
    (data / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    images = sorted(p.name for p in pool["image_root"].iterdir())
    _bench_files(data / "bench", images)


def _overlaid(grid: str, data: Path, out: Path) -> Path:
    """The grid file with the overlay's arguments added to each stage, over those of the stage
    and of its cells (``{data}`` filled in).
    Its ``needs`` and ``estimates`` go: they name the inputs at scale, which the test's stand
    in for."""
    spec = yaml.safe_load((REPO / "conf" / "grids" / f"{grid}.yaml").read_text())
    text = json.dumps(overlay(grid)).replace("{data}", str(data))
    for stage, value in json.loads(text).items():
        spec["stages"][stage].setdefault("args", {}).update(value["args"])
        for cell in spec["cells"].values():  # a cell's own argument gives way too
            args = (cell or {}).get(stage, {}).get("args", {})
            args.update({k: v for k, v in value["args"].items() if k in args})
    spec.pop("needs", None)
    spec.pop("estimates", None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{grid}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _resolved(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--print_config"])
    assert stop.value.code in (0, None)
    return flat(yaml.safe_load(capsys.readouterr().out))


def _differences(shipped: dict[str, Any], run: dict[str, Any]) -> list[str]:
    return sorted(k for k in {*shipped, *run} if shipped.get(k, "∅") != run.get(k, "∅"))


@pytest.mark.slow
@pytest.mark.parametrize("grid", GRIDS)
def test_the_first_cell_runs_on_cpu_as_shipped_but_for_models_paths_and_sizes(
    grid: str,
    tmp_path: Path,
    pool: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)
    data, root = tmp_path, tmp_path / "grids"  # the pool fixture writes <tmp_path>/pool
    _inputs(data, pool)
    shipped = Path("conf/grids") / f"{grid}.yaml"
    derived = _overlaid(grid, data, tmp_path / "conf")
    cell = cell_names(load_grid(shipped))[0]
    commands = stage_commands(derived, cell, str(root))
    for ship, run in zip(stage_commands(shipped, cell), commands, strict=True):
        changed = _differences(_resolved(ship["argv"], capsys), _resolved(run["argv"], capsys))
        assert changed, ship["stage"]  # the overlay applies
        assert [k for k in changed if not allowed(k)] == [], f"{grid}/{ship['stage']}"
    start = time.perf_counter()
    record = run_cell(derived, cell, str(root))
    print(f"{grid}/{cell}: {time.perf_counter() - start:.0f} s on CPU")
    assert (root / grid / cell / CELL_FILE).is_file()
    assert [s["stage"] for s in record["stages"]] == [c["stage"] for c in commands]
    assert all(s["ran"] and Path(s["done"]).is_file() for s in record["stages"])
