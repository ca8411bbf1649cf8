"""One-file checkpoints from sharded (FSDP2) runs, loadable by a single process.

Lightning's ``ModelParallelStrategy`` (``conf/strategy/fsdp2.yaml``) writes each checkpoint as a
``torch.distributed.checkpoint`` folder (``last.ckpt/``: ``__<rank>_0.distcp`` shards,
``.metadata``, and ``meta.pt`` with epoch, step, loops, schedulers and hyper-parameters). A sharded
run resumes from it as is (``--ckpt_path last`` with the same overlay). For one process
(``LlavaTuner.load_from_checkpoint``, ``predict``, a single-device resume) consolidate it first::

    python -m biomedvital.tuning.consolidate outputs/demo/tuner/checkpoints/last.ckpt last.full.ckpt

The result is the file an unsharded run writes: ``state_dict`` with the LightningModule's keys
(trainable tensors only with ``checkpoint_trainable_only``), ``optimizer_states`` in
``torch.optim`` layout (parameters numbered in param-group order, as ``Optimizer.state_dict``),
and everything from ``meta.pt``. It needs host memory for the whole checkpoint, no process group.
The end-of-training export (``ExportTuned``) gathers full tensors itself and needs no step.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from biomedvital.data.jsonio import atomic_write
from biomedvital.tracking.checkpoints import load_checkpoint

META_FILE = "meta.pt"  # Lightning's _METADATA_FILENAME


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A ``torch.distributed.checkpoint`` folder (as ``ModelParallelStrategy`` writes)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def _numbered_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (``get_optimizer_state_dict``) renumbered as
    ``Optimizer.state_dict`` numbers parameters: in order through the param groups."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        params = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            params.append(index[name])
        groups.append({**group, "params": params})
    return {"state": {index[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def load_sharded_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A sharded checkpoint folder as one in-memory Lightning checkpoint (full tensors, CPU)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    if not is_sharded_checkpoint(folder):
        raise ValueError(f"{folder} is not a sharded checkpoint folder (no .metadata)")
    with tempfile.TemporaryDirectory(prefix="consolidate-") as tmp:
        flat = Path(tmp) / "flat.pt"
        dcp_to_torch_save(folder, flat)  # reads every shard in this one process
        checkpoint: dict[str, Any] = load_checkpoint(flat)
    meta = folder / META_FILE
    if meta.is_file():  # weights_only: a checkpoint folder is data, never code to run
        checkpoint.update(load_checkpoint(meta))
    names = sorted(
        (k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:])
    )
    if names:
        checkpoint["optimizer_states"] = [_numbered_optimizer(checkpoint.pop(k)) for k in names]
    return checkpoint


def consolidate_checkpoint(src: str | Path, dst: str | Path, optimizer: bool = True) -> Path:
    """Write ``src`` (a sharded checkpoint folder) as the single file ``dst``; ``optimizer=False``
    leaves the optimizer states out (weights and training progress only)."""
    checkpoint = load_sharded_checkpoint(src)
    if not optimizer:
        checkpoint.pop("optimizer_states", None)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dst, "wb") as f:  # a killed run leaves no half-written checkpoint
        torch.save(checkpoint, f)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m biomedvital.tuning.consolidate",
        description="Turn a sharded (FSDP2) Lightning checkpoint folder into one file.",
    )
    parser.add_argument("src", help="the checkpoint folder (e.g. checkpoints/last.ckpt)")
    parser.add_argument("dst", help="the single-file checkpoint to write")
    parser.add_argument("--no-optimizer", action="store_true", help="leave optimizer states out")
    args = parser.parse_args(argv)
    print(consolidate_checkpoint(args.src, args.dst, optimizer=not args.no_optimizer))


if __name__ == "__main__":
    main()
