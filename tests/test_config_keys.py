"""A misspelt key in a shipped config is one line naming the file, the key's full path, what
refused it and the nearest valid key: LightningCLI verbs (keys inside class_path/init_args blocks,
lists of callbacks, the trainer group) and jsonargparse pipeline verbs (top level, the client
group, command-line flags)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from biomedvital.cli import ConfigError, main
from biomedvital.config_keys import find_unknown_key

CONF = Path(__file__).resolve().parents[1] / "conf"


def _misspelt(tmp_path: Path, shipped: str, path: list, new_key: str) -> Path:
    """``conf/<shipped>`` with the key at ``path`` renamed to ``new_key`` (value kept)."""
    cfg = yaml.safe_load((CONF / shipped).read_text())
    node = cfg
    for part in path[:-1]:
        node = node[part]
    node[new_key] = node.pop(path[-1])
    out = tmp_path / Path(shipped).name
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _error(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        main(list(argv))
    return str(info.value)


@pytest.mark.parametrize(
    ("path", "typo", "shown", "owner", "nearest"),
    [
        (["model", "init_args", "w"], "ww", "model.init_args.ww", "SelectorModule", "w"),
        (
            ["data", "init_args", "pool", "init_args", "root"],
            "rot",
            "data.init_args.pool.init_args.rot",
            "DemoPool",
            "root",
        ),
        (
            ["trainer", "callbacks", 0, "init_args", "monitor"],
            "monitr",
            "trainer.callbacks[0].init_args.monitr",
            "Checkpoints",
            "monitor",
        ),
        (["trainer", "max_epochs"], "max_epoch", "trainer.max_epoch", "trainer", "max_epochs"),
    ],
    ids=["init_args", "nested_init_args", "callback_list", "trainer_group"],
)
def test_trainer_verb_misspelt_key_is_one_line(
    tmp_path: Path, path: list, typo: str, shown: str, owner: str, nearest: str
) -> None:
    config = _misspelt(tmp_path, "demo/selector.yaml", path, typo)
    msg = _error("fit", "--config", str(config))
    assert msg == f"{config}: {shown} is not an option of {owner}; did you mean {nearest}?"


def test_trainer_verb_misspelt_flag_names_the_command_line() -> None:
    msg = _error("fit", "--config", str(CONF / "demo" / "selector.yaml"), "--model.ww", "3")
    assert msg == (
        "the command line: --model.ww is not an option of SelectorModule; did you mean w?"
    )


@pytest.mark.parametrize(
    ("path", "typo", "shown", "owner", "nearest"),
    [
        (["vision"], "vison", "vison", "rate", "vision"),
        (
            ["client", "concurrency"],
            "concurency",
            "client.concurency",
            "ClientConfig",
            "concurrency",
        ),
    ],
    ids=["top_level", "client_group"],
)
def test_pipeline_verb_misspelt_key_is_one_line(
    tmp_path: Path, path: list, typo: str, shown: str, owner: str, nearest: str
) -> None:
    config = _misspelt(tmp_path, "demo/rate.yaml", path, typo)
    msg = _error("rate", "--config", str(config))
    assert msg == f"{config}: {shown} is not an option of {owner}; did you mean {nearest}?"


def test_pipeline_verb_misspelt_flag_names_the_command_line() -> None:
    base = str(CONF / "demo" / "judge.yaml")
    msg = _error("judge", "--config", base, "--client.concurency", "3")
    assert msg == (
        "the command line: --client.concurency is not an option of ClientConfig;"
        " did you mean concurrency?"
    )


def test_no_close_key_lists_the_options(tmp_path: Path) -> None:
    config = _misspelt(tmp_path, "demo/rate.yaml", ["vision"], "zzzzzz")
    msg = _error("rate", "--config", str(config))
    assert msg.startswith(f"{config}: zzzzzz is not an option of rate; its options: ")
    assert "sampling" in msg and "\n" not in msg


def test_other_parser_errors_are_not_taken_for_unknown_keys() -> None:
    assert (
        find_unknown_key('Parser key "trainer.max_epochs":\n  Expected a int. Got "many"') is None
    )


def test_a_value_of_the_wrong_type_is_one_line(tmp_path: Path) -> None:
    """Inside a class_path block, at a pipeline verb's top level, in a config file: the key, the
    type it takes and the value given; a text option that YAML read as a list is told to quote."""
    vqa = str(CONF / "eval" / "demo_vqa.yaml")
    assert _error("test", "--config", vqa, "--model.init_args.seed", "abc") == (
        "test: the command line: model.init_args.seed must be an integer, got abc"
    )
    assert _error(
        "test", "--config", vqa, "--model.init_args.closed_prompt_suffix", "[yes, no]"
    ) == (
        "test: the command line: model.init_args.closed_prompt_suffix must be a string, got "
        """[True, False] (the value is read as YAML: give it """
        """--model.init_args.closed_prompt_suffix '"[yes, no]"')"""
    )
    msg = _error("select", "--scores", "s", "--candidates", "c", "--out", "o", "--top_percent", "x")
    assert msg == "select: the command line: top_percent must be a number (or null), got x"
    cfg = yaml.safe_load((CONF / "demo" / "selector.yaml").read_text())
    cfg["model"]["init_args"]["w"] = "heavy"
    config = tmp_path / "selector.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    msg = _error("fit", "--config", str(config))
    assert msg.startswith(f"fit: {config}: model.init_args.w must be ") and "got heavy" in msg
    assert "\n" not in msg


def test_lightnings_advertisements_are_dropped_and_its_messages_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every trainer verb printed Lightning's tips for its cloud packages; they are dropped,
    Lightning's other messages are not."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from biomedvital.cli import LIGHTNING_TIP, quiet_lightning_tips

    quiet_lightning_tips()
    quiet_lightning_tips()  # idempotent: one filter
    with caplog.at_level("INFO"):
        rank_zero_info(f"{LIGHTNING_TIP} try installing something")
        rank_zero_info("GPU available: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]
