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
``experiments/report.py`` can collect them. A stage is current when its ``done`` file exists and
its identity (command, config file contents, library hash, input files:
:mod:`biomedvital.grid_identity`) is the one it last finished with (``stages.json``); any other
stage runs, and every later stage of its cell with it (they read its outputs). ``--plan true``
says which cells would run and why, with each stage's command and its estimated GPU-hours and
API dollars (:mod:`biomedvital.grid_costs`), before anything runs; ``--reuse_stale true`` keeps
stale stages on purpose. ``needs`` lists the files the cells read: a bare path is made first by
``make``, ``{path, get}`` is the user's to provide (``get``: where from). A failing stage stops the
cell with its error, and ``cell.json`` is written last.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from biomedvital.data.jsonio import write_json
from biomedvital.grid_costs import THROUGHPUT, StageCost, cell_costs, check_stated, total
from biomedvital.grid_identity import FORMAT, changes, config_files, recorded_inputs, sha256_of
from biomedvital.tracking.provenance import library_hash

TRAINER_VERBS = ("fit", "validate", "test", "predict")
CELL_FILE = "cell.json"
STAGES_FILE = "stages.json"  # the identity each stage last finished with
GRID_KEYS = {"verb", "base", "stages", "cells", "seeds", "seed_args", "needs", "estimates"}


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


def _needs(path: Path, value: Any) -> list[dict[str, str | None]]:
    """``needs`` as ``[{"path", "get"}]``: a bare path is made by ``make`` first (a Makefile
    target); ``{path, get}`` is an input the user provides, ``get`` saying where from."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise GridError(f"{path}: 'needs' must be a list of paths or {{path, get}} mappings")
    out = []
    for item in value:
        if isinstance(item, str):
            out.append({"path": item, "get": None})
        elif isinstance(item, dict) and set(item) == {"path", "get"}:
            out.append({"path": str(item["path"]), "get": " ".join(str(item["get"]).split())})
        else:
            raise GridError(f"{path}: a need is a path or {{path, get}}, got {item!r}")
    return out


def missing_needs(spec: dict) -> list[dict[str, str | None]]:
    """The needs not on disk."""
    return [n for n in spec["needs"] if not Path(n["path"]).exists()]


def _needs_lines(missing: list[dict[str, str | None]]) -> list[str]:
    """The missing needs: those to provide, each with where to get it; those make makes."""
    given = [n for n in missing if n["get"] is not None]
    made = [str(n["path"]) for n in missing if n["get"] is None]
    lines = []
    if given:
        lines.append(f"{len(given)} input(s) to provide (make grid stops until they exist):")
        lines += [f"  {n['path']}: {n['get']}" for n in given]
    if made:
        lines.append(f"made first by make grid: {', '.join(made)}")
    return lines


def _needs_message(grid: Path, missing: list[dict[str, str | None]]) -> str:
    return "\n".join([f"{grid}: {len(missing)} input(s) missing", *_needs_lines(missing)])


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
    try:
        estimates = check_stated(spec.get("estimates"))
    except ValueError as err:
        raise GridError(f"{path}: {err}") from None
    return {
        "stages": stages,
        "cells": cells,
        "seeds": seeds,
        "seed_args": spec.get("seed_args", {"seed_everything": "{seed}"}),
        "needs": _needs(path, spec.get("needs")),
        "estimates": estimates,
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
    ``score-vqa`` and the like have no ``tags`` argument and would refuse one).

    Read from the verb's source: importing its module would load its stage's dependencies
    (torch, for the evaluation verbs) on every plan of a grid."""
    import ast
    import inspect

    from biomedvital.cli import PIPELINE_VERBS, _load

    if verb not in PIPELINE_VERBS:
        raise GridError(f"unknown verb {verb!r}")
    module, name = PIPELINE_VERBS[verb][0].split(":")
    source = Path(__file__).resolve().parents[1] / (module.replace(".", "/") + ".py")
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        tree = ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            params = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            return any(p.arg == "tags" for p in params)
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


@dataclass
class StagePlan:
    """One stage of a cell: its command, identity now, and whether it runs and why."""

    stage: str
    argv: list[str]
    shown: list[str]  # argv with credentials masked (console, records)
    done: str
    identity: dict[str, Any]  # command, configs, library (inputs are known once it ran)
    reasons: list[str] = field(default_factory=list)  # why it differs from what it ran with
    action: str = "current"  # "run", "current" or "reuse" (stale, kept by --reuse_stale)


@dataclass
class CellPlan:
    """What running a cell would do now."""

    cell: str
    stages: list[StagePlan]
    written: bool  # cell.json exists

    @property
    def to_run(self) -> bool:
        """Whether ``make grid`` enters the cell: a stage runs, a stale stage is kept (its
        ``cell.json`` says so), or ``cell.json`` is missing."""
        return not self.written or any(s.action != "current" for s in self.stages)

    @property
    def state(self) -> str:
        """``new`` (no stage ran), ``stale`` (a finished stage's identity changed: it runs
        again), ``incomplete`` (stages left to run, none changed), ``reused`` (stale, kept by
        ``--reuse_stale``) or ``current``."""
        if not any(Path(s.done).exists() for s in self.stages):
            return "new"
        if any(s.action == "run" and Path(s.done).exists() for s in self.stages):
            return "stale"
        if any(s.action == "run" for s in self.stages):
            return "incomplete"
        if any(s.action == "reuse" for s in self.stages):
            return "reused"
        return "current" if self.written else "incomplete"

    def why(self) -> str:
        """The reasons, one clause per stage; stages that run only because an earlier one
        does are named after it (``then tune, test``)."""
        if self.state == "new":
            return NOT_RUN
        own, after, said = [], [], set()
        running = False
        for s in self.stages:
            # a reason an earlier stage gave (the library hash) is not repeated
            mine = [r for r in s.reasons if not r.startswith(AFTER) and r not in said]
            if s.action == "reuse":
                own.append(f"{s.stage} (kept by --reuse_stale): {'; '.join(mine)}")
            elif s.action == "run" and (not running or [r for r in mine if r != NOT_RUN]):
                given = mine or [r for r in s.reasons if not r.startswith(AFTER)]
                own.append(f"{s.stage}: {'; '.join(given)}")
                running = True
            elif s.action == "run":
                after.append(s.stage)
            said.update(mine)
        if after:
            own.append(f"then {', '.join(after)}")
        if not own and not self.written:
            own.append(f"stages done, {CELL_FILE} not written")
        return "; ".join(own)


NOT_RUN = "not run"
AFTER = "after "


def _read_records(cell_dir: Path) -> dict[str, dict[str, Any]]:
    """Each stage's identity as it last finished (``stages.json``); a cell finished before
    identities were kept has its command lines only (``{"command": [...], "legacy": true}``)."""
    try:
        data = json.loads((cell_dir / STAGES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if data.get("format") == FORMAT and isinstance(data.get("stages"), dict):
        return {k: v for k, v in data["stages"].items() if isinstance(v, dict)}
    return {k: {"command": v, "legacy": True} for k, v in data.items() if isinstance(v, list)}


def _identity(argv: list[str], shown: list[str], library: str) -> dict[str, Any]:
    return {
        "command": shown,
        "configs": {f: sha256_of(Path(f)) for f in config_files(argv)},
        "library": library,
    }


def _reasons(stage: StagePlan, record: dict[str, Any] | None) -> list[str]:
    if not Path(stage.done).exists():
        return [NOT_RUN] if record is None else [f"{stage.done} missing"]
    if record is None:
        return ["no record of what it ran with"]
    if record.get("legacy"):
        return ["finished before stage identities were recorded (command only)"]
    return changes(record, stage.identity)


def plan_cell(
    grid: Path,
    cell: str,
    out_root: str = "outputs/grids",
    reuse_stale: bool = False,
    library: str | None = None,
) -> CellPlan:
    """Compare each stage's identity now with the one it finished with: a stage runs when it
    has not run, when its identity changed (unless ``reuse_stale`` keeps it, having run), or
    when an earlier stage of the cell runs (it reads that stage's outputs)."""
    library = library or library_hash()
    cell_dir = Path(out_root) / Path(grid).stem / cell
    records = _read_records(cell_dir)
    stages = []
    upstream = None
    for cmd in stage_commands(grid, cell, out_root):
        shown = _shown(cmd["argv"])
        stage = StagePlan(
            cmd["stage"], cmd["argv"], shown, cmd["done"], _identity(cmd["argv"], shown, library)
        )
        stage.reasons = _reasons(stage, records.get(stage.stage))
        if upstream is not None:
            stage.reasons.append(f"{AFTER}{upstream} runs")
            stage.action = "run"
        elif stage.reasons:
            reusable = reuse_stale and Path(stage.done).exists()
            stage.action = "reuse" if reusable else "run"
        if stage.action == "run" and upstream is None:
            upstream = stage.stage
        stages.append(stage)
    return CellPlan(cell, stages, (cell_dir / CELL_FILE).is_file())


def plan_grid(
    grid: Path, out_root: str = "outputs/grids", reuse_stale: bool = False
) -> list[CellPlan]:
    """Every cell's plan (seeds expanded), with one library hash for all."""
    spec = load_grid(grid)
    library = library_hash()
    return [plan_cell(grid, c, out_root, reuse_stale, library) for c in cell_names(spec)]


def format_plan(
    grid: Path, plans: list[CellPlan], out_root: str, throughput: Path | None = THROUGHPUT
) -> str:
    """The plan as text: a header with counts and the library hash, the inputs missing (and
    where to get them); per cell its state and why, then each stage's action, command and
    estimate (:mod:`biomedvital.grid_costs`) and the cell's total; last, the total of the stages
    that would run."""
    spec = load_grid(grid)
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.state] = counts.get(p.state, 0) + 1
    n_run = sum(p.to_run for p in plans)
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines = [
        f"{grid}: {len(plans)} cells, {n_run} to run ({parts}); library {library_hash()}; "
        f"cells in {Path(out_root) / Path(grid).stem}/"
    ]
    lines += [f"  {line}" for line in _needs_lines(missing_needs(spec))]
    width = max(len(p.cell) for p in plans)
    to_run: list[StageCost] = []
    for p in plans:
        lines.append(f"  {p.cell:<{width}}  {p.state:<10}  {p.why()}".rstrip())
        costs = cell_costs([{"stage": s.stage, "argv": s.argv} for s in p.stages],
                           spec["estimates"], throughput)  # fmt: skip
        lines += _stage_lines(p.stages, costs)
        to_run += [c for c, s in zip(costs, p.stages, strict=True) if s.action == "run"]
    if total(to_run):
        lines.append(f"  to run: {total(to_run)}")
    return "\n".join(lines)


def _stage_lines(stages: list[StagePlan], costs: list[StageCost]) -> list[str]:
    """A cell's stages: action, command (credentials masked) and estimate; then its total."""
    width = max(len(s.stage) for s in stages)
    lines = []
    for s, cost in zip(stages, costs, strict=True):
        command = f"python -m biomedvital {shlex.join(s.shown)}"
        lines.append(f"      {s.stage:<{width}}  {s.action:<7}  {command}")
        if cost.text:
            lines.append(f"      {'':<{width}}  {'':<7}  {cost.text}")
    if len(stages) > 1 and total(costs):
        lines.append(f"      {'cell':<{width}}  {'':<7}  {total(costs)}")
    return lines


def run_cell(
    grid: Path, cell: str, out_root: str = "outputs/grids", reuse_stale: bool = False
) -> dict:
    """Run the stages of a cell that are not current, each ending before the next starts; the
    first failure stops the cell with that stage's exit status. Each stage that finishes
    records its identity (``stages.json``, inputs read from its manifests); ``cell.json``
    (stages, commands, the library hash, stages kept stale) is written when all are done.

    ``reuse_stale`` keeps a finished stage whose identity changed, on purpose: its old record
    stays (a later run without the switch reruns it) and ``cell.json`` names it under
    ``reused_stale``, which the report marks.
    """
    missing = missing_needs(load_grid(grid))
    if missing:
        raise GridError(_needs_message(grid, missing))
    plan = plan_cell(grid, cell, out_root, reuse_stale)
    cell_dir = Path(out_root) / Path(grid).stem / cell
    records = _read_records(cell_dir)
    library = plan.stages[0].identity["library"]
    record: dict[str, Any] = {"grid": str(grid), "cell": cell, "library": library, "stages": []}
    reused = {}
    first_run = next((i for i, s in enumerate(plan.stages) if s.action == "run"), None)
    if first_run is not None:
        # the stages from the first that runs on are forgotten until each finishes again: a
        # later stage that fails must not keep a record made from the earlier stage's old output
        forgotten = [records.pop(s.stage) for s in plan.stages[first_run:] if s.stage in records]
        if forgotten:
            write_json(cell_dir / STAGES_FILE, {"format": FORMAT, "stages": records})
    for stage in plan.stages:
        name = stage.stage
        if stage.action == "run":
            why = "; ".join(r for r in stage.reasons if r != NOT_RUN)
            print(f"[grid] {cell}: {name}{f' ({why})' if why else ''}: "
                  f"python -m biomedvital {' '.join(stage.shown)}")  # fmt: skip
            status = _run_stage(stage.argv)
            if status:
                raise SystemExit(f"[grid] {cell}: stage {name!r} failed ({status})")
            if not Path(stage.done).exists():
                raise SystemExit(
                    f"[grid] {cell}: stage {name!r} ended without writing {stage.done}"
                )
            records[name] = _finished(stage, records.get(name))
            write_json(cell_dir / STAGES_FILE, {"format": FORMAT, "stages": records})
        elif stage.action == "reuse":
            reused[name] = stage.reasons
            print(f"[grid] {cell}: {name}: stale, kept (--reuse_stale): {'; '.join(stage.reasons)}")
        else:
            print(f"[grid] {cell}: {name}: current ({stage.done})")
        record["stages"].append({
            "stage": name, "argv": stage.shown, "done": stage.done,
            "ran": stage.action == "run", "state": stage.action,
            "reasons": stage.reasons,
        })  # fmt: skip
    if reused:
        record["reused_stale"] = reused
    record["finished"] = _now()
    write_json(cell_dir / CELL_FILE, record)
    return record


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _finished(stage: StagePlan, previous: dict[str, Any] | None) -> dict[str, Any]:
    """A stage's identity once it has run: its inputs from its manifests, its MLflow run."""
    done = Path(stage.done)
    own = [done.parent]
    manifests = [done]
    verb = stage.argv[0]
    if verb in TRAINER_VERBS:
        opts = stage.argv
        root = Path(opts[opts.index("--trainer.default_root_dir") + 1])
        own.append(root)
        manifests.append(root / f"run.{verb}.json")
    previous_inputs = (previous or {}).get("inputs") or {}
    inputs = recorded_inputs(list(dict.fromkeys(manifests)), own, previous_inputs)
    try:
        run_id = json.loads(done.read_text(encoding="utf-8")).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        run_id = None
    return {**stage.identity, "inputs": inputs, "finished": _now(), "mlflow_run_id": run_id}


def _shown(argv: list[str]) -> list[str]:
    """The command line fit for the console and ``cell.json``: a URL's password and query
    values masked (a grid file may name ``client.base_url`` with a credential in it)."""
    from biomedvital.llm.redact import safe_url

    # every URL in an argument, also one inside a JSON value (``--client '{"base_url": ...}'``)
    return [_URL.sub(lambda m: safe_url(m.group(0)), a) for a in argv]


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")


def grid(
    grid: Path,
    cell: str | None = None,
    out_root: str = "outputs/grids",
    needs: bool = False,
    plan: bool = False,
    stale: bool = False,
    reuse_stale: bool = False,
    check_needs: bool = False,
    throughput: Path | None = THROUGHPUT,
) -> None:
    """List a grid's cells (no ``--cell``), say which are stale and why, or run one cell.

    Args:
        grid: the grid file (``conf/grids/NAME.yaml``).
        cell: the cell to run (its stages that are not current); without it the cell names
            are printed, one per line.
        out_root: where cell folders go (``<out_root>/<grid>/<cell>``).
        needs: print the files the Makefile makes before any cell runs (the grid's ``needs``
            given as bare paths; those given as ``{path, get}`` are the user's to provide).
        plan: print, for every cell, whether it is new, stale, incomplete or current, and why
            (which stage's command, config file, input or library hash changed), each stage's
            command and its estimated GPU-hours and API cost; runs nothing.
        stale: print the cells that would run (new, stale or incomplete), one per line.
        reuse_stale: keep finished stages whose identity changed instead of running them
            again (``cell.json`` names them; the report marks their cells).
        check_needs: after the plan, stop with an error naming every input the grid needs
            that is missing, and where to get it (``make grid`` checks before any cell runs).
        throughput: the committed tuner benchmark result the plan's GPU-hours come from.
    """
    spec = load_grid(grid)
    if needs:
        print("\n".join(str(n["path"]) for n in spec["needs"] if n["get"] is None))
    elif plan:
        plans = plan_grid(grid, out_root, reuse_stale)
        print(format_plan(grid, plans, out_root, throughput))
        missing = missing_needs(spec)
        if check_needs and missing and any(p.to_run for p in plans):
            raise GridError(_needs_message(grid, missing))
    elif stale:
        print("\n".join(p.cell for p in plan_grid(grid, out_root, reuse_stale) if p.to_run))
    elif cell is None:
        print("\n".join(cell_names(spec)))
    else:
        run_cell(grid, cell, out_root, reuse_stale)
