"""Every file in conf/ parses through the CLI (base configs alone, ablations as overlays)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from biomedvital.cli import main

CONF = Path(__file__).resolve().parents[1] / "conf"
# pipeline-verb configs (conf/demo/<verb>.yaml) and the demo's pool overlay are not trainer bases
PIPELINE = sorted(
    p for p in (CONF / "demo").glob("*.yaml") if p.stem in {"generate", "rate", "judge"}
)
PAPER_PIPELINE = sorted(
    p
    for p in (CONF / "paper").glob("*.yaml")
    if p.stem in {"generate", "rate", "judge", "pairwise"}
)
DEMO_OVERLAYS = [CONF / "demo" / "generated_pool.yaml"]
EVAL_OVERLAYS = [CONF / "eval" / "paper_decoding.yaml"]
"""Overlays added to any benchmark config of ``test`` / ``answer``."""
BASES = sorted(
    p
    for p in CONF.rglob("*.yaml")
    if not {"ablation", "grids", "strategy", "perf", "endpoints"} & set(p.parts)
    and p not in PIPELINE + PAPER_PIPELINE + DEMO_OVERLAYS + EVAL_OVERLAYS
)
ENDPOINTS = sorted((CONF / "endpoints").glob("*.yaml"))
CLIENT_VERBS = ("generate", "rate", "judge", "pairwise")
"""The verbs that share the ``client`` block (an endpoint file overlays any of them)."""
GROUPS = ("client", "sampling")
"""The grouped arguments of the chat verbs: a config sets some of their keys, the rest default."""
STRATEGIES = sorted((CONF / "strategy").glob("*.yaml"))
OVERLAYS = sorted((CONF / "ablation").glob("*.yaml"))
GRIDS = sorted((CONF / "grids").glob("*.yaml"))
PERF = sorted((CONF / "perf").glob("*.yaml"))


def _print_config(capsys: pytest.CaptureFixture[str], *configs: Path) -> dict:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    with pytest.raises(SystemExit) as e:
        main([*args, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_conf_has_files() -> None:
    assert BASES and OVERLAYS and STRATEGIES and PERF and ENDPOINTS
    assert {p.stem for p in PIPELINE} == {"generate", "rate", "judge"}
    assert {p.relative_to(CONF).as_posix() for p in BASES} >= {
        "demo/selector.yaml",
        "paper/selector.yaml",
    }


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.relative_to(CONF).as_posix())
def test_base_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _print_config(capsys, path)
    assert cfg["model"]["class_path"].startswith("biomedvital.")
    assert cfg["data"]["class_path"].startswith("biomedvital.")


@pytest.mark.parametrize("path", STRATEGIES, ids=lambda p: p.name)
def test_strategy_overlay_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Strategy overlays apply to the tuner's paper config (the multi-GPU recipe)."""
    merged = _print_config(capsys, CONF / "paper" / "tuner.yaml", path)
    strategy = yaml.safe_load(path.read_text())["trainer"]["strategy"]
    got = merged["trainer"]["strategy"]
    want = strategy["class_path"] if isinstance(strategy, dict) else strategy
    assert (got["class_path"] if isinstance(got, dict) else got) == want


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_ablation_overlay_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = CONF / "demo" / "selector.yaml"
    merged = _print_config(capsys, base, path)
    overlay = yaml.safe_load(path.read_text())
    for section, body in overlay.items():
        for key, value in body["init_args"].items():
            assert merged[section]["init_args"][key] == value, (section, key)


@pytest.mark.parametrize("path", PERF, ids=lambda p: p.name)
def test_perf_overlay_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Performance overlays apply to the tuner's paper config; every key they set survives."""
    merged = _print_config(capsys, CONF / "paper" / "tuner.yaml", path)
    for key, value in yaml.safe_load(path.read_text())["model"]["init_args"].items():
        got = merged["model"]["init_args"][key]
        if isinstance(value, dict):  # an argument group: the fields it sets, the rest kept
            got = {k: got[k] for k in value}
        assert got == value, key


def _pipeline_config(capsys: pytest.CaptureFixture[str], verb: str, *argv: str) -> dict:
    with pytest.raises(SystemExit) as e:
        main([verb, *argv, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", PIPELINE, ids=lambda p: p.relative_to(CONF).as_posix())
def test_pipeline_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """conf/demo/<verb>.yaml is accepted by its verb; every key it sets survives; the endpoint
    settings are one ``client`` block, not flat keys."""
    cfg = _pipeline_config(capsys, path.stem, "--config", str(path))
    for key, value in yaml.safe_load(path.read_text()).items():
        if isinstance(value, dict) and key in GROUPS:
            assert value.items() <= cfg[key].items(), key
        else:
            assert cfg[key] == value, key
    assert cfg["client"]["base_url"] == "local:smollm2"
    assert cfg["client"]["concurrency"] == 1  # the demo's llama.cpp: one request at a time
    assert not {"base_url", "model", "concurrency", "mode", "price_per_million"} & set(cfg)
    assert not {"temperature", "top_p", "seed", "max_tokens"} & set(cfg)  # in ``sampling``


@pytest.mark.parametrize("path", PAPER_PIPELINE, ids=lambda p: p.relative_to(CONF).as_posix())
def test_paper_pipeline_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """conf/paper/<verb>.yaml is accepted by its verb with every key it sets, points at an
    OpenAI-compatible endpoint with the key read from the environment, and keeps the paper's
    settings (vision for generation, rating and the pairwise judge, 5 demonstrations, the judge's
    captions)."""
    assert {p.stem for p in PAPER_PIPELINE} == {"generate", "rate", "judge", "pairwise"}
    raw = yaml.safe_load(path.read_text())
    cfg = _pipeline_config(capsys, path.stem, "--config", str(path))
    for key, value in raw.items():
        if isinstance(value, dict) and key in GROUPS:
            assert value.items() <= cfg[key].items(), key
        else:
            assert cfg[key] == value, key
    assert cfg["client"]["base_url"].startswith("https://")
    assert cfg["client"]["api_key_env"] == "OPENAI_API_KEY" and "api_key" not in cfg["client"]
    text = path.read_text()
    assert f"python -m biomedvital {path.stem} --config conf/paper/{path.stem}.yaml" in text
    if path.stem == "generate":
        assert (cfg["n_demos"], cfg["vision"], cfg["answers"]) == (5, True, 1)
        # the released clinician-demonstration script's values (docs/fidelity.md)
        sampling = cfg["sampling"]
        assert (cfg["prompt_style"], sampling["max_tokens"], sampling["temperature"]) == (
            "vital",
            4096,
            1.0,
        )
        assert (cfg["flagged_answers"], cfg["min_exchanges"]) == ("keep", 1)
        assert cfg["truncated_replies"] == "keep"
        assert cfg["demonstrations"].endswith("doctor_few_shot_examples.json")
    elif path.stem == "rate":
        assert cfg["vision"] is True and cfg["image_root"] and cfg["figures"]
        assert cfg["candidates"] == "outputs/paper/generate/candidates.jsonl"
        assert cfg["unit"] == "first_exchange"  # the released scorer's unit (docs/fidelity.md)
    elif path.stem == "pairwise":
        # a vision judge (the reference is always shown); both orders, reported apart and combined
        assert cfg["vision"] is True and cfg["image_root"] and cfg["benchmark"] == "vqa_rad"
        assert cfg["rule"] == "sum" and cfg["answers_a"] != cfg["answers_b"]
    else:
        assert cfg["vision"] is False and cfg["captions"].endswith("fig_captions.json")


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda p: p.name)
@pytest.mark.parametrize("path", PIPELINE, ids=lambda p: p.stem)
def test_endpoint_overlay_parses(
    path: Path, endpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """conf/endpoints/*.yaml overlays a verb's config: its client keys win, key by key; the
    rest of the verb's config (the demo's other client settings among it) stays."""
    base = yaml.safe_load(path.read_text())
    overlay = yaml.safe_load(endpoint.read_text())
    assert set(overlay) == {"client"}, "an endpoint file sets the client block only"
    cfg = _pipeline_config(capsys, path.stem, "--config", str(path), "--config", str(endpoint))
    assert cfg["client"] == {**cfg["client"], **base["client"], **overlay["client"]}
    for key, value in base.items():
        if key == "sampling":
            assert value.items() <= cfg[key].items(), key
        elif key != "client":
            assert cfg[key] == value, key


def test_one_endpoint_file_sets_the_client_of_every_verb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The four verbs take the same ``client`` block: one overlay (or ``--client.*`` flags)
    changes the endpoint of each, and a ``client`` key they do not know is refused."""
    from biomedvital.cli import ConfigError

    endpoint = tmp_path / "endpoint.yaml"
    endpoint.write_text(
        "client: {base_url: http://vllm:8000/v1, model: served, concurrency: 3,"
        " price_per_million: {input: 2.5, output: 10, batch: 0.5}}\n"
    )
    required = {
        "generate": ["--figures", "f", "--image_root", "i", "--demonstrations", "d", "--out", "o"],
        "rate": ["--candidates", "c", "--out", "o"],
        "judge": ["--questions", "q", "--answers", "a", "--out", "o"],
        "pairwise": ["--questions", "q", "--answers_a", "a", "--answers_b", "b", "--out", "o"],
    }
    assert set(required) == set(CLIENT_VERBS)
    for verb, argv in required.items():
        cfg = _pipeline_config(
            capsys, verb, *argv, "--config", str(endpoint), "--client.timeout_s", "30"
        )
        client = cfg["client"]
        assert (client["base_url"], client["model"], client["concurrency"]) == (
            "http://vllm:8000/v1",
            "served",
            3,
        ), verb
        assert client["price_per_million"] == {"input": 2.5, "output": 10.0, "batch": 0.5}
        assert client["timeout_s"] == 30 and client["api_key_env"] == "OPENAI_API_KEY"
        assert not {"base_url", "model", "api_key_env", "concurrency"} & set(cfg), verb
        with pytest.raises(ConfigError, match="concurency"):
            main([verb, *argv, "--config", str(endpoint), "--client.concurency", "2"])


def test_unknown_key_error_names_the_file_or_flag_that_sets_it(tmp_path: Path) -> None:
    from biomedvital.cli import ConfigError

    base = str(CONF / "demo" / "rate.yaml")
    nested, top = tmp_path / "nested.yaml", tmp_path / "top.yaml"
    nested.write_text("client:\n  concurency: 3\n")
    top.write_text("temprature: 0.1\n")
    for overlay, where in ((nested, "client.concurency"), (top, "temprature")):
        with pytest.raises(ConfigError) as info:
            main(["rate", "--config", base, "--config", str(overlay)])
        assert str(info.value).startswith(f"{overlay}: {where} is not an option of ")
    with pytest.raises(ConfigError) as info:
        main(["rate", "--config", base, "--client.concurency", "3"])
    assert str(info.value).startswith("the command line: --client.concurency ")


@pytest.mark.parametrize("verb", CLIENT_VERBS)
def test_a_flat_sampling_key_is_refused_naming_its_new_place(verb: str, tmp_path: Path) -> None:
    """temperature, top_p, seed and max_tokens live in ``sampling``: an old config's flat key,
    or flag, is refused in one line that says where it went."""
    from biomedvital.cli import ConfigError

    old = tmp_path / "old.yaml"
    old.write_text("max_tokens: 64\n")
    for argv, where in ((["--config", str(old)], str(old)), (["--temperature", "0.1"], None)):
        with pytest.raises(ConfigError) as info:
            main([verb, *argv])
        text = str(info.value)
        key = "max_tokens" if where else "temperature"
        assert f"'{key}' moved to 'sampling.{key}'" in text and "\n" not in text
        assert text.startswith(f"{verb}: {where or 'the command line'}: ")


def test_generated_pool_overlay_parses(capsys: pytest.CaptureFixture[str]) -> None:
    merged = _print_config(capsys, CONF / "demo" / "selector.yaml", *DEMO_OVERLAYS)
    pool = merged["data"]["init_args"]["pool"]
    assert pool["class_path"] == "biomedvital.data.pool.DemoPool"
    assert pool["init_args"]["extra_candidates"] == ["outputs/demo/generate/candidates.jsonl"]
    assert pool["init_args"]["extra_ratings"] == ["outputs/demo/rate/ratings.jsonl"]


def test_paper_config_is_faithful(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _print_config(capsys, CONF / "paper" / "selector.yaml")
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert model["backbone"] == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert (model["backbone_mode"], model["loss"], model["w"], model["lr"]) == (
        "finetune",
        "hinge",
        400.0,
        1e-5,
    )
    assert model["head_hidden"] == [512, 512, 512]
    assert (data["batch_size"], data["model_pairs"], data["val_model_pairs"]) == (64, 30000, 10000)
    assert data["text_recipe"] == "paper" and cfg["trainer"]["max_epochs"] == 6
    assert (
        "python -m biomedvital fit --config conf/paper/selector.yaml"
        in (CONF / "paper" / "selector.yaml").read_text()
    )
    # the released head is Linear-ReLU x 3 then Linear-Sigmoid, hinge margin 1, one Adam lr
    assert (model["dropout"], model["margin"], model["head_lr"], model["weight_decay"]) == (
        0.0,
        1.0,
        None,
        0.0,
    )
    assert data["train_fraction"] == 0.8 and cfg["trainer"]["precision"] == "32-true"


def test_paper_clinician_split_is_50_train_2000_test(capsys: pytest.CaptureFixture[str]) -> None:
    """The paper trains the selector on 50 clinician pairs and measures alignment on 2,000: the
    paper config must train on 50 whatever the file's size (w = 400 is tuned to 50 training
    pairs against 30,000 model pairs)."""
    import numpy as np

    from biomedvital.selection.pairs import split_clinician

    data = _print_config(capsys, CONF / "paper" / "selector.yaml")["data"]["init_args"]
    for n in (2050, 3000):
        groups = [f"img{i}" for i in range(n)]  # one figure per pair
        train, val = split_clinician(
            groups,
            data["clinician_val_fraction"],
            np.random.default_rng(0),
            data["clinician_train_pairs"],
        )
        assert (len(train), len(val)) == (50, n - 50)


def _diff(a: object, b: object, path: str = "") -> dict[str, tuple[object, object]]:
    """Leaves that differ between two resolved configs, by dotted path."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[object, object]] = {}
        for k in sorted(set(a) | set(b), key=str):
            out |= _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return {} if a == b else {path: (a, b)}


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_ablation_overlay_changes_only_what_it_names_on_the_paper_config(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--config conf/paper/selector.yaml --config conf/ablation/X.yaml`` is the paper config
    with exactly the overlay's keys changed (to the overlay's values)."""
    paper = _print_config(capsys, CONF / "paper" / "selector.yaml")
    merged = _print_config(capsys, CONF / "paper" / "selector.yaml", path)
    overlay = yaml.safe_load(path.read_text())
    named = {
        f"{section}.init_args.{key}": value
        for section, body in overlay.items()
        for key, value in body["init_args"].items()
    }
    changed = _diff(paper, merged)
    for key, value in named.items():
        section, _, name = key.split(".")
        assert merged[section]["init_args"][name] == value, key
    assert set(changed) <= set(named), f"{path.name} also changed {set(changed) - set(named)}"
    # every overlay changes something on the paper config, except w400 (the paper's own w)
    assert bool(changed) == (path.stem != "w400"), changed


def test_ablation_overlays_stack(capsys: pytest.CaptureFixture[str]) -> None:
    """Later overlays win key by key: frozen + w10 keeps both, on top of the paper config."""
    paper = _print_config(capsys, CONF / "paper" / "selector.yaml")
    merged = _print_config(
        capsys,
        CONF / "paper" / "selector.yaml",
        CONF / "ablation" / "frozen.yaml",
        CONF / "ablation" / "w10.yaml",
        CONF / "ablation" / "ranknet.yaml",
    )
    assert _diff(paper, merged) == {
        "model.init_args.backbone_mode": ("finetune", "frozen"),
        "model.init_args.w": (400.0, 10.0),
        "model.init_args.loss": ("hinge", "ranknet"),
    }


PAPER_W_SWEEP = {1.0, 10.0, 100.0, 200.0, 300.0, 400.0}


def test_w_overlays_and_their_comments() -> None:
    """conf/ablation/w<N>.yaml sets w = N; only the paper's sweep values claim to be in it."""
    found = {}
    for path in sorted((CONF / "ablation").glob("w*.yaml")):
        w = yaml.safe_load(path.read_text())["model"]["init_args"]["w"]
        assert float(path.stem[1:]) == w, path.name
        found[w] = path.read_text().splitlines()[0]
    assert set(found) >= PAPER_W_SWEEP
    for w, header in found.items():
        assert (w in PAPER_W_SWEEP) == (
            "in the paper's sweep" in header or "paper's best" in header
        ), (
            w,
            header,
        )
    for w in set(found) - PAPER_W_SWEEP:
        assert "beyond the paper's sweep" in found[w], found[w]
    assert "paper's best" in found[400.0]


def test_paper_tuner_config_is_the_documented_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    """LLaVA-1.5-13B, LLaVA-1.5's task LoRA (r 128, alpha 256, lr 2e-4, projector 2e-5) on
    LLaVA-Med stage 2's schedule (global batch 128, 3 epochs, cosine with 3 % warmup, max length
    2048, vision tower frozen), also on the 2-node launch of the header."""
    path = CONF / "paper" / "tuner.yaml"
    cfg = _print_config(capsys, path)
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert model["model"] == "hf-hub:llava-hf/llava-1.5-13b-hf"
    lora, optim, vision = model["lora"], model["optim"], model["vision"]
    assert (model["mode"], lora["r"], lora["alpha"]) == ("lora", 128, 256)
    assert (optim["lr"], optim["projector_lr"], optim["warmup_ratio"]) == (2e-4, 2e-5, 0.03)
    assert optim["min_lr_ratio"] == 0.0 and optim["weight_decay"] == 0.0  # cosine to 0, no decay
    assert vision["freeze_tower"] and vision["train_projector"]
    assert lora["scope"] == "language_model"
    assert data["max_length"] == 2048 and trainer["max_epochs"] == 3
    assert trainer["precision"] == "bf16-mixed"

    def global_batch(c: dict) -> int:
        t = c["trainer"]
        world = t["devices"] * t["num_nodes"]
        assert t["strategy"]["init_args"]["data_parallel_size"] == world
        return c["data"]["init_args"]["batch_size"] * world * t["accumulate_grad_batches"]

    assert global_batch(cfg) == 128
    two_nodes = [
        "--trainer.num_nodes", "2", "--trainer.accumulate_grad_batches", "2",
        "--trainer.strategy.init_args.data_parallel_size", "16",
    ]  # fmt: skip
    header = path.read_text()
    assert all(arg in header for arg in two_nodes)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), *two_nodes, "--print_config"])
    assert global_batch(yaml.safe_load(capsys.readouterr().out)) == 128


@pytest.mark.parametrize("name", ["vqa_rad", "slake", "pathvqa"])
def test_vqa_eval_configs_use_llava_meds_rule(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["test", "--config", str(CONF / "eval" / f"{name}.yaml"), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["init_args"]["closed_rule"] == "llava_med"
    assert cfg["data"]["init_args"]["benchmark"] == name
    assert cfg["data"]["init_args"]["split"] == "test"


@pytest.mark.parametrize("overlay", EVAL_OVERLAYS, ids=lambda p: p.name)
@pytest.mark.parametrize("base", ["vqa_rad", "demo_vqa"])
def test_eval_overlay_applies_to_a_benchmark_config(
    overlay: Path, base: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``test --config conf/eval/<benchmark>.yaml --config <overlay>``: the overlay's keys
    replace the base's, everything else is the base's."""
    config = CONF / "eval" / f"{base}.yaml"
    with pytest.raises(SystemExit):
        main(["test", "--config", str(config), "--print_config"])
    alone = yaml.safe_load(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["test", "--config", str(config), "--config", str(overlay), "--print_config"])
    merged = yaml.safe_load(capsys.readouterr().out)
    decoding = yaml.safe_load(overlay.read_text())["model"]["init_args"]["decoding"]
    assert merged["model"]["init_args"]["decoding"] == decoding
    assert alone["model"]["init_args"]["decoding"]["strategy"] == "greedy"
    merged["model"]["init_args"]["decoding"] = alone["model"]["init_args"]["decoding"]
    assert merged == alone


def test_paper_numbers_in_header_and_docs(capsys: pytest.CaptureFixture[str]) -> None:
    """The selector's and tuner's paper numbers, as their headers and their docs pages state them,
    are the configs' values."""
    sel = _print_config(capsys, CONF / "paper" / "selector.yaml")
    tun = _print_config(capsys, CONF / "paper" / "tuner.yaml")
    m, d = sel["model"]["init_args"], sel["data"]["init_args"]
    lora, optim = tun["model"]["init_args"]["lora"], tun["model"]["init_args"]["optim"]
    selector_says = [
        f"w = {m['w']:g}",
        f"lr {m['lr']:.0e}".replace("e-0", "e-"),
        f"{sel['trainer']['max_epochs']} epochs",
        f"batch {d['batch_size']}",
        "1024-512-512-512-1",
    ]
    tuner_says = [
        f"r {lora['r']}",
        f"alpha {lora['alpha']}",
        f"lr {optim['lr']:.0e}".replace("e-0", "e-"),
        f"projector lr {optim['projector_lr']:.0e}".replace("e-0", "e-"),
        f"max length {tun['data']['init_args']['max_length']}",
        f"warmup {optim['warmup_ratio'] * 100:g} %",
    ]
    header = (CONF / "paper" / "selector.yaml").read_text()
    assert [s for s in selector_says if s not in header] == []
    header = (CONF / "paper" / "tuner.yaml").read_text()
    assert [s for s in tuner_says if s not in header] == []
    docs = CONF.parent / "docs"

    def page(name: str) -> str:
        return (docs / name).read_text().replace("\u2011", "-").replace("→", "-")

    assert [s for s in selector_says if s not in page("selector.md")] == []
    tuning = page("tuning.md")
    assert [s for s in tuner_says if s.replace("projector lr", "projector") not in tuning] == []


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_grid_cells_parse(path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """Every stage of every cell of every grid resolves to a config its verb accepts, tagged
    with the grid, the cell and the stage. A command that differs from one already parsed only
    by the cell's name (its folder, its tags) is the same config and parsed once."""
    import re

    from biomedvital.grid import TRAINER_VERBS, cell_names, load_grid, stage_commands

    monkeypatch.chdir(CONF.parent)
    rel = path.relative_to(CONF.parent)
    seen: set[tuple[str, ...]] = set()
    for cell in cell_names(load_grid(rel)):
        name = re.compile(rf"(?<![\w.-]){re.escape(cell)}(?![\w.-])")
        for stage in stage_commands(rel, cell):
            shape = tuple(name.sub("{cell}", a) for a in stage["argv"])
            if shape in seen:
                continue
            seen.add(shape)
            with pytest.raises(SystemExit):
                main([*stage["argv"], "--print_config"])
            cfg = yaml.safe_load(capsys.readouterr().out)
            want = {"grid": path.stem, "cell": cell, "stage": stage["stage"]}
            if stage["argv"][0] in TRAINER_VERBS:
                root = cfg["trainer"]["default_root_dir"]
                assert root.startswith(f"outputs/grids/{path.stem}/{cell}")
                tags = cfg["trainer"]["logger"]["init_args"]["tags"]
            else:
                tags = cfg["tags"]
            assert want.items() <= tags.items()
