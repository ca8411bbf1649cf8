"""``answer`` against a real server: ``transformers serve`` with an exported tiny LLaVA
(``client.base_url: local-hf:<export>``), and the consistency of its answers with ``test``'s.

The default suite checks the two places where a served model could see another input than
``test`` gives it, without starting a server: the chat template (what ``transformers serve``
renders from ``answer``'s messages) and the image path (the data URL decoded and resized by the
served processor). The slow tests tune a tiny LLaVA, answer the demo VQA set through ``test``
(greedy) and through ``answer`` against ``transformers serve`` (temperature 0), and compare
predictions and scores; the question ids allowed to differ are those ``docs/evaluation.md``
lists, asserted exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from answer_helpers import REPO, predictions
from tiny_tuner import tiny_tuner_data, tiny_tuner_model

from biomedvital.cli import main
from biomedvital.data.demo import materialize_demo
from biomedvital.evaluation.benchmarks import load_vqa_rad
from biomedvital.evaluation.demo_vqa import write_demo_vqa
from biomedvital.evaluation.prompting import chat_messages, question_text
from biomedvital.llm.images import image_data_url
from biomedvital.tuning.conversation import VICUNA_V1_SYSTEM, prompt

DOCS = REPO / "docs" / "evaluation.md"
SERVED_NAME = "biomedvital-demo"


def documented_differences() -> dict[str, str]:
    """Question id -> cause, from the table under "test and answer: known differences"."""
    text = DOCS.read_text()
    section = text.split("### test and answer: known differences", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \|$", section, flags=re.M)
    return dict(rows)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("served-demo")
    files = materialize_demo(tmp / "demo")
    return {"tmp": tmp, "images": files.images, "questions": write_demo_vqa(tmp / "q.json")}


@pytest.mark.parametrize("system", [VICUNA_V1_SYSTEM, ""])
def test_the_served_processor_sees_what_test_gives_the_model(
    demo: dict[str, Path], system: str
) -> None:
    """``transformers serve``'s own conversion of ``answer``'s messages, through the export's
    processor (chat template, data URL decoding, resize), gives the token ids and pixel values
    of ``test``'s prompt and image, for every demo question (a DICOM image included)."""
    import torch
    from transformers.cli.serving.utils import BaseHandler, Modality

    from biomedvital.data.images import ImageRoot
    from biomedvital.tuning.export import serving_processor
    from biomedvital.tuning.models import create_llava

    processor = create_llava("tiny:tiny-llava").processor
    root = ImageRoot(demo["images"])
    with serving_processor(processor, VICUNA_V1_SYSTEM):  # as exported: the training system
        for it in load_vqa_rad(demo["questions"], "test"):
            text = question_text(it.question, it.answer_type)
            messages = chat_messages(system, text, image_data_url(root.resolve(it.image)))
            served = processor.apply_chat_template(
                BaseHandler.get_processor_inputs_from_messages(messages, Modality.VLM),
                add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors="pt",
            )  # fmt: skip
            local = processor(
                text=[prompt(text, system)], images=[root.load(it.image)], return_tensors="pt"
            )
            assert served["input_ids"].tolist() == local["input_ids"].tolist(), it.question_id
            assert torch.equal(served["pixel_values"], local["pixel_values"]), it.question_id


# ----------------------------------------------------------------------------- slow: a server


def _tuner_config(tmp: Path, selected: Path, images: Path, store: Path) -> Path:
    out = tmp / "tuner"
    cfg = {
        "seed_everything": 0,
        "model": tiny_tuner_model(),
        "data": tiny_tuner_data(selected, images),
        "trainer": {
            "max_steps": 2, "accelerator": "cpu", "devices": 1, "default_root_dir": str(out),
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "biomedvital.tracking.MLflowLogger",
                       "init_args": {"experiment": "tuning", "store": str(store)}},
            "callbacks": [{"class_path": "biomedvital.tuning.ExportTuned",
                           "init_args": {"dirpath": str(out / "export"), "adapter": False}}],
        },
    }  # fmt: skip
    path = tmp / "tuner.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tuned(demo: dict[str, Path]) -> dict[str, Any]:
    """A tiny LLaVA tuned 2 steps on demo candidates and exported, answering the demo VQA set
    through ``test``."""
    tmp = demo["tmp"]
    files = materialize_demo(tmp / "demo")
    rows = [json.loads(x) for x in files.candidates.read_text().splitlines() if x.strip()]
    selected = tmp / "selected.json"
    selected.write_text(json.dumps(rows[::6][:8]))
    store = tmp / "mlruns"
    main(["fit", "--config", str(_tuner_config(tmp, selected, files.images, store))])
    export = tmp / "tuner" / "export"
    common = ["--data.init_args.data", str(demo["questions"]),
              "--data.init_args.image_root", str(demo["images"]),
              "--trainer.logger.init_args.store", str(store)]  # fmt: skip
    conf = str(REPO / "conf" / "eval" / "demo_vqa.yaml")
    main(["test", "--config", conf, *common, "--model.init_args.model",
          f"local-dir:{export / 'merged'}", "--trainer.default_root_dir", str(tmp / "test")])  # fmt: skip
    return {"export": export, "store": store, "common": common, "conf": conf, "tmp": tmp}


@pytest.mark.slow
def test_answer_through_transformers_serve_matches_test(tuned: dict[str, Any]) -> None:
    """The export served by ``transformers serve`` (``local-hf:``, started on a free loopback
    port and stopped after the run) answers as ``test`` does: the same predictions and scores,
    but for the question ids docs/evaluation.md lists with their cause (asserted exactly)."""
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    tmp, out = tuned["tmp"], tuned["tmp"] / "answer"
    main(["answer", "--config", tuned["conf"], *tuned["common"],
          "--client.base_url", f"local-hf:{tuned['export']}",
          "--client.model", SERVED_NAME, "--client.concurrency", "2",
          "--trainer.default_root_dir", str(out), "--progress", "false"])  # fmt: skip
    ours, theirs = predictions(tmp / "test"), predictions(out)
    assert [r["question_id"] for r in ours] == [r["question_id"] for r in theirs]
    differ = {
        a["question_id"]
        for a, b in zip(ours, theirs, strict=True)
        if (a["prompt"], a["text"]) != (b["prompt"], b["text"])
    }
    # an answer cut at the limit: no end token for test, finish_reason "length" for answer
    cut = [
        (a["hit_max_new_tokens"], b["hit_max_new_tokens"])
        for a, b in zip(ours, theirs, strict=True)
    ]
    assert all(x == y for x, y in cut) and any(x for x, _ in cut)
    assert differ == set(documented_differences())
    if not differ:
        test_scores = json.loads((tmp / "test" / "scores.json").read_text())
        answer_scores = json.loads((out / "scores.json").read_text())
        for key in ("name", "model", "data", "predictions"):
            test_scores.pop(key), answer_scores.pop(key)
        assert answer_scores == test_scores
    record = json.loads((out / "run.answer.json").read_text())
    assert record["endpoint"] == f"local-hf:{tuned['export']}"
    assert record["export"]["record"]["mlflow_run_id"]  # the tuning run, as test tags it
    run = MlflowClient(tracking_uri(tuned["store"])).get_run(record["mlflow_run_id"])
    assert run.data.tags["upstream_run"] == record["export"]["record"]["mlflow_run_id"]


@pytest.mark.slow
def test_the_server_is_stopped_and_an_unknown_name_refused(tuned: dict[str, Any]) -> None:
    """The server lists only the name it serves; the process is gone after the block."""
    import os

    from biomedvital.llm.hf_server import HFServer
    from biomedvital.llm.served import EndpointError, check_served

    with HFServer(tuned["export"], SERVED_NAME, device="cpu") as server:
        check_served(server.base_url, "local", SERVED_NAME)
        with pytest.raises(EndpointError, match="client.model 'other' is not served"):
            check_served(server.base_url, "local", "other")
        pid = server.proc.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
