"""The demo chain at test size (selector fit, predict, select, tuner fit, test) as CLI argv.

Outputs are relative to the working folder and inputs absolute, so two runs in two folders write
byte-identical configs and can be compared file by file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tiny_tuner import tiny_tuner_data, tiny_tuner_model

from biomedvital.data.demo import materialize_demo
from biomedvital.evaluation.demo_vqa import write_demo_vqa

SECRET = "sk-reliability-DO-NOT-LEAK-7d1e0a93c4"
"""A recognisable API key: set in every run's environment, found in no output."""
KEY_ENVS = ("OPENAI_API_KEY", "BIOMEDVITAL_TEST_KEY", "HF_TOKEN")
SECRET_ENV: dict[str, str | None] = {k: SECRET for k in KEY_ENVS}
"""Every run of these tests has a recognisable API key in its environment."""


def _logger(store: Path, experiment: str) -> dict[str, Any]:
    return {
        "class_path": "biomedvital.tracking.MLflowLogger",
        "init_args": {"experiment": experiment, "store": str(store), "run_name": experiment},
    }


def selector_config(demo: Path, store: Path, epochs: int = 2) -> dict[str, Any]:
    """A tiny CLIP selector on the demo pool: 2 epochs of 2 steps, best and last checkpoints."""
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "biomedvital.selection.SelectorModule",
            "init_args": {
                "backbone": "tiny:tiny-clip",
                "backbone_mode": "frozen",
                "head_hidden": [32],
                "lr": 1e-4,
                "head_lr": 1e-3,
                "w": 8.0,
                "cache_dir": str(store.parent / "cache"),
            },
        },
        "data": {
            "class_path": "biomedvital.selection.SelectorDataModule",
            "init_args": {
                "pool": {
                    "class_path": "biomedvital.data.pool.DemoPool",
                    "init_args": {"root": str(demo)},
                },
                "model_pairs": 64,
                "val_model_pairs": 16,
                "batch_size": 32,
                "predict_chunk": 16,
                "num_workers": 0,
            },
        },
        "trainer": {
            "max_epochs": epochs,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "default_root_dir": "selector",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": _logger(store, "selection"),
            "callbacks": [
                {
                    "class_path": "biomedvital.tracking.Checkpoints",
                    "init_args": {"monitor": "val/align_rate", "mode": "max", "save_last": True},
                },
                {"class_path": "biomedvital.selection.ScoreWriter"},
            ],
        },
    }


def tuner_config(selected: Path, images: Path, store: Path) -> dict[str, Any]:
    """A tiny LLaVA tuned with LoRA: 2 epochs of 1 step, last checkpoint, adapter and merged export."""
    return {
        "seed_everything": 0,
        "model": tiny_tuner_model(),
        "data": tiny_tuner_data(selected, images, max_length=160, batch_size=2),
        "trainer": {
            "max_epochs": 2,
            "limit_train_batches": 1,
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "log_every_n_steps": 1,
            "default_root_dir": "tuner",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": _logger(store, "tuning"),
            "callbacks": [
                {
                    "class_path": "biomedvital.tracking.Checkpoints",
                    "init_args": {"save_last": True},
                },
                {
                    "class_path": "biomedvital.tuning.ExportTuned",
                    "init_args": {"dirpath": "tuner/export", "adapter": True},
                },
            ],
        },
    }


def eval_config(merged: Path, questions: Path, images: Path, store: Path) -> dict[str, Any]:
    """The tuned tiny LLaVA answering the first 12 demo VQA questions."""
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "biomedvital.evaluation.vqa_eval.VQAEvaluator",
            "init_args": {"model": f"local-dir:{merged}", "decoding": {"max_new_tokens": 4}},
        },
        "data": {
            "class_path": "biomedvital.evaluation.vqa_eval.VQADataModule",
            "init_args": {
                "benchmark": "vqa_rad",
                "name": "demo_vqa",
                "data": str(questions),
                "image_root": str(images),
                "batch_size": 4,
                "limit": 8,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "default_root_dir": "eval",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": _logger(store, "evaluation"),
        },
    }


@dataclass
class Chain:
    """Inputs, configs and argv of every stage, and the reference (uninterrupted) run."""

    root: Path
    store: Path
    demo: Path
    images: Path
    questions: Path
    ref: Path
    argv: dict[str, list[str]] = field(default_factory=dict)
    resume: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def build_chain(root: Path) -> Chain:
    """Write the inputs and the stage configs under ``root`` (nothing is run)."""
    files = materialize_demo(root / "demo")
    store = root / "mlruns"
    chain = Chain(
        root=root,
        store=store,
        demo=files.root,
        images=Path(files.images),
        questions=write_demo_vqa(root / "demo_vqa.json"),
        ref=root / "ref",
    )
    chain.ref.mkdir()
    conf = root / "conf"
    conf.mkdir()
    ref = chain.ref
    sel = conf / "selector.yaml"
    sel.write_text(yaml.safe_dump(selector_config(chain.demo, store)))
    tun = conf / "tuner.yaml"
    tun.write_text(
        yaml.safe_dump(tuner_config(ref / "selected" / "selected.json", chain.images, store))
    )
    ev = conf / "eval.yaml"
    ev.write_text(
        yaml.safe_dump(
            eval_config(ref / "tuner" / "export" / "merged", chain.questions, chain.images, store)
        )
    )
    chain.argv = {
        "selector_fit": ["fit", "--config", str(sel)],
        "predict": ["predict", "--config", str(sel), "--ckpt_path", str(ref / "selector" / "checkpoints" / "last.ckpt")],
        "select": [
            "select",
            "--scores", str(ref / "selector" / "scores.jsonl"),
            "--candidates", str(Path(files.candidates)),
            "--out", "selected",
            "--top_percent", "50",
            "--store", str(store),
        ],
        "tuner_fit": ["fit", "--config", str(tun)],
        "test": ["test", "--config", str(ev)],
    }  # fmt: skip
    chain.resume = {
        "selector_fit": [*chain.argv["selector_fit"], "--ckpt_path", "last"],
        "tuner_fit": [*chain.argv["tuner_fit"], "--ckpt_path", "last"],
    }
    return chain


def run_reference(chain: Chain, server: Any, env: dict[str, str | None]) -> None:
    """Run every stage once, uninterrupted, in ``chain.ref``; time each. The MLflow store is
    created and the selector's feature cache filled first (a selector fit in ``warmup/``), so
    that the timings, which bound the kill instants, are those of the trials' warm runs."""
    from biomedvital.tracking.mlflow import PipelineRun

    with PipelineRun("setup", "create-store", chain.store):
        pass
    warm = chain.root / "warmup"
    warm.mkdir()
    if server.run(chain.argv["selector_fit"], warm, warm / "log.txt", env) != 0:
        raise AssertionError((warm / "log.txt").read_text()[-4000:])
    for stage, argv in chain.argv.items():
        t0 = time.monotonic()
        rc = server.run(argv, chain.ref, chain.ref / f"{stage}.log", env)
        chain.seconds[stage] = time.monotonic() - t0
        if rc != 0:
            log = (chain.ref / f"{stage}.log").read_text()
            raise AssertionError(f"reference {stage} failed (rc {rc}):\n{log[-4000:]}")
    (chain.root / "seconds.json").write_text(json.dumps(chain.seconds, indent=1))


def _json(path: Path, drop: tuple[str, ...] = ("mlflow_run_id", "git", "resumed")) -> Any:
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in drop} if isinstance(data, dict) else data


def leftovers(folder: Path) -> list[str]:
    """Temporary, lock or journal files left in a folder tree (none after a completed run)."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if (p.name.startswith(".") and (".tmp" in p.name or p.name.endswith(".lock")))
        or p.name.startswith("answers.journal-")
    )
