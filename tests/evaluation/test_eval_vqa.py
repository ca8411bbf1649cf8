"""VQA evaluation through ``python -m biomedvital test``: a tiny LLaVA tuned one step by the CLI,
evaluated as an exported folder and as a tuner checkpoint on the demo VQA set."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_process import run_cli
from lightning.pytorch import Callback
from tiny_tuner import tiny_tuner_data, tiny_tuner_model

from biomedvital.cli import main
from biomedvital.data.demo import materialize_demo
from biomedvital.data.report import BadRecordError
from biomedvital.evaluation.benchmarks import load_vqa_rad, split_stats
from biomedvital.evaluation.decoding import Decoding
from biomedvital.evaluation.demo_vqa import demo_vqa_records, write_demo_vqa
from biomedvital.evaluation.score_vqa import score_vqa
from biomedvital.evaluation.vqa_eval import VQADataModule, VQAEvaluator, collate_vqa

CONF = Path(__file__).resolve().parents[2] / "conf" / "eval" / "demo_vqa.yaml"


def _tuner_config(tmp: Path, selected: Path, images: Path, store: Path) -> Path:
    out = tmp / "tuner"
    cfg = {
        "seed_everything": 0,
        "model": tiny_tuner_model(),
        "data": tiny_tuner_data(selected, images),
        "trainer": {
            "max_steps": 2,
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(out),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "biomedvital.tracking.MLflowLogger",
                "init_args": {"experiment": "tuning", "store": str(store)},
            },
            "callbacks": [
                {
                    "class_path": "biomedvital.tracking.Checkpoints",
                    "init_args": {"save_last": True},
                },
                {
                    "class_path": "biomedvital.tuning.ExportTuned",
                    "init_args": {"dirpath": str(out / "export"), "adapter": False},
                },
            ],
        },
    }
    path = tmp / "tuner.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Demo pool, demo VQA questions, and a tiny LLaVA tuned 2 steps (checkpoint + export)."""
    tmp = tmp_path_factory.mktemp("eval")
    files = materialize_demo(tmp / "demo")
    rows = [json.loads(x) for x in files.candidates.read_text().splitlines() if x.strip()]
    selected = tmp / "selected.json"
    selected.write_text(json.dumps(rows[::6][:8]))
    store = tmp / "mlruns"
    main(["fit", "--config", str(_tuner_config(tmp, selected, files.images, store))])
    return {
        "tmp": tmp,
        "images": files.images,
        "questions": write_demo_vqa(tmp / "demo_vqa.json"),
        "store": store,
        "merged": tmp / "tuner" / "export" / "merged",
        "ckpt": tmp / "tuner" / "checkpoints" / "last.ckpt",
    }


def _test(s: dict[str, Path], out: str, *extra: str) -> Path:
    root = s["tmp"] / out
    main(
        [
            "test",
            "--config",
            str(CONF),
            "--data.init_args.data",
            str(s["questions"]),
            "--data.init_args.image_root",
            str(s["images"]),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.store",
            str(s["store"]),
            *extra,
        ]
    )
    return root


def _predictions(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def merged_run(setup: dict[str, Path]) -> Path:
    return _test(setup, "merged", "--model.init_args.model", f"local-dir:{setup['merged']}")


def test_demo_vqa_file_is_vqa_rad_layout(tmp_path: Path) -> None:
    path = write_demo_vqa(tmp_path / "q.json")
    items = load_vqa_rad(path, "test")
    assert [it.question_id for it in items] == [str(i) for i in range(len(items))]
    stats = split_stats(items)
    assert stats["images"] == 6 and stats["open"] >= 6 and stats["closed"] >= 12
    assert {it.answer for it in items if it.answer_type == "closed"} == {"yes", "no"}
    assert demo_vqa_records() == json.loads(path.read_text())  # deterministic


def test_merged_export_through_cli(setup: dict[str, Path], merged_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    preds = _predictions(merged_run)
    items = load_vqa_rad(setup["questions"], "test")
    assert [p["question_id"] for p in preds] == [it.question_id for it in items]
    assert all(isinstance(p["text"], str) for p in preds)
    assert len({p["text"] for p in preds}) > 1  # the answers depend on image and question

    # logged metrics are exactly what score-vqa computes from the written file
    ref = score_vqa("vqa_rad", setup["questions"], merged_run / "predictions.jsonl")
    record = json.loads((merged_run / "run.test.json").read_text())
    client = MlflowClient(tracking_uri(setup["store"]))
    metrics = client.get_run(record["mlflow_run_id"]).data.metrics
    for key in ("open_recall", "open_f1", "closed_acc", "bleu1", "open_exact"):
        assert metrics[f"test/demo_vqa/{key}"] == pytest.approx(
            ref[key], rel=1e-6
        )  # logged as float32
    assert metrics["test/demo_vqa/n_open"] == ref["n_open"]
    assert metrics["test/demo_vqa/n_closed"] == ref["n_closed"]
    artifacts = {a.path for a in client.list_artifacts(record["mlflow_run_id"], "eval/demo_vqa")}
    assert artifacts == {"eval/demo_vqa/predictions.jsonl", "eval/demo_vqa/scores.json"}
    scores = json.loads((merged_run / "scores.json").read_text())
    assert scores["closed_acc"] == pytest.approx(ref["closed_acc"])
    assert record["data"]["counts"]["qa"] == len(items)
    # preprocessed as the export records it was tuned (the config leaves it unset)
    assert record["resolved"] == {"image_aspect_ratio": "pad", "trained_image_aspect_ratio": "pad"}
    assert client.get_run(record["mlflow_run_id"]).data.tags["image_aspect_ratio"] == "pad"


def test_batch_one_gives_identical_predictions(setup: dict[str, Path], merged_run: Path) -> None:
    one = _test(
        setup,
        "merged-b1",
        "--model.init_args.model",
        f"local-dir:{setup['merged']}",
        "--data.init_args.batch_size",
        "1",
    )
    assert _predictions(one) == _predictions(merged_run)


def test_exported_processor_prompts_as_trained(setup: dict[str, Path]) -> None:
    """A user of the export (``AutoProcessor.apply_chat_template``, or vLLM serving the folder
    through it) asks with the tokens the evaluator asks with, the start of a training sample:
    system prompt, ``<image>`` placeholders, separators; and batches pad on the left."""
    from PIL import Image
    from transformers import AutoProcessor

    from biomedvital.data.records import Turn
    from biomedvital.tuning.conversation import IGNORE_INDEX, encode, prompt, render
    from biomedvital.tuning.models import image_token_count

    served = AutoProcessor.from_pretrained(setup["merged"])
    assert served.tokenizer.padding_side == "left"
    evaluator = VQAEvaluator(model=f"local-dir:{setup['merged']}")
    evaluator.build()
    image = Image.open(setup["images"] / "retina.jpg")
    question = "Is anything abnormal?"
    ask = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    got = served.apply_chat_template(
        ask, add_generation_prompt=True, tokenize=True, return_dict=True, images=[image]
    )["input_ids"][0]
    want = evaluator.processor(text=prompt(question), images=image)["input_ids"][0]
    assert [int(i) for i in got] == [int(i) for i in want]
    # a whole conversation: the training sample's tokens, the answers as its loss mask
    turns = [Turn(**{"from": "human", "value": "<image>\n" + question}),
             Turn(**{"from": "gpt", "value": "No."})]  # fmt: skip
    train = encode(render(turns), served.tokenizer, image_token_count(served))
    chat = [*ask, {"role": "assistant", "content": "No."}]
    out = served.apply_chat_template(
        chat, tokenize=True, return_dict=True, images=[image], return_assistant_tokens_mask=True
    )
    assert [int(i) for i in out["input_ids"][0]] == train.input_ids.tolist()
    mask = [int(m) for m in out["assistant_masks"][0]]
    assert mask == (train.labels != IGNORE_INDEX).astype(int).tolist()


def _wide_image(setup: dict[str, Path]) -> tuple[Path, str]:
    """A real image cut to 3:1 (wider than tall) in its own image root, and its name."""
    from PIL import Image

    root = setup["tmp"] / "wide-images"
    if not (root / "wide.png").is_file():
        root.mkdir(exist_ok=True)
        retina = Image.open(setup["images"] / "retina.jpg").convert("RGB")
        w, h = retina.size
        retina.crop((0, h // 3, w // 3 * 3, h // 3 + w // 3)).save(root / "wide.png")
    return root, "wide.png"


def _tuner_pixels(root: Path, name: str, aspect: str, tmp: Path) -> torch.Tensor:
    """The tuner's batch ``pixel_values`` of a one-sample selected.json on ``name``."""
    from biomedvital.tuning.datamodule import TunerDataModule
    from biomedvital.tuning.models import create_llava

    sample = {
        "id": "w0",
        "image": name,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A retina."},
        ],
    }
    data = tmp / f"selected-{aspect}.json"
    data.write_text(json.dumps([sample]))
    dm = TunerDataModule(str(data), str(root), num_workers=0, image_aspect_ratio=aspect)
    dm.processor = create_llava("tiny:tiny-llava").processor
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))["pixel_values"][0]


def _evaluator_pixels(ev: VQAEvaluator, image: Any) -> torch.Tensor:
    """The ``pixel_values`` the evaluator's ``generate`` receives for ``image``."""
    seen: list[torch.Tensor] = []
    generate = ev.model.generate

    def spy(**kwargs: Any) -> Any:
        seen.append(kwargs["pixel_values"])
        return generate(**kwargs)

    ev.model.generate = spy
    try:
        ev.answer([image], ["What is shown?"])
    finally:
        ev.model.generate = generate
    return seen[0][0]


def test_padding_fills_a_square_with_the_mean_colour_as_trained(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """``image_aspect_ratio: pad`` on a non-square image: the border is the processor's mean
    colour (about 0 once normalised), the pixels are LLaVA-1.5's (the image centred on a square
    of ``int(255 * mean)``, then the CLIP processor), and the evaluator of the export feeds the
    model exactly the tuner's batch pixels; ``crop`` is the CLIP processor alone."""
    from PIL import Image

    from biomedvital.data.images import ImageRoot
    from biomedvital.tuning.models import create_llava

    root, name = _wide_image(setup)
    image = ImageRoot(root).load(name)
    assert image.width == 3 * image.height
    train = _tuner_pixels(root, name, "pad", tmp_path)
    ev = VQAEvaluator(model=f"local-dir:{setup['merged']}", decoding=Decoding(max_new_tokens=1))
    ev.build()
    assert torch.equal(_evaluator_pixels(ev, image), train)

    clip = create_llava("tiny:tiny-llava").processor.image_processor  # untouched
    mean, std = torch.tensor(clip.image_mean), torch.tensor(clip.image_std)
    fill = tuple(int(255 * m) for m in clip.image_mean)
    border = ((torch.tensor(fill) / 255 - mean) / std)[:, None, None]
    assert border.abs().max() < 0.02  # the mean colour, normalised: about 0
    side = train.shape[-1]
    band = side // 3 - 4  # rows of pure border above and below the image (a third each)
    assert torch.allclose(train[:, :band], border.expand(3, band, side), atol=1e-5)
    assert torch.allclose(train[:, -band:], border.expand(3, band, side), atol=1e-5)
    assert train[:, side // 2].sub(border[:, 0]).abs().mean() > 0.1  # the image in the middle
    square = Image.new("RGB", (image.width, image.width), fill)
    square.paste(image, (0, (image.width - image.height) // 2))
    want = clip(images=square, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(train, want)

    crop = _tuner_pixels(root, name, "crop", tmp_path)
    assert torch.equal(crop, clip(images=image, return_tensors="pt")["pixel_values"][0])
    assert not torch.allclose(crop[:, :band], border.expand(3, band, side), atol=0.1)


def test_image_aspect_ratio_is_recorded_and_followed(setup: dict[str, Path]) -> None:
    """The tuner records its value in run.json, run.fit.json, the checkpoint and the export's
    processor config; the evaluator follows the record unless told otherwise, and then
    warns; ``test`` records what it used in run.test.json."""
    import shutil

    from biomedvital.tracking.checkpoints import load_checkpoint
    from biomedvital.tuning.models import load_tuner_checkpoint

    export = setup["merged"].parent
    saved = json.loads((setup["merged"] / "processor_config.json").read_text())
    config = saved["image_processor"]
    assert config["image_aspect_ratio"] == "pad" and config["do_pad"] is True
    assert config["image_processor_type"] == "LlavaImageProcessor"  # what servers load
    assert json.loads((export / "run.json").read_text())["image_aspect_ratio"] == "pad"
    fit = json.loads((export.parent / "run.fit.json").read_text())
    assert fit["data"]["image_aspect_ratio"] == "pad"
    ckpt = load_checkpoint(setup["ckpt"], mmap=True)
    assert ckpt["TunerDataModule"] == {"image_aspect_ratio": "pad"}
    loaded = load_tuner_checkpoint(setup["ckpt"])
    assert loaded.processor.image_processor.do_pad is True

    cropped = setup["tmp"] / "tuned-crop"
    shutil.copytree(export, cropped)
    crop = {**config, "image_aspect_ratio": "crop", "do_pad": False}
    (cropped / "merged" / "processor_config.json").write_text(
        json.dumps({**saved, "image_processor": crop})
    )
    as_trained = VQAEvaluator(model=f"local-dir:{cropped / 'merged'}")
    as_trained.build()
    assert as_trained.resolved == {
        "image_aspect_ratio": "crop",
        "trained_image_aspect_ratio": "crop",
    }
    assert as_trained.processor.image_processor.do_pad is False
    told = VQAEvaluator(model=f"local-dir:{cropped / 'merged'}", image_aspect_ratio="pad")
    with pytest.warns(UserWarning, match="image_aspect_ratio is 'pad', but .* trained with 'crop'"):
        told.build()
    assert told.processor.image_processor.do_pad is True


def test_a_bad_image_aspect_ratio_is_one_error_naming_the_key(tmp_path: Path) -> None:
    """From Python, and through the CLI for fit, test and answer (a flag or a config file)."""
    from biomedvital.cli import ConfigError
    from biomedvital.tuning.datamodule import TunerDataModule

    msg = "^image_aspect_ratio must be 'pad' or 'crop', got 'square'$"
    with pytest.raises(ValueError, match=msg):
        TunerDataModule("x.json", "images", image_aspect_ratio="square")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=msg):
        VQAEvaluator(image_aspect_ratio="square")  # type: ignore[arg-type]
    tuner = Path(__file__).resolve().parents[2] / "conf" / "demo" / "tuner.yaml"
    overlay = tmp_path / "square.yaml"
    overlay.write_text("data:\n  init_args:\n    image_aspect_ratio: square\n")
    choices = "must be one of 'pad', 'crop', got 'square'"
    for argv, want in (
        (
            ["fit", "--config", str(tuner), "--data.init_args.image_aspect_ratio", "square"],
            f"fit: the command line: data.init_args.image_aspect_ratio {choices}",
        ),
        (
            ["fit", "--config", str(tuner), "--config", str(overlay)],
            f"fit: {overlay}: data.init_args.image_aspect_ratio {choices}",
        ),
        (
            ["test", "--config", str(CONF), "--model.init_args.image_aspect_ratio", "square"],
            f"test: the command line: model.init_args.image_aspect_ratio {choices}",
        ),
        (
            ["answer", "--config", str(CONF), "--model.init_args.image_aspect_ratio", "square"],
            f"answer: the command line: model.init_args.image_aspect_ratio {choices}",
        ),
    ):
        with pytest.raises(ConfigError) as err:
            main(argv)
        assert str(err.value) == want


def test_evaluator_asks_with_the_system_prompt_the_model_was_tuned_with(
    setup: dict[str, Path],
) -> None:
    """A model tuned without a system prompt (``system_prompt: ""``) is not asked with
    vicuna_v1's: the export records the one it was tuned with and the evaluator takes it."""
    import shutil

    from biomedvital.tuning.conversation import VICUNA_V1_SYSTEM

    export = setup["merged"].parent
    assert json.loads((export / "run.json").read_text())["system_prompt"] == VICUNA_V1_SYSTEM
    tuned_bare = setup["tmp"] / "tuned-bare"
    shutil.copytree(export, tuned_bare)
    record = json.loads((tuned_bare / "run.json").read_text())
    (tuned_bare / "run.json").write_text(json.dumps({**record, "system_prompt": ""}))

    dm = VQADataModule("vqa_rad", str(setup["questions"]), str(setup["images"]), batch_size=8)
    rows = collate_vqa([dm.test_dataloader().dataset[i] for i in range(8)])
    questions = [it.question for it in rows["items"]]

    def answers(**kwargs: Any) -> list[str]:
        merged = f"local-dir:{tuned_bare / 'merged'}"
        ev = VQAEvaluator(model=merged, decoding=Decoding(max_new_tokens=8), **kwargs)
        ev.build()
        return ev.answer(rows["images"], questions)

    default = answers()
    assert default == answers(system_prompt="")
    assert default != answers(system_prompt=VICUNA_V1_SYSTEM)  # the prompt shows in the answers


def test_tuner_checkpoint_through_cli(setup: dict[str, Path], merged_run: Path) -> None:
    root = _test(
        setup,
        "ckpt",
        "--model.init_args.model",
        "null",
        "--model.init_args.checkpoint",
        str(setup["ckpt"]),
    )
    got, want = _predictions(root), _predictions(merged_run)
    assert [p["question_id"] for p in got] == [p["question_id"] for p in want]
    # LoRA applied unmerged (checkpoint) vs merged (export): same answers
    same = sum(a["text"] == b["text"] for a, b in zip(got, want, strict=True))
    assert same >= len(want) - 1
    # and not the untuned base: the checkpoint's trained tensors were loaded
    base = _test(setup, "base", "--model.init_args.model", "tiny:tiny-llava")
    assert [p["text"] for p in _predictions(base)] != [p["text"] for p in got]
    # the tuning run is recorded as upstream of the evaluation run
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    run_id = json.loads((root / "run.test.json").read_text())["mlflow_run_id"]
    tags = MlflowClient(tracking_uri(setup["store"])).get_run(run_id).data.tags
    assert tags.get("upstream_run")


def test_lightning_ckpt_path_loads_tuner_checkpoint(
    setup: dict[str, Path], merged_run: Path
) -> None:
    """``Trainer.test(ckpt_path=tuner.ckpt)``: the tuner is rebuilt before its tensors load."""
    from lightning.pytorch import Trainer

    root = setup["tmp"] / "trainer-ckpt"
    dm = VQADataModule(
        "vqa_rad", str(setup["questions"]), str(setup["images"]), name="demo_vqa", batch_size=16
    )
    ev = VQAEvaluator(decoding=Decoding(max_new_tokens=24))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(ev, dm, ckpt_path=str(setup["ckpt"]))
    got, want = _predictions(root), _predictions(merged_run)
    assert sum(a["text"] == b["text"] for a, b in zip(got, want, strict=True)) >= len(want) - 1


def test_model_and_checkpoint_together_refused(setup: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="both model="):
        _test(setup, "both", "--model.init_args.checkpoint", str(setup["ckpt"]))


def test_wrong_layout_names_the_file(setup: dict[str, Path]) -> None:
    bad = setup["tmp"] / "slake_layout.json"
    bad.write_text(json.dumps([{"qid": 1, "img_name": "x.png", "question": "q", "answer": "a"}]))
    with pytest.raises(BadRecordError) as e:
        _test(setup, "bad", "--data.init_args.data", str(bad))
    assert str(bad) in str(e.value) and "phrase_type" in str(e.value)


def test_batched_generation_matches_single(setup: dict[str, Path]) -> None:
    """Left padding: a question's greedy answer does not depend on its batch neighbours."""
    dm = VQADataModule("vqa_rad", str(setup["questions"]), str(setup["images"]), batch_size=16)
    ev = VQAEvaluator(model=f"local-dir:{setup['merged']}", decoding=Decoding(max_new_tokens=12))
    ev.build()
    ds = dm.test_dataloader().dataset
    rows = [ds[i] for i in range(len(ds))]
    batch = collate_vqa(rows[:16])
    batched = ev.answer(batch["images"], [it.question for it in batch["items"]])
    single = [ev.answer([r["image"]], [r["item"].question])[0] for r in rows[:16]]
    assert batched == single


def test_cli_ckpt_path_evaluates_a_tuner_checkpoint(
    setup: dict[str, Path], merged_run: Path
) -> None:
    """``python -m biomedvital test --config … --ckpt_path tuner.ckpt`` keeps the evaluator (the
    CLI merges checkpoint hyper-parameters only when the classes agree)."""
    root = _test(
        setup, "cli-ckpt", "--model.init_args.model", "null", "--ckpt_path", str(setup["ckpt"])
    )
    got, want = _predictions(root), _predictions(merged_run)
    assert sum(a["text"] == b["text"] for a, b in zip(got, want, strict=True)) >= len(want) - 1


@pytest.mark.heavy
def test_two_processes_write_what_one_writes(setup: dict[str, Path]) -> None:
    """DDP over 2 gloo processes: each answers whole batches (16 + 13 of 29 questions), rank 0
    writes them in the split's order; files and MLflow metrics equal the one-process run's.
    (Lightning's own sampler would pad the 29 to 30, answering one question twice.)"""
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    limit = ("--data.init_args.limit", "29")
    model = ("--model.init_args.model", f"local-dir:{setup['merged']}")
    single = _test(setup, "merged-29", *model, *limit)
    root = setup["tmp"] / "merged-ddp"
    run_cli(
        "test", "--config", CONF,
        "--data.init_args.data", setup["questions"],
        "--data.init_args.image_root", setup["images"],
        "--trainer.default_root_dir", root,
        "--trainer.logger.init_args.store", setup["store"],
        *model, *limit, "--trainer.devices", "2", "--trainer.strategy", "ddp",
    )  # fmt: skip
    assert _predictions(root) == _predictions(single)
    one = json.loads((single / "scores.json").read_text())
    two = json.loads((root / "scores.json").read_text())
    for d in (one, two):
        d["predictions"].pop("path")
    assert two == one  # the scores too: computed from the answers in order, batch by batch
    client = MlflowClient(tracking_uri(setup["store"]))
    run_one = json.loads((single / "run.test.json").read_text())["mlflow_run_id"]
    run_two = json.loads((root / "run.test.json").read_text())["mlflow_run_id"]
    m1 = client.get_run(run_one).data.metrics
    m2 = client.get_run(run_two).data.metrics
    # ``limit`` answers 29 of the demo's 30 questions: not the benchmark's figure, and said so
    assert (one["answered"], one["partial"]) == (29, True)
    assert client.get_run(run_one).data.tags["partial"] == "true"
    assert m2.keys() == m1.keys()
    for key, value in m1.items():
        assert m2[key] == pytest.approx(value, rel=1e-6), key


def test_chat_answers_for_the_judge(setup: dict[str, Path], merged_run: Path) -> None:
    """``benchmark: llava_med_bench`` answers LLaVA-Med-Bench-layout questions into a predictions
    file the judge reads, counted (``n_chat``) but not scored by the VQA metrics. The demo's chat
    questions are its VQA questions, so the answers are the VQA run's (one prompt format)."""
    from mlflow.tracking import MlflowClient

    from biomedvital.evaluation.chat import read_questions
    from biomedvital.tracking.mlflow import tracking_uri

    chat = setup["questions"].with_name("demo_chat.jsonl")
    root = setup["tmp"] / "chat"
    main(
        [
            "test", "--config", str(CONF.with_name("demo_chat.yaml")),
            "--data.init_args.data", str(chat),
            "--data.init_args.image_root", str(setup["images"]),
            "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.store", str(setup["store"]),
            "--model.init_args.model", f"local-dir:{setup['merged']}",
        ]
    )  # fmt: skip
    preds = _predictions(root)
    assert [p["question_id"] for p in preds] == list(read_questions(chat))
    assert [p["text"] for p in preds] == [p["text"] for p in _predictions(merged_run)]
    scores = json.loads((root / "scores.json").read_text())
    assert scores["n_chat"] == 30 and scores["n_open"] == scores["n_closed"] == 0
    assert scores["open_recall"] is None and scores["closed_acc"] is None
    record = json.loads((root / "run.test.json").read_text())
    metrics = (
        MlflowClient(tracking_uri(setup["store"])).get_run(record["mlflow_run_id"]).data.metrics
    )
    assert metrics["test/demo_chat/n_chat"] == 30
    assert not any(k.endswith(("open_recall", "closed_acc")) for k in metrics)


class _Killed(RuntimeError):
    pass


class _Crash(Callback):
    """Raises after ``after`` answered batches, or at the epoch's end (before anything is
    written): a run killed mid-way."""

    def __init__(self, after: int | None = None) -> None:
        self.after = after

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.after is not None and batch_idx + 1 == self.after:
            raise _Killed("killed")

    def on_test_epoch_end(self, trainer, pl_module):
        if self.after is None:
            raise _Killed("killed before writing")


class _Count(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_test_batch_end(self, *args, **kwargs):
        self.batches += 1


def _evaluate(
    s: dict[str, Path],
    root: Path,
    *callbacks: Callback,
    max_new_tokens: int = 24,
    decoding: Decoding | None = None,
    batch_size: int = 4,
    **trainer_args: object,
):
    from lightning.pytorch import Trainer

    decoding = decoding or Decoding(max_new_tokens=max_new_tokens)
    model = VQAEvaluator(model=f"local-dir:{s['merged']}", decoding=decoding)
    dm = VQADataModule(
        "vqa_rad", str(s["questions"]), str(s["images"]), name="demo_vqa", batch_size=batch_size
    )
    trainer = Trainer(
        accelerator="cpu", devices=1, logger=False, default_root_dir=str(root),
        callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
        **trainer_args,
    )  # fmt: skip
    with contextlib.suppress(_Killed):  # what the killed run left is inspected
        trainer.test(model, datamodule=dm)
    return model


def _journals(root: Path) -> list[Path]:
    return sorted(root.glob("answers.journal-*.jsonl"))


def _same_outputs(ref: Path, got: Path) -> None:
    assert (got / "predictions.jsonl").read_bytes() == (ref / "predictions.jsonl").read_bytes()
    a, b = (json.loads((d / "scores.json").read_text()) for d in (ref, got))
    for d in (a, b):
        d["predictions"].pop("path")
    assert b == a


@pytest.fixture(scope="module")
def uninterrupted(setup: dict[str, Path]) -> Path:
    """30 questions in 8 batches of 4, answered in one go."""
    root = setup["tmp"] / "uninterrupted"
    _evaluate(setup, root)
    return root


def test_a_limited_run_is_marked_partial_and_a_full_run_resumes_it(
    setup: dict[str, Path], uninterrupted: Path
) -> None:
    """``limit_test_batches`` (a smoke test) answers 12 of 30 questions: its scores say so
    (``partial``) and its journal stays, so the full run answers only the other 5 batches and
    writes the uninterrupted run's files."""
    root = setup["tmp"] / "limited"
    _evaluate(setup, root, limit_test_batches=3)
    scores = json.loads((root / "scores.json").read_text())
    assert scores["partial"] is True and scores["answered"] == 12
    assert len(_journals(root)) == 1
    model = _evaluate(setup, root)
    assert model.resumed is not None and model.resumed["batches"] == 3
    _same_outputs(uninterrupted, root)
    assert _journals(root) == []


def test_killed_run_resumes_from_its_journal(setup: dict[str, Path], uninterrupted: Path) -> None:
    """Killed after 3 of 8 batches (the 3 journaled, nothing written), with a torn last line:
    the rerun answers the other 5 only and writes what the uninterrupted run wrote."""
    root = setup["tmp"] / "killed"
    _evaluate(setup, root, _Crash(after=3))
    assert not (root / "predictions.jsonl").exists()
    (journal,) = _journals(root)
    lines = journal.read_text().splitlines()
    assert len(lines) == 4 and "fingerprint" in json.loads(lines[0])
    assert [json.loads(x)["batch"] for x in lines[1:]] == [0, 1, 2]
    with journal.open("ab") as f:
        f.write(b'{"batch": 3, "indices": [12, 13')  # a kill mid-write

    count = _Count()
    model = _evaluate(setup, root, count)
    assert count.batches == 5
    assert model.resumed == {"batches": 3, "answers": 12, "torn_journal_lines": 1}
    _same_outputs(uninterrupted, root)
    assert _journals(root) == []  # its answers are in predictions.jsonl


def test_killed_before_writing_answers_one_batch_again(
    setup: dict[str, Path], uninterrupted: Path
) -> None:
    """Every batch journaled but the files not written: the rerun answers one batch (a process
    must have one to reach the epoch's end) and writes the same files."""
    root = setup["tmp"] / "killed-at-end"
    _evaluate(setup, root, _Crash())
    assert not (root / "predictions.jsonl").exists() and len(_journals(root)) == 1
    count = _Count()
    model = _evaluate(setup, root, count)
    assert count.batches == 1 and model.resumed["batches"] == 7
    _same_outputs(uninterrupted, root)


def test_journal_of_another_setting_is_not_used(setup: dict[str, Path]) -> None:
    """Answers made with other generation settings are never mixed in: all batches again."""
    root = setup["tmp"] / "other-setting"
    _evaluate(setup, root, _Crash(after=2), max_new_tokens=8)
    (stale,) = _journals(root)
    count = _Count()
    with pytest.warns(UserWarning, match="another model, setting or data file"):
        model = _evaluate(setup, root, count)
    assert count.batches == 8 and model.resumed is None
    assert _journals(root) == [stale]  # left for its own rerun, named in the warning


def test_a_hub_models_snapshot_is_part_of_the_journal_key(setup: dict[str, Path]) -> None:
    """An ``hf:`` model resolves to a hub snapshot: its commit is in the fingerprint, so answers
    of a model updated on the hub between a kill and the resume are not mixed in."""
    from biomedvital.evaluation.answer_journal import journal_key

    model = _evaluate(setup, setup["tmp"] / "snapshot", limit_test_batches=1)
    local = model.fingerprint()
    model.model.config._commit_hash = "0123456789abcdef"  # as from_pretrained sets it
    hub = model.fingerprint()
    assert local["revision"] is None and hub["revision"] == "0123456789abcdef"
    assert journal_key(hub) != journal_key(local)


@pytest.mark.heavy
def test_killed_run_resumes_on_two_processes(setup: dict[str, Path], uninterrupted: Path) -> None:
    """A one-process run killed after 3 of 8 batches, resumed on 2 processes (DDP): both read
    the journal before either appends, they share the 5 batches left, and the files are the
    uninterrupted run's."""
    root = setup["tmp"] / "killed-then-ddp"
    _evaluate(setup, root, _Crash(after=3))
    log = run_cli(
        "test", "--config", CONF,
        "--data.init_args.data", setup["questions"],
        "--data.init_args.image_root", setup["images"],
        "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", root, "--trainer.logger", "false",
        "--model.init_args.model", f"local-dir:{setup['merged']}",
        "--trainer.devices", "2", "--trainer.strategy", "ddp",
    )  # fmt: skip
    assert "resuming: 3 batch(es), 12 answer(s)" in log
    _same_outputs(uninterrupted, root)
    assert json.loads((root / "run.test.json").read_text())["resumed"]["batches"] == 3
    assert _journals(root) == []


# ----------------------------------------------------------------------------- decoding

SAMPLE = Decoding("sample", temperature=1.0, max_new_tokens=6, seed=3)


def test_greedy_is_generate_as_before_and_sampling_is_per_question(
    setup: dict[str, Path],
) -> None:
    """Greedy (the default) answers as plain greedy ``generate`` does. Sampled answers with one
    seed are the same in batches of 3 and one at a time; another seed gives others. An answer
    that ends before the limit records ``hit_max_new_tokens: false``, one cut there ``true``."""
    from biomedvital.tuning.models import prompt

    dm = VQADataModule("vqa_rad", str(setup["questions"]), str(setup["images"]))
    rows = [dm.test_dataloader().dataset[i] for i in range(6)]
    images, questions = [r["image"] for r in rows], [r["item"].question for r in rows]
    ids = [r["item"].question_id for r in rows]

    greedy = VQAEvaluator(model=f"local-dir:{setup['merged']}", decoding=Decoding(max_new_tokens=6))
    greedy.build()
    inputs = greedy.processor(
        text=[prompt(q, greedy.system_prompt()) for q in questions],
        images=images, return_tensors="pt", padding=True,
    )  # fmt: skip
    tok = greedy.processor.tokenizer
    plain = greedy.model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                  pad_token_id=tok.pad_token_id)  # fmt: skip
    plain_texts = tok.batch_decode(
        plain[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert greedy.answer(images, questions) == [t.strip() for t in plain_texts]

    ev = VQAEvaluator(model=f"local-dir:{setup['merged']}", decoding=SAMPLE)
    ev.build()
    threes = ev.answer_batch(images[:3], questions[:3], ids[:3])
    threes += ev.answer_batch(images[3:], questions[3:], ids[3:])
    ones = [
        ev.answer_batch([i], [q], [qid])[0]
        for i, q, qid in zip(images, questions, ids, strict=True)
    ]
    assert threes == ones and len({a.text for a in ones}) > 1  # sampled: not one answer for all
    with pytest.raises(ValueError, match="question_ids"):
        ev.answer(images[:1], questions[:1])
    other = VQAEvaluator(model=f"local-dir:{setup['merged']}", decoding=replace(SAMPLE, seed=4))
    other.build()
    assert [a.text for a in other.answer_batch(images, questions, ids)] != [a.text for a in ones]

    # a question's draws do not depend on the budget: an answer that ended is the same with a
    # larger one, and one cut at the limit goes on
    ev.decoding = replace(SAMPLE, max_new_tokens=12)
    longer = ev.answer_batch(images, questions, ids)
    hits = [a.hit_max_new_tokens for a in ones]
    assert True in hits and False in hits
    for short, long in zip(ones, longer, strict=True):
        assert (
            (short.text == long.text) if not short.hit_max_new_tokens else long.text != short.text
        )


def test_sampled_run_resumed_or_rebatched_writes_the_same_answers(setup: dict[str, Path]) -> None:
    """Sampling through ``Trainer.test``: a run killed after 2 batches of 4 and resumed, and a
    run in batches of 3, write the same predictions; each records ``hit_max_new_tokens`` and
    ``scores.json`` counts them."""
    root, rebatched = setup["tmp"] / "sampled-killed", setup["tmp"] / "sampled-by-3"
    _evaluate(setup, root, _Crash(after=2), decoding=SAMPLE)
    model = _evaluate(setup, root, decoding=SAMPLE)
    assert model.resumed is not None and model.resumed["batches"] == 2
    _evaluate(setup, rebatched, decoding=SAMPLE, batch_size=3)
    got, want = _predictions(root), _predictions(rebatched)
    assert got == want and len(got) == 30
    scores = json.loads((root / "scores.json").read_text())
    assert scores["n_hit_max_new_tokens"] == sum(r["hit_max_new_tokens"] for r in got) > 0
