"""docs/fidelity.md is data: each row names a config key and the value the paper configs set,
and the configs hold exactly those values; every method setting of conf/paper has its row."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
PAGE = ROOT / "docs" / "fidelity.md"
HEADER = ["element", "paper / released", "suite default", "switch", "conf/paper", "key"]
PLANNED = re.compile(r"\(planned\b[^)]*\)")
KEY = re.compile(r"^`(?P<file>[\w/]+):(?P<path>[\w.]+)`$")
MISSING = object()

# The elements of the method the page must cover, one row each at least (reference-method.md).
ELEMENTS = {
    "generator",
    "demonstrations",
    "generation prompt",
    "paired-answer prompt",
    "output budget",
    "flagged answers",
    "truncated replies",
    "judge",
    "rating unit",
    "rating criteria",
    "candidate text",
    "clinician pair text",
    "model pairs",
    "clinician pairs",
    "loss",
    "clinician weight",
    "optimiser",
    "selection",
    "tuning mode",
    "image preprocessing",
    "VQA decoding",
    "VQA open-question metric",
    "VQA closed-question metric",
    "chat judge",
    "chat score",
    "pairwise judge",
    "win-rate ties",
}

# Settings of conf/paper that say where files are or how a run is laid out, not what the method
# does: they need no row.
NOT_METHOD = (
    "paper/*:client.base_url",  # the endpoint, its key's variable, its pacing
    "paper/*:client.api_key_env",
    "paper/*:client.concurrency",
    "paper/*:client.price_per_million.*",  # what a run costs (the plan's estimates), dated
    "paper/*:client.prices_as_of",
    "paper/*:figures",  # input and output paths
    "paper/*:image_root",
    "paper/*:demonstrations",
    "paper/*:candidates",
    "paper/*:preferences",
    "paper/*:questions",
    "paper/*:captions",
    "paper/judge:answers",
    "paper/pairwise:answers_*",
    "paper/pairwise:benchmark",  # one run per benchmark, as the paper reports each
    "paper/pairwise:split",
    "paper/*:out",
    "paper/selector:data.init_args.pool.*",
    "paper/tuner:data.init_args.data",
    "paper/tuner:data.init_args.image_root",
    "paper/*:seed_everything",  # run plumbing: classes, seeds, logging, checkpoints
    "paper/*.class_path",
    "paper/*:trainer.default_root_dir",
    "paper/*:trainer.logger.*",
    "paper/*:trainer.callbacks",
    "paper/*:trainer.log_every_n_steps",
    "paper/*.num_workers",
    "paper/*.predict_chunk",
    "paper/*.on_bad_record",
    "paper/tuner:model.init_args.memory.*",  # memory and speed, not results
    "paper/tuner:model.init_args.checkpoint_trainable_only",
    "paper/*:trainer.accelerator",  # hardware layout (the global batch has its rows)
    "paper/*:trainer.devices",
    "paper/*:trainer.num_nodes",
    "paper/*:trainer.strategy.*",
    "paper/*:trainer.use_distributed_sampler",
)


@dataclass(frozen=True)
class Row:
    """One element of the method as the page states it."""

    element: str
    switch: str
    value: str
    key: str
    line: int

    @property
    def planned(self) -> bool:
        return bool(PLANNED.search(self.switch))


def read_rows(text: str) -> list[Row]:
    """The rows of every table whose header is :data:`HEADER`."""
    rows: list[Row] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        cells = _cells(lines[i])
        if cells == HEADER:
            i += 2  # the header's |---| line
            while i < len(lines) and lines[i].startswith("|"):
                row = _cells(lines[i])
                assert len(row) == len(HEADER), f"fidelity.md:{i + 1}: {len(row)} cells"
                rows.append(Row(row[0], row[3], row[4], row[5], i + 1))
                i += 1
        i += 1
    return rows


def _cells(line: str) -> list[str]:
    if not line.startswith("|"):
        return []
    return [c.strip() for c in line.strip().strip("|").split("|")]


def config_value(file: str, path: str) -> Any:
    """The value at ``path`` (dotted) in ``conf/<file>.yaml``, or :data:`MISSING`."""
    config = CONF / f"{file}.yaml"
    if not config.is_file():
        return MISSING
    node: Any = yaml.safe_load(config.read_text(encoding="utf-8"))
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def cell_value(cell: str) -> Any:
    """A ``conf/paper`` cell: one YAML value in backticks."""
    m = re.fullmatch(r"`([^`]*)`", cell)
    assert m, f"not one value in backticks: {cell!r}"
    return yaml.safe_load(m.group(1))


def same(a: Any, b: Any) -> bool:
    """Equal as YAML values, numbers compared as numbers (``1e-5`` and ``1.0e-5`` alike)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float | int) or isinstance(b, float | int):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def leaves(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, value)`` of every leaf of a YAML document (a list is one leaf)."""
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in leaves(v, f"{path}.{k}" if path else k)]
    return [(path, node)]


ROWS = read_rows(PAGE.read_text(encoding="utf-8"))
KEYED = [r for r in ROWS if r.key != "—"]


def test_the_page_has_a_row_for_every_element_of_the_method() -> None:
    assert len(ROWS) > 60
    assert {r.element for r in ROWS} >= ELEMENTS, ELEMENTS - {r.element for r in ROWS}
    planned = {r.element for r in ROWS if r.planned}
    assert not {"rating unit", "rating criteria"} & planned  # rate --unit
    assert not {"image preprocessing", "VQA image preprocessing"} & planned  # image_aspect_ratio
    assert not {"VQA decoding", "VQA answer budget"} & planned  # the evaluator's decoding


@pytest.mark.parametrize("row", KEYED, ids=lambda r: f"{r.line}:{r.key.strip('`')}")
def test_each_row_holds_the_paper_configs_value(row: Row) -> None:
    """The value a row gives is the config's; a key no config has yet is a planned switch's."""
    m = KEY.match(row.key)
    assert m, f"fidelity.md:{row.line}: key {row.key!r} is not `FILE:dotted.path`"
    want = cell_value(row.value)
    got = config_value(m["file"], m["path"])
    if got is MISSING:
        assert row.planned, (
            f"fidelity.md:{row.line}: conf/{m['file']}.yaml has no {m['path']} "
            f"(mark the switch (planned) until it lands)"
        )
        return
    assert same(got, want), f"fidelity.md:{row.line}: {row.element}: page {want!r}, config {got!r}"


def test_rows_without_a_key_state_no_config_value() -> None:
    for r in ROWS:
        if r.key == "—":
            assert not r.value.startswith("`"), f"fidelity.md:{r.line}: a value without a key"


def test_every_method_setting_of_conf_paper_has_a_row() -> None:
    """A setting added to conf/paper without its row fails here: say what the paper does."""
    documented = {r.key.strip("`") for r in KEYED}
    missing = []
    for config in sorted((CONF / "paper").glob("*.yaml")):
        doc = yaml.safe_load(config.read_text(encoding="utf-8"))
        for path, _ in leaves(doc):
            key = f"paper/{config.stem}:{path}"
            if key not in documented and not any(fnmatch(key, p) for p in NOT_METHOD):
                missing.append(key)
    assert not missing, f"conf/paper settings without a row in docs/fidelity.md: {missing}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The parser reads a table, a wrong value is caught, a planned row is let through."""
    page = "\n".join(
        [
            "| " + " | ".join(HEADER) + " |",
            "|---|---|---|---|---|---|",
            "| output budget | 4096 | 1024 | `max_tokens` | `1024` | `paper/generate:max_tokens` |",
            "| rating unit | pair | conversation | `unit` (planned) | `x` | `paper/rate:nope` |",
        ]
    )
    wrong, planned = read_rows(page)
    assert planned.planned and not wrong.planned
    assert config_value("paper/rate", "nope") is MISSING
    assert config_value("paper/nothing", "max_tokens") is MISSING
    got = config_value("paper/generate", "sampling.max_tokens")
    assert not same(got, cell_value(wrong.value)) and same(got, 4096)
    assert same(1e-5, "1.0e-5") and not same(True, 1.0) and same([512], [512])
