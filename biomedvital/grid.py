"""Ablation grids: a base config plus one overlay per cell; a cell is one run or a chain of stages.

A one-stage grid (``conf/grids/w.yaml``)::

    verb: fit                       # the Trainer verb every cell runs
    base: [conf/demo/selector.yaml, conf/ablation/frozen.yaml]
    cells:                          # cell name -> overlays applied on top of the base
      w0: [conf/ablation/w0.yaml]
      w400: [conf/ablation/w400.yaml]

A chained grid (``conf/grids/topk.yaml``) runs, per cell, stages in order, each a verb with its
configs and ``--key value`` arguments; ``{cell_dir}``, ``{grid}``, ``{cell}`` and ``{seed}`` are
filled in, and a cell overrides a stage's arguments or adds configs by naming the stage::

    stages:
      select: {verb: select, args: {scores: ..., out: "{cell_dir}/selected"},
               done: "{cell_dir}/selected/manifest.json"}
      tune:   {verb: fit, config: [conf/demo/tuner.yaml], args: {...}, done: ...}
    cells:
      k10: {select: {args: {top_percent: 10}}}

``seeds: [0, 1, 2]`` repeats every cell per seed (cells ``<cell>-s<seed>``), passing the seed
to each Trainer stage through ``seed_args`` (default ``seed_everything: "{seed}"``); other
stages may use ``{seed}`` in their own arguments. The selector's ``model.init_args.init_seed``
and ``data.init_args.seed`` follow ``seed_everything`` unless a config pins them, so the default
varies its initialisation, pair sampling, clinician split and batch order per replicate.

Each cell writes into ``<out_root>/<grid>/<cell>/``; every MLflow run of a cell carries the tags
``grid``, ``cell``, ``base_cell`` and ``seed``, so ``experiments/report.py`` can collect them. A
stage whose ``done`` file exists is skipped (a rerun resumes the cell), a failing stage stops
the cell with its error, and ``cell.json`` is written last: the Makefile's target for the cell.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from biomedvital.data.jsonio import write_json

TRAINER_VERBS = ("fit", "validate", "test", "predict")
CELL_FILE = "cell.json"
GRID_KEYS = {"verb", "base", "stages", "cells", "seeds", "seed_args", "needs"}


class GridError(ValueError):
    """A grid file that cannot be run; names the file and what is wrong."""


def _as_overrides(path: Path, cell: str, value: Any, stages: dict) -> dict[str, dict]:
    """A cell's value as ``{stage: {config: [...], args: {...}}}``."""
    if value is None:
        return {}
    if isinstance(value, list):  # overlays for the only (or first) stage
        return {next(iter(stages)): {"config": value}}
    if not isinstance(value, dict):
        raise GridError(f"{path}: cell {cell!r}: expected a list of configs or a mapping")
    unknown = sorted(set(value) - set(stages))
    if unknown:
        raise GridError(
            f"{path}: cell {cell!r} names unknown stage(s) {unknown}; stages: {list(stages)}"
        )
    for stage, override in value.items():
        if not isinstance(override, dict) or set(override) - {"config", "args"}:
            raise GridError(f"{path}: cell {cell!r}, stage {stage!r}: use 'config' and 'args'")
    return value


def load_grid(path: Path) -> dict:
    """Read and check a grid file, normalised to ``stages`` + ``cells`` (+ ``seeds``); every
    config file must exist."""
    path = Path(path)
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("cells"), dict) or not spec["cells"]:
        raise GridError(f"{path}: a grid needs a non-empty 'cells' mapping")
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        raise GridError(f"{path}: unknown key(s) {unknown}; known: {sorted(GRID_KEYS)}")
    if "stages" in spec:
        if "verb" in spec or "base" in spec:
            raise GridError(f"{path}: use either 'verb' + 'base' or 'stages', not both")
        stages = spec["stages"]
        if not isinstance(stages, dict) or not stages:
            raise GridError(f"{path}: 'stages' must be a non-empty mapping of name -> stage")
    else:
        verb = spec.get("verb", "fit")
        stages = {verb: {"verb": verb, "config": spec.get("base", [])}}
    for name, stage in stages.items():
        if not isinstance(stage, dict) or "verb" not in stage:
            raise GridError(f"{path}: stage {name!r} needs a 'verb'")
        stage.setdefault("config", [])
        stage.setdefault("args", {})
        if stage["verb"] in TRAINER_VERBS:
            stage.setdefault("done", f"{{cell_dir}}/run.{stage['verb']}.json")
        elif "done" not in stage:
            raise GridError(f"{path}: stage {name!r} ({stage['verb']}) needs a 'done' file")
    cells = {c: _as_overrides(path, c, v, stages) for c, v in spec["cells"].items()}
    seeds = spec.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds)
    ):
        raise GridError(f"{path}: 'seeds' must be a list of integers")
    files = [f for s in stages.values() for f in s["config"]]
    files += [f for c in cells.values() for o in c.values() for f in o.get("config", [])]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: config files not found: {', '.join(missing)}")
    return {
        "stages": stages,
        "cells": cells,
        "seeds": seeds,
        "seed_args": spec.get("seed_args", {"seed_everything": "{seed}"}),
        "needs": spec.get("needs", []),
    }


def cell_names(spec: dict) -> list[str]:
    """Every cell, seeds expanded (``<cell>-s<seed>``)."""
    if not spec["seeds"]:
        return list(spec["cells"])
    return [f"{c}-s{s}" for c in spec["cells"] for s in spec["seeds"]]


def _split_cell(spec: dict, cell: str) -> tuple[str, int | None]:
    if spec["seeds"]:
        base, _, seed = cell.rpartition("-s")
        if base in spec["cells"] and seed.isdigit() and int(seed) in spec["seeds"]:
            return base, int(seed)
    elif cell in spec["cells"]:
        return cell, None
    raise GridError(f"no cell {cell!r}; cells: {', '.join(cell_names(spec))}")


def _fill(value: Any, names: dict[str, Any]) -> str:
    return str(value).format(**names) if isinstance(value, str) else json.dumps(value)


def _takes_tags(verb: str) -> bool:
    """Whether a pipeline verb logs an MLflow run that can carry the cell's tags (``demo``,
    ``score-vqa`` and the like have no ``tags`` argument and would refuse one)."""
    import inspect

    from biomedvital.cli import PIPELINE_VERBS, _load

    if verb not in PIPELINE_VERBS:
        raise GridError(f"unknown verb {verb!r}")
    return "tags" in inspect.signature(_load(PIPELINE_VERBS[verb][0])).parameters


def stage_commands(grid: Path, cell: str, out_root: str = "outputs/grids") -> list[dict]:
    """Each stage of a cell: its name, argv (after ``python -m biomedvital``) and done file."""
    spec = load_grid(grid)
    base, seed = _split_cell(spec, cell)
    name = Path(grid).stem
    cell_dir = Path(out_root) / name / cell
    names = {"cell_dir": str(cell_dir), "grid": name, "cell": cell, "seed": seed}
    tags = {"grid": name, "cell": cell, "base_cell": base}
    if seed is not None:
        tags["seed"] = str(seed)
    out = []
    for stage_name, stage in spec["stages"].items():
        override = spec["cells"][base].get(stage_name, {})
        verb = stage["verb"]
        argv = [verb]
        for f in [*stage["config"], *override.get("config", [])]:
            argv += ["--config", str(f)]
        args = {**stage["args"], **override.get("args", {})}
        if seed is not None and verb in TRAINER_VERBS:  # pipeline stages use "{seed}" in args
            args = {**spec["seed_args"], **args}
        if verb in TRAINER_VERBS:
            args.setdefault("trainer.default_root_dir", "{cell_dir}")
            args["trainer.logger.init_args.run_name"] = f"{name}/{cell}/{stage_name}"
            args["trainer.logger.init_args.tags"] = {**tags, "stage": stage_name}
        elif _takes_tags(verb):
            args["tags"] = {**tags, "stage": stage_name}
        for key, value in args.items():
            argv += [f"--{key}", _fill(value, names)]
        out.append({"stage": stage_name, "argv": argv, "done": _fill(stage["done"], names)})
    return out


def _run_stage(argv: list[str]) -> str | None:
    """Run one stage; ``None`` on success, else why it failed. Trainer verbs get a process of
    their own (Lightning and the accelerator keep global state); pipeline verbs run here."""
    if argv[0] in TRAINER_VERBS:
        proc = subprocess.run([sys.executable, "-m", "biomedvital", *argv], check=False)
        return f"exit {proc.returncode}" if proc.returncode else None
    from biomedvital.cli import main

    try:
        main(argv)
    except SystemExit as stop:  # argument errors: jsonargparse has printed them
        return f"exit {stop.code}" if stop.code else None
    except Exception as err:  # noqa: BLE001 - reported with the stage, the cell stops
        print(f"[grid] {type(err).__name__}: {err}", file=sys.stderr)
        return f"{type(err).__name__}: {err}"
    return None


def run_cell(grid: Path, cell: str, out_root: str = "outputs/grids") -> dict:
    """Run a cell's stages not yet done, each in its own process; the first failure stops the
    cell with that stage's exit status. Writes ``cell.json`` (stages, commands) when all are
    done."""
    spec = load_grid(grid)
    missing = [n for n in spec["needs"] if not Path(n).exists()]
    if missing:
        raise GridError(f"{grid}: needs {', '.join(missing)} (see the grid file's header)")
    stages = stage_commands(grid, cell, out_root)
    cell_dir = Path(out_root) / Path(grid).stem / cell
    record = {"grid": str(grid), "cell": cell, "stages": []}
    for stage in stages:
        ran = not Path(stage["done"]).exists()
        shown = _shown(stage["argv"])
        if ran:
            print(f"[grid] {cell}: {stage['stage']}: python -m biomedvital {' '.join(shown)}")
            status = _run_stage(stage["argv"])
            if status:
                raise SystemExit(f"[grid] {cell}: stage {stage['stage']!r} failed ({status})")
            if not Path(stage["done"]).exists():
                raise SystemExit(
                    f"[grid] {cell}: stage {stage['stage']!r} ended without writing {stage['done']}"
                )
        else:
            print(f"[grid] {cell}: {stage['stage']}: done ({stage['done']})")
        record["stages"].append({**stage, "argv": shown, "ran": ran})
    write_json(cell_dir / CELL_FILE, record)
    return record


def _shown(argv: list[str]) -> list[str]:
    """The command line fit for the console and ``cell.json``: a URL's password and query
    values masked (a grid file may name ``client.base_url`` with a credential in it)."""
    from biomedvital.generation.client import safe_url

    return [safe_url(a) if "://" in a else a for a in argv]


def grid(
    grid: Path, cell: str | None = None, out_root: str = "outputs/grids", needs: bool = False
) -> None:
    """List a grid's cells (no ``--cell``) or run one cell (resuming its stages).

    Args:
        grid: the grid file (``conf/grids/NAME.yaml``).
        cell: the cell to run; without it the cell names are printed, one per line.
        out_root: where cell folders go (``<out_root>/<grid>/<cell>``).
        needs: print the files the grid needs before any cell runs (its ``needs``; the
            Makefile makes them first).
    """
    spec = load_grid(grid)
    if needs:
        print("\n".join(spec["needs"]))
        return
    if cell is None:
        print("\n".join(cell_names(spec)))
        return
    run_cell(grid, cell, out_root)
