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
``grid``, ``cell``, ``base_cell``, ``seed`` and ``stage``, added to any tags its configs set, so
``experiments/report.py`` can collect them. A stage whose ``done`` file exists and whose command
is the one it last finished with (``stages.json``) is skipped (a rerun resumes the cell; an
edited cell runs again from its first changed stage), a failing stage stops the cell with its
error, and ``cell.json`` is written last: the Makefile's target for the cell.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from biomedvital.data.jsonio import write_json

TRAINER_VERBS = ("fit", "validate", "test", "predict")
CELL_FILE = "cell.json"
STAGES_FILE = "stages.json"  # the command each stage last finished with
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
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise GridError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
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


def _filled(value: Any, names: dict[str, Any]) -> Any:
    """``value`` with the grid's placeholders filled in wherever they occur (in lists and
    mappings too: a list of per-cell paths). Only ``{cell_dir}``, ``{grid}``, ``{cell}`` and
    ``{seed}`` are replaced; other braces are the value's own (a grammar's ``[0-9]{1,2}``)."""
    if isinstance(value, str):
        for key, sub in names.items():
            value = value.replace(f"{{{key}}}", str(sub))
        return value
    if isinstance(value, list):
        return [_filled(v, names) for v in value]
    if isinstance(value, dict):
        return {_filled(k, names): _filled(v, names) for k, v in value.items()}
    return value


def _fill(value: Any, names: dict[str, Any]) -> str:
    """A command-line value: strings as they are, anything else as JSON, placeholders filled."""
    value = _filled(value, names)
    return value if isinstance(value, str) else json.dumps(value)


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
        # the cell's tags go one key at a time (``--tags.cell k10``): jsonargparse adds them to
        # the tags a config sets, where one ``--tags {...}`` would replace those
        tag_key = None
        if verb in TRAINER_VERBS:
            args.setdefault("trainer.default_root_dir", "{cell_dir}")
            args["trainer.logger.init_args.run_name"] = f"{name}/{cell}/{stage_name}"
            tag_key = "trainer.logger.init_args.tags"
        elif _takes_tags(verb):
            tag_key = "tags"
        if tag_key is not None:
            args.update({f"{tag_key}.{k}": v for k, v in {**tags, "stage": stage_name}.items()})
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
    done.

    A stage is done when its ``done`` file exists and it ran with the command it has now
    (recorded in ``stages.json`` as each stage ends): a cell edited in the grid file runs
    again from its first changed stage, and every stage after a stage that ran runs too, since
    it reads that stage's outputs.
    """
    spec = load_grid(grid)
    missing = [n for n in spec["needs"] if not Path(n).exists()]
    if missing:
        raise GridError(f"{grid}: needs {', '.join(missing)} (see the grid file's header)")
    stages = stage_commands(grid, cell, out_root)
    cell_dir = Path(out_root) / Path(grid).stem / cell
    ran_with = _commands_run(cell_dir)
    record = {"grid": str(grid), "cell": cell, "stages": []}
    upstream_ran = False
    for stage in stages:
        name, shown = stage["stage"], _shown(stage["argv"])
        changed = name in ran_with and ran_with[name] != shown
        ran = upstream_ran or changed or not Path(stage["done"]).exists()
        if ran:
            why = " (its command changed)" if changed else ""
            print(f"[grid] {cell}: {name}{why}: python -m biomedvital {' '.join(shown)}")
            status = _run_stage(stage["argv"])
            if status:
                raise SystemExit(f"[grid] {cell}: stage {name!r} failed ({status})")
            if not Path(stage["done"]).exists():
                raise SystemExit(
                    f"[grid] {cell}: stage {name!r} ended without writing {stage['done']}"
                )
            upstream_ran = True
        else:
            print(f"[grid] {cell}: {name}: done ({stage['done']})")
        ran_with[name] = shown
        write_json(cell_dir / STAGES_FILE, ran_with)
        record["stages"].append({**stage, "argv": shown, "ran": ran})
    write_json(cell_dir / CELL_FILE, record)
    return record


def _commands_run(cell_dir: Path) -> dict[str, list[str]]:
    """The (masked) command each stage of the cell last finished with, from ``stages.json``;
    empty for a new cell, or one finished before the file was kept (whose done files are
    trusted as they were: its commands are not known)."""
    try:
        data = json.loads((cell_dir / STAGES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _shown(argv: list[str]) -> list[str]:
    """The command line fit for the console and ``cell.json``: a URL's password and query
    values masked (a grid file may name ``client.base_url`` with a credential in it)."""
    from biomedvital.llm.redact import safe_url

    # every URL in an argument, also one inside a JSON value (``--client '{"base_url": ...}'``)
    return [_URL.sub(lambda m: safe_url(m.group(0)), a) for a in argv]


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")


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
