"""What a resumed run must share with its uninterrupted twin: every tensor and counter of every
checkpoint (weights, optimiser and scheduler state, epoch, step, loop and loader progress,
callback state), the run records, the saved config, the export's bytes and every metric MLflow
logged at every step."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from reliability_helpers import leftovers
from resume_setups import Setup

# a resumed run logs into the MLflow run of the run it continues, not the reference's
CHECKPOINT_OWN = ("mlflow_run_id",)
# Lightning's count of the last validation's batches: zero in a resumed run until it validates
# (its restore resets it), reset when every validation starts, read by nothing in between
LAST_VALIDATION = ("current", "is_last_batch")
RECORD_OWN = ("mlflow_run_id", "git", "resumed")


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal trees: tensors ``torch.equal`` (and same dtype), numbers and strings ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{list(a.shape)}"
        assert torch.equal(a, b), f"{where}: differs by {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: dict vs {type(b).__name__}"
        assert a.keys() == b.keys(), (
            f"{where}: keys differ: {sorted(map(str, a.keys() ^ b.keys()))}"
        )
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: nan vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load_any_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint: one file, or an FSDP2 folder read whole in this process."""
    from biomedvital.tuning.consolidate import is_sharded_checkpoint, load_sharded_checkpoint

    if is_sharded_checkpoint(path):
        return load_sharded_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint was written at (``None``: no checkpoint)."""
    if path.is_dir():
        path = path / "meta.pt"
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def same_checkpoint(ref: Path, got: Path) -> None:
    a, b = load_any_checkpoint(ref), load_any_checkpoint(got)
    for ckpt in (a, b):
        for key in CHECKPOINT_OWN:
            ckpt.pop(key, None)
        val = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.val_loop.batch_progress")
        for key in LAST_VALIDATION if val else ():
            val.pop(key, None)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]), ref.name
    assert_same(a, b, ref.name)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def read_record(path: Path, run: Path) -> Any:
    """A JSON record with the run's folder written ``<run>`` (two runs, two folders) and the
    keys that name a run or a commit dropped."""
    data = json.loads(path.read_text().replace(str(run), "<run>"))
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in RECORD_OWN}
        if "best_checkpoint" in data:
            data["best_checkpoint"] = Path(data["best_checkpoint"] or "").name
    return data


def config_lines(path: Path, run: Path, ignore: Iterable[str] = ()) -> list[str]:
    """A saved config, but for the resumed run's ``ckpt_path`` and the MLflow run it
    continues (``run_id``), and keys named in ``ignore``."""
    skip = ("ckpt_path:", "run_id:", *ignore)
    text = path.read_text().replace(str(run), "<run>")
    return [x for x in text.splitlines() if not x.strip().startswith(skip)]


def mlflow_history(
    run: Path, record: str = "outputs/*/*/run.fit.json"
) -> tuple[dict[tuple[str, int], float], dict[str, str]]:
    """Every metric value the MLflow run named in the run folder's ``record`` logged, by
    (key, step), and its params. A step logged twice (by a killed run and again by its
    resume) must carry the same value."""
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    run_id = json.loads(next(run.glob(record)).read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri(run / "mlruns"))
    info = client.get_run(run_id)
    values: dict[tuple[str, int], float] = {}
    for key in info.data.metrics:
        for m in client.get_metric_history(run_id, key):
            seen = values.setdefault((key, m.step), m.value)
            assert seen == m.value or (math.isnan(seen) and math.isnan(m.value)), (
                f"{key} at step {m.step} logged as {seen} and as {m.value}"
            )
    # a rerun of ``test`` records what it took from the killed run's journal (``resumed_*``)
    params = {k: v for k, v in info.data.params.items() if not k.startswith("resumed")}
    return values, params


def same_fit(ref: Path, got: Path, setup: Setup, ignore_config: Iterable[str] = ()) -> None:
    """A fit in ``got`` (killed and resumed) against the uninterrupted one in ``ref``."""
    r, g = ref / setup.root, got / setup.root
    assert _entries(g / "checkpoints") == _entries(r / "checkpoints"), "checkpoint files"
    for name in _entries(r / "checkpoints"):
        same_checkpoint(r / "checkpoints" / name, g / "checkpoints" / name)
    assert read_record(g / "run.fit.json", got) == read_record(r / "run.fit.json", ref), (
        "run.fit.json"
    )
    want_config = config_lines(r / "config.fit.yaml", ref, ignore_config)
    assert config_lines(g / "config.fit.yaml", got, ignore_config) == want_config, "config"
    if setup.tuner:
        files = _files(r / "export")
        assert _files(g / "export") == files, "export files"
        for name in files:
            if name.endswith(".json"):
                assert read_record(g / "export" / name, got) == read_record(
                    r / "export" / name, ref
                ), name
            elif name == "config.yaml":
                a = config_lines(r / "export" / name, ref, ignore_config)
                assert config_lines(g / "export" / name, got, ignore_config) == a, name
            else:
                assert (g / "export" / name).read_bytes() == (r / "export" / name).read_bytes(), (
                    name
                )
    want, got_ = mlflow_history(ref), mlflow_history(got)
    assert got_[0] == want[0], "metric histories differ"
    assert got_[1] == want[1], "params differ"
    # (not the MLflow store: it keeps its tables' lock file)
    assert leftovers(got / "outputs") == [], "temporary or lock files left"
