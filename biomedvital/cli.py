"""``python -m biomedvital <verb>``: Trainer verbs through LightningCLI, pipeline verbs through
jsonargparse, both configured by the same YAML files and overlays."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

TRAINER_VERBS = {
    "fit": "train a model (selector or tuner) from a config",
    "validate": "run the validation loop of a model",
    "test": "run the test loop of a model",
    "predict": "score candidates with a trained selector",
}
PIPELINE_VERBS = {
    "generate": (
        "biomedvital.generation.generate:generate",
        "write instruction conversations (or answer pairs) with an OpenAI-compatible model",
    ),
    "rate": ("biomedvital.generation.rate:rate", "score candidates 0-10 with a judge model"),
    "import-preferences": (
        "biomedvital.generation.preferences:import_preferences",
        "turn clinician annotations (JSONL/CSV pairs or marks) into preference records",
    ),
    "select": (
        "biomedvital.selection.select:select",
        "keep the top-scored candidates as LLaVA data",
    ),
    "score-vqa": (
        "biomedvital.evaluation.score_vqa:score_vqa",
        "score a VQA-RAD / SLAKE / PathVQA predictions file with LLaVA-Med's metrics",
    ),
    "score-chat": (
        "biomedvital.evaluation.chat:score_chat",
        "relative scores of a LLaVA-Med-Bench review file, per type and domain",
    ),
    "win-rate": (
        "biomedvital.evaluation.winrate:win_rate",
        "pairwise-judge win rate with position swap and bootstrap intervals",
    ),
    "grid": ("biomedvital.grid:grid", "list the cells of an ablation grid, or run one cell"),
    "judge": (
        "biomedvital.evaluation.judge:judge",
        "judge-model scores of chat answers on LLaVA-Med-Bench (writes a review file)",
    ),
    "pairwise": (
        "biomedvital.evaluation.pairwise:pairwise",
        "judge two models' answers in both orders and report their win rate",
    ),
    "demo-vqa": ("biomedvital.evaluation.demo_vqa:demo_vqa", "write the demo VQA set"),
    "demo": ("biomedvital.data.demo:demo", "write the embedded demo pool to a folder"),
}


def _load(spec: str) -> Callable:
    module, name = spec.split(":")
    return getattr(import_module(module), name)


def _usage() -> str:
    lines = ["usage: python -m biomedvital <verb> [--config FILE ...] [options]", "", "verbs:"]
    described = {**TRAINER_VERBS, **{v: text for v, (_, text) in PIPELINE_VERBS.items()}}
    width = max(map(len, described))
    lines += [f"  {verb:<{width}}  {text}" for verb, text in described.items()]
    lines += ["", "python -m biomedvital <verb> --help  shows a verb's options."]
    return "\n".join(lines)


def _cli_class() -> type:
    from pathlib import Path

    import torch
    from lightning.pytorch.cli import LightningCLI

    class BiomedCLI(LightningCLI):
        """LightningCLI whose ``--ckpt_path`` hyper-parameter merge suits this suite.

        Lightning replaces the configured model by the class that wrote the checkpoint. Here a
        model may consume another's checkpoint (the VQA evaluator reads a tuner checkpoint), so
        the merge happens only when the classes agree; and the file is memory-mapped, so reading
        the hyper-parameters of a 13B checkpoint does not load its tensors.
        """

        def _parse_ckpt_path(self) -> None:
            sub = self.config.get("subcommand")
            ckpt_path = sub and self.config[sub].get("ckpt_path")
            if not ckpt_path or not Path(ckpt_path).is_file():
                return
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
            hparams = dict(ckpt.get("hyper_parameters", {}))
            hparams.pop("_instantiator", None)
            wanted = (self.config[sub].get("model") or {}).get("class_path")
            written = hparams.pop("_class_path", None)
            if not hparams or (written and wanted and written != wanted):
                return
            model = {"class_path": written, "dict_kwargs": hparams} if written else hparams
            self.config = self.parser.parse_object({sub: {"model": model}}, self.config)

    return BiomedCLI


def run_trainer_verb(argv: list[str]) -> None:
    """LightningCLI with model and data chosen by ``class_path`` in the config."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from biomedvital.tracking.callbacks import RecordRun

    LightningCLI = _cli_class()

    # LightningCLI parses sys.argv, and multi-device launchers re-run it in child processes:
    # it must hold exactly this verb's arguments (also when a grid cell runs in-process)
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        LightningCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RecordRun,
            seed_everything_default=0,
            trainer_defaults={"logger": {"class_path": "biomedvital.tracking.MLflowLogger"}},
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    verb = argv[0]
    if verb in TRAINER_VERBS:
        run_trainer_verb(argv)
    elif verb in PIPELINE_VERBS:
        from jsonargparse import auto_cli

        result = auto_cli(
            _load(PIPELINE_VERBS[verb][0]),
            args=argv[1:],
            as_positional=False,
            prog=f"python -m biomedvital {verb}",
        )
        if isinstance(result, dict):
            import json

            print(json.dumps(result, indent=2, default=str))
    else:
        print(f"unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
