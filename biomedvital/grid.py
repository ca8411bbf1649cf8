"""Ablation grids: a base config plus one overlay list per cell, each cell a Trainer run.

A grid file (``conf/grids/NAME.yaml``)::

    verb: fit                       # the Trainer verb every cell runs
    base: [conf/demo/selector.yaml, conf/ablation/frozen.yaml]
    cells:                          # cell name -> overlays applied on top of the base
      w0: [conf/ablation/w0.yaml]
      w400: [conf/ablation/w400.yaml]

Each cell writes into ``<out_root>/<grid>/<cell>/`` (checkpoints, ``run.fit.json``…) and its
MLflow run carries the tags ``grid`` and ``cell``, so the Makefile can use the result files as
targets and ``experiments/report.py`` can collect the runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def load_grid(path: Path) -> dict:
    """Read and check a grid file; every overlay must exist."""
    path = Path(path)
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("cells"), dict) or not spec["cells"]:
        raise ValueError(f"{path}: a grid needs a non-empty 'cells' mapping")
    spec.setdefault("verb", "fit")
    spec.setdefault("base", [])
    missing = [
        f
        for f in [*spec["base"], *(f for fs in spec["cells"].values() for f in fs or [])]
        if not Path(f).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{path}: config files not found: {', '.join(missing)}")
    return spec


def cell_args(grid: Path, cell: str, out_root: str = "outputs/grids") -> list[str]:
    """The command-line arguments of one cell (after the verb)."""
    spec = load_grid(grid)
    if cell not in spec["cells"]:
        raise ValueError(f"{grid}: no cell {cell!r}; cells: {', '.join(spec['cells'])}")
    name = Path(grid).stem
    args: list[str] = []
    for f in [*spec["base"], *(spec["cells"][cell] or [])]:
        args += ["--config", str(f)]
    args += [
        "--trainer.default_root_dir", str(Path(out_root) / name / cell),
        "--trainer.logger.init_args.run_name", f"{name}/{cell}",
        "--trainer.logger.init_args.tags", json.dumps({"grid": name, "cell": cell}),
    ]  # fmt: skip
    return args


def grid(grid: Path, cell: str | None = None, out_root: str = "outputs/grids") -> None:
    """List a grid's cells (no ``--cell``) or run one cell.

    Args:
        grid: the grid file (``conf/grids/NAME.yaml``).
        cell: the cell to run; without it the cell names are printed, one per line.
        out_root: where cell folders go (``<out_root>/<grid>/<cell>``).
    """
    spec = load_grid(grid)
    if cell is None:
        print("\n".join(spec["cells"]))
        return
    from biomedvital.cli import run_trainer_verb

    run_trainer_verb([spec["verb"], *cell_args(grid, cell, out_root)])
