"""``python -m biomedvital <verb>``: Trainer verbs through LightningCLI, pipeline verbs through
jsonargparse, both configured by the same YAML files and overlays."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

from biomedvital.config_keys import ConfigError

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
    "serve-local": (
        "biomedvital.llm.local_server:serve_local",
        "serve a local GGUF model (SmolLM2) over an OpenAI-compatible API on loopback",
    ),
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
    "fetch-figures": (
        "biomedvital.figures.fetch:fetch_figures",
        "download the PMC figures of a LLaVA-Med URL list (one image out of each package)",
    ),
    "annotate": (
        "biomedvital.annotation.annotate:annotate",
        "serve the clinician annotation page for answer pairs, or export preferences (--export)",
    ),
    "ui": ("biomedvital.tracking.ui:ui", "serve MLflow's web UI on the store (make ui)"),
}


CONFIG_VERBS = {
    "answer": (
        "biomedvital.evaluation.answer:main",
        "ask an OpenAI-compatible endpoint a benchmark's questions (test's configs), and score",
    ),
}
"""Verbs that read the benchmark configs of ``test`` with a parser of their own."""


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _check_config_files(files: list[str]) -> None:
    """Refuse a config file that is not YAML (naming file, line and column) before parsing."""
    import yaml

    for name in files:
        try:
            with open(name, encoding="utf-8") as f:
                yaml.safe_load(f)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{name}: invalid UTF-8 at byte {e.start}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{where}: invalid YAML ({problem})") from None


def _moved_key(fn: Callable | None, key: str | None) -> str | None:
    """Where a flat key now lives when it became a field of a grouped argument (a dataclass
    parameter of the verb: ``temperature`` -> ``sampling.temperature``), else ``None``."""
    import dataclasses
    import typing

    if fn is None or not key or "." in key:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):
        return None
    for name, hint in hints.items():
        if dataclasses.is_dataclass(hint) and key in {f.name for f in dataclasses.fields(hint)}:
            return f"{name}.{key}"
    return None


def _config_error(
    verb: str,
    err: Exception,
    files: list[str],
    argv: Sequence[str] = (),
    parser: Any = None,
    fn: Callable | None = None,
) -> ConfigError:
    """The parser's error, naming the config file that sets the offending key: for a flat key
    that moved into a group, its new place; for another unknown key, one line with the nearest
    valid key (``biomedvital.config_keys``)."""
    import re

    import yaml

    from biomedvital.config_keys import bad_choice_message, bad_type_message, unknown_key_message

    text = str(err).strip()
    m = re.search(r'(?:Parser key|Key) "([^"]+)"', text)
    key = m.group(1) if m else None
    if key is None:  # an unknown key: "Option 'x' is not accepted", "Group 'g' does not ..."
        m = re.search(r"Group '([^']+)' does not accept option '([^']+)'", text)
        if m:
            key = f"{m.group(1)}.{m.group(2)}"
        elif m := re.search(
            r"Option '([^']+)' is not accepted|unrecognized arguments: --([\w.-]+)", text
        ):
            key = m.group(1) or m.group(2)
    if (moved := _moved_key(fn, key)) is not None:
        text = f"'{key}' moved to '{moved}' (in YAML: {moved.split('.')[0]}: {{{key}: ...}})"
    elif message := unknown_key_message(text, files, list(argv), parser, verb):
        return ConfigError(message)
    elif message := bad_choice_message(text, files, list(argv)) or bad_type_message(
        text, files, list(argv)
    ):
        return ConfigError(f"{verb}: {message}")
    source = None
    for name in reversed(files):  # later files overlay earlier ones
        node = yaml.safe_load(open(name, encoding="utf-8"))  # noqa: SIM115 - checked above
        for part in (key or "").split(".") if key else []:
            node = node.get(part) if isinstance(node, dict) else None
        if key and node is not None:
            source = name
            break
    if source is None:
        flags = text.startswith("unrecognized arguments")  # flags, never a file's keys
        source = ", ".join(files) if files and not flags else "the command line"
    first = text.splitlines()[0] if text else type(err).__name__
    rest = "\n".join(text.splitlines()[1:])
    return ConfigError(f"{verb}: {source}: {first}" + (f"\n{rest}" if rest else ""))


_SECTIONS = ("model", "data")
_SECTION_KEYS = ("class_path", "init_args", "dict_kwargs")


def _section_settings(argv: list[str], files: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Per ``model``/``data`` section, what sets it, in order: ``("class_path", value)`` and
    ``(init key, where)`` pairs from the config files and the command line."""
    import yaml

    found: dict[str, list[tuple[str, str]]] = {s: [] for s in _SECTIONS}
    for name in files:
        with open(name, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        for section in _SECTIONS:
            body = cfg.get(section) if isinstance(cfg, dict) else None
            if isinstance(body, str):
                found[section].append(("class_path", body))
            if not isinstance(body, dict):
                continue
            if isinstance(body.get("class_path"), str):
                found[section].append(("class_path", body["class_path"]))
            init = body.get("init_args") if isinstance(body.get("init_args"), dict) else {}
            keys = [*init, *(k for k in body if k not in _SECTION_KEYS)]
            found[section] += [(key, name) for key in keys]
    for i, arg in enumerate(argv):
        flag, _, value = arg.removeprefix("--").partition("=")
        section, _, rest = flag.partition(".")
        if not arg.startswith("--") or section not in _SECTIONS:
            continue
        value = value or (argv[i + 1] if i + 1 < len(argv) else "")
        if rest in ("", "class_path"):
            found[section].append(("class_path", value))
        elif rest.split(".")[0] not in _SECTION_KEYS or rest.startswith("init_args."):
            found[section].append((rest.removeprefix("init_args.").split(".")[0], ""))
    return found


def _refuse_moved_keys(verb: str, argv: list[str], files: list[str]) -> None:
    """Stop at an init argument that the configured model or data class has moved: its
    ``MOVED_ARGS`` class attribute maps the old key to its new place (``lora_r`` ->
    ``lora.r``); one line names the new place, where the parser would list every accepted key."""
    for section, settings in _section_settings(argv, files).items():
        paths = [value for key, value in settings if key == "class_path" and value]
        if not paths:
            continue
        try:
            module, _, name = paths[-1].rpartition(".")
            cls = getattr(import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            continue  # the parser names a class path it cannot import
        moved: dict[str, str] = getattr(cls, "MOVED_ARGS", None) or {}
        for key, where in settings:
            if key in moved:
                place = where or "the command line"
                raise ConfigError(
                    f"{verb}: {place}: {section}.init_args.{key} moved to "
                    f"{section}.init_args.{moved[key]}"
                )


def _config_cause(err: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` a class or argument group raised while jsonargparse built it
    (jsonargparse re-raises it inside a dump of every Union alternative), else ``None``."""
    seen: BaseException | None = err.__cause__
    while seen is not None:
        if isinstance(seen, ConfigError):
            return seen
        seen = seen.__cause__
    return None


def _setting_source(message: str, files: list[str], argv: list[str]) -> str:
    """``FILE: `` for the last config file that sets the key a message starts with, ``the
    command line: `` when a flag sets it, else nothing."""
    import yaml

    key = message.split(" ", 1)[0]
    bare = [p for p in key.split(".") if p != "init_args"]
    for arg in argv:
        flag = arg[2:].split("=")[0].split(".") if arg.startswith("--") else []
        if flag and [p for p in flag if p != "init_args"] == bare:
            return "the command line: "
    for name in reversed(files):
        with open(name, encoding="utf-8") as f:
            node = yaml.safe_load(f)
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return f"{name}: "
    return ""


def _load(spec: str) -> Callable:
    module, name = spec.split(":")
    return getattr(import_module(module), name)


def _usage() -> str:
    lines = ["usage: python -m biomedvital <verb> [--config FILE ...] [options]", "", "verbs:"]
    described = {**TRAINER_VERBS, **{v: text for v, (_, text) in PIPELINE_VERBS.items()}}
    described.update({v: text for v, (_, text) in CONFIG_VERBS.items()})
    width = max(map(len, described))
    lines += [f"  {verb:<{width}}  {text}" for verb, text in described.items()]
    lines += ["", "python -m biomedvital <verb> --help  shows a verb's options."]
    return "\n".join(lines)


def _cli_class() -> type:
    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningCLI

    from biomedvital.data.outputs import acquire_output, is_rank_zero
    from biomedvital.tracking.checkpoints import load_checkpoint

    class BiomedCLI(LightningCLI):
        """LightningCLI whose ``--ckpt_path`` hyper-parameter merge suits this suite.

        Lightning replaces the configured model by the class that wrote the checkpoint. Here a
        model may consume another's checkpoint (the VQA evaluator reads a tuner checkpoint), so
        the merge happens only when the classes agree (``--ckpt_path last`` is resolved to its
        file first, as for resuming); and the file is memory-mapped, so reading the
        hyper-parameters of a 13B checkpoint does not load its tensors. Checkpoints are read with
        ``weights_only=True`` (``--weights_only false`` is the explicit opt-out), and the
        trainer's ``default_root_dir`` is locked before anything is built (one run per folder).
        """

        def _parse_ckpt_path(self) -> None:
            sub = self.config.get("subcommand")
            if sub and self.config[sub].get("weights_only", True) is None:
                self.config[sub]["weights_only"] = True  # never unpickle a checkpoint by default
            ckpt_path = sub and self.config[sub].get("ckpt_path")
            if not ckpt_path:
                return
            if sub != "fit":
                # ``last`` names a file too (the documented ``predict --ckpt_path last``):
                # resolved here, or the model would be built with the config's
                # hyper-parameters, not its own. A resumed fit keeps its config's (as written in
                # its run folder), so its record matches the run that never stopped.
                ckpt_path = _resume_file(ckpt_path, self.config[sub].get("trainer") or {})
            if ckpt_path is None or not Path(ckpt_path).is_file():
                return
            trusted = self.config[sub].get("weights_only") is False  # --weights_only false
            ckpt = load_checkpoint(ckpt_path, mmap=True, trusted=trusted)
            hparams = dict(ckpt.get("hyper_parameters", {}))
            hparams.pop("_instantiator", None)
            wanted = (self.config[sub].get("model") or {}).get("class_path")
            written = hparams.pop("_class_path", None)
            if not hparams or (written and wanted and written != wanted):
                return
            model = {"class_path": written, "dict_kwargs": hparams} if written else hparams
            self.config = self.parser.parse_object({sub: {"model": model}}, self.config)

        def parse_arguments(self, parser: Any, args: Any) -> None:
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as e:  # the verb's own parser names the keys it accepts
                verb = sys.argv[1] if len(sys.argv) > 1 else ""
                e.parser = getattr(self, "_subcommand_parsers", {}).get(verb, parser)
                raise

        def before_instantiate_classes(self) -> None:
            # one run per output folder: the trainer's folder is locked before anything is built
            sub = self.config.get("subcommand")
            trainer = (self.config[sub] if sub else self.config).get("trainer") or {}
            _open_logger_store(trainer)
            if is_rank_zero():
                root = trainer.get("default_root_dir") or os.getcwd()
                _TRAINER_LOCKS.append(acquire_output(root))
            if sub == "fit":
                self._continue_run(self.config[sub], trainer)

        def _continue_run(self, cfg: Any, trainer: Any) -> None:
            # a resumed fit logs into the MLflow run that wrote its checkpoint: one training,
            # one run (metrics, artifacts, lineage), however often it was interrupted
            logger = trainer.get("logger")
            if not (
                hasattr(logger, "get")
                and str(logger.get("class_path", "")).endswith("MLflowLogger")
            ):
                return
            init = logger.get("init_args")
            if init is None or init.get("run_id") or not cfg.get("ckpt_path"):
                return
            path = _resume_file(cfg["ckpt_path"], trainer)
            if path is None:
                return
            trusted = cfg.get("weights_only") is False
            run_id = load_checkpoint(path, mmap=True, trusted=trusted).get("mlflow_run_id")
            if isinstance(run_id, str) and run_id:
                init["run_id"] = run_id

    return BiomedCLI


def _open_logger_store(trainer: Any) -> None:
    """Open the MLflow logger's store before jsonargparse builds the logger: a store of another
    MLflow schema is then refused in one line (``StoreVersionError``), not inside jsonargparse's
    dump of the logger Union it was instantiating."""
    logger = trainer.get("logger")
    if not (hasattr(logger, "get") and str(logger.get("class_path", "")).endswith("MLflowLogger")):
        return
    from biomedvital.tracking.mlflow import DEFAULT_STORE, tracking_uri

    tracking_uri((logger.get("init_args") or {}).get("store") or DEFAULT_STORE)


def _resume_file(ckpt_path: str, trainer: Any) -> Path | None:
    """The checkpoint file ``--ckpt_path`` names: a path, or ``last`` in the checkpoint folder
    (a callback's ``dirpath``, else ``<default_root_dir>/checkpoints``, as ``Checkpoints``)."""
    if ckpt_path != "last":
        return Path(ckpt_path) if Path(ckpt_path).is_file() else None
    folders = []
    for cb in trainer.get("callbacks") or []:
        init = cb.get("init_args") if hasattr(cb, "get") else None
        if init is not None and init.get("dirpath"):
            folders.append(Path(init["dirpath"]))
    folders.append(Path(trainer.get("default_root_dir") or os.getcwd()) / "checkpoints")
    return next((f / "last.ckpt" for f in folders if (f / "last.ckpt").is_file()), None)


def _loaded_path(tb: Any) -> str | None:
    """The file Lightning was loading when ``torch.load`` refused it (``path_or_url`` of its
    ``_load``), found in the traceback."""
    found = None
    while tb is not None:
        value = tb.tb_frame.f_locals.get("path_or_url")
        if isinstance(value, str | os.PathLike):
            found = os.fspath(value)
        tb = tb.tb_next
    return found


_TRAINER_LOCKS: list[Path] = []  # output folders locked by the trainer verbs now running


LIGHTNING_TIP = "💡 Tip:"
"""How Lightning's advertisements for its cloud packages begin (printed on every run without them)."""


def quiet_lightning_tips() -> None:
    """Drop Lightning's advertisements from the run's output (its other messages stay): a verb's
    output is what the run did."""
    import logging

    def no_tip(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(getattr(f, "__name__", "") == "no_tip" for f in logger.filters):  # once
            logger.addFilter(no_tip)


def run_trainer_verb(argv: list[str]) -> None:
    """LightningCLI with model and data chosen by ``class_path`` in the config; the trainer's
    ``default_root_dir`` is locked for the run (``biomedvital.data.outputs``)."""
    import pickle

    from lightning.pytorch import LightningDataModule, LightningModule

    from biomedvital.data.outputs import release_output
    from biomedvital.tracking.callbacks import RecordRun
    from biomedvital.tracking.checkpoints import UnsafeCheckpointError, unsafe_checkpoint_message

    LightningCLI = _cli_class()
    quiet_lightning_tips()

    # LightningCLI parses sys.argv, and multi-device launchers re-run it in child processes:
    # it must hold exactly this verb's arguments (also when a grid cell runs in-process)
    from jsonargparse import ArgumentError

    files = _config_files(argv)
    _check_config_files(files)
    _refuse_moved_keys(argv[0], argv[1:], files)
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    n_locks = len(_TRAINER_LOCKS)
    no_exit = {"exit_on_error": False}
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
            parser_kwargs={**no_exit, **{verb: dict(no_exit) for verb in TRAINER_VERBS}},
        )
    except ArgumentError as e:
        raise _config_error(argv[0], e, files, argv, getattr(e, "parser", None)) from None
    except ValueError as e:  # a group's own check (``decoding``), wrapped by jsonargparse
        cause = _config_cause(e)
        if cause is None:
            raise
        raise ConfigError(f"{argv[0]}: {_setting_source(str(cause), files, argv)}{cause}") from None
    except pickle.UnpicklingError as e:  # a checkpoint Lightning itself loads (--ckpt_path last)
        path = _loaded_path(e.__traceback__) or "the checkpoint"
        raise UnsafeCheckpointError(unsafe_checkpoint_message(path, e)) from e
    finally:
        sys.argv = saved
        while len(_TRAINER_LOCKS) > n_locks:
            release_output(_TRAINER_LOCKS.pop())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    verb = argv[0]
    if verb in TRAINER_VERBS:
        run_trainer_verb(argv)
    elif verb in PIPELINE_VERBS:
        from jsonargparse import ArgumentError, auto_cli, auto_parser

        files = _config_files(argv[1:])
        _check_config_files(files)
        fn = _load(PIPELINE_VERBS[verb][0])
        try:
            result = auto_cli(
                fn,
                args=argv[1:],
                as_positional=False,
                prog=f"python -m biomedvital {verb}",
                exit_on_error=False,
            )
        except ArgumentError as e:
            parser = auto_parser(fn, as_positional=False, exit_on_error=False)
            raise _config_error(verb, e, files, argv[1:], parser, fn) from None
        if isinstance(result, dict):
            import json

            print(json.dumps(result, indent=2, default=str))
    elif verb in CONFIG_VERBS:
        from jsonargparse import ArgumentError

        files = _config_files(argv[1:])
        _check_config_files(files)
        _refuse_moved_keys(verb, argv[1:], files)
        try:
            result = _load(CONFIG_VERBS[verb][0])(argv[1:])
        except ArgumentError as e:
            raise _config_error(verb, e, files, argv[1:]) from None
        if isinstance(result, dict):
            import json

            print(json.dumps(result, indent=2, default=str))
    else:
        print(f"unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
