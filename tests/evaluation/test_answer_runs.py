"""``answer`` runs on the demo VQA set against a loopback fake endpoint: faults (429, 500,
timeouts, resets, malformed and empty bodies), a kill -9 and its rerun, batch mode, the export's
system prompt and lineage in MLflow, and bad input stopped by one error before anything is sent
or written."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from answer_helpers import (
    CONF,
    echo_api,
    file_digest,
    main,
    predictions,
    run_answer,
    sent_parts,
)
from fakeapi import KEY_ENV, FakeAPI, running_api

from biomedvital.data.demo import materialize_demo
from biomedvital.evaluation.benchmarks import load_vqa_rad
from biomedvital.evaluation.demo_vqa import write_demo_vqa
from biomedvital.tuning.conversation import VICUNA_V1_SYSTEM

DEMO = CONF / "demo_vqa.yaml"
FAST_RETRIES = ("--client.backoff_base_s", "0.01", "--client.backoff_max_s", "0.05")


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    for served in running_api(monkeypatch):
        served.retry_after = "0.01"
        yield echo_api(served)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("answer-demo")
    files = materialize_demo(tmp / "demo")
    return {
        "images": files.images,
        "questions": write_demo_vqa(tmp / "demo_vqa.json"),
        "store": tmp / "mlruns",
    }


def _run(demo: dict[str, Path], api: FakeAPI, out: Path, *extra: str, **kw: str) -> dict:
    return run_answer(
        DEMO, api.base_url, out, demo["store"],
        "--data.init_args.data", str(demo["questions"]),
        "--data.init_args.image_root", str(demo["images"]),
        *extra, **kw,
    )  # fmt: skip


def _qid_of(demo: dict[str, Path]) -> dict[tuple[str, str], str]:
    """(image bytes' hash, question) -> question id: what identifies a request's question."""
    from biomedvital.llm.images import image_data_url

    out = {}
    for it in load_vqa_rad(demo["questions"], "test"):
        url = image_data_url(demo["images"] / it.image)
        import base64
        import hashlib

        digest = hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest()
        out[(digest, it.question)] = it.question_id
    return out


@pytest.fixture(scope="module")
def reference(demo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted, fault-free run."""
    mp = pytest.MonkeyPatch()
    try:
        for api in running_api(mp):
            out = tmp_path_factory.mktemp("reference") / "out"
            _run(demo, echo_api(api), out)
            return out
    finally:
        mp.undo()
    raise AssertionError("unreachable")


def test_demo_run_writes_tests_layout_and_logs_tests_metrics(
    demo: dict[str, Path], reference: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from biomedvital.evaluation.score_vqa import score_vqa
    from biomedvital.tracking.mlflow import tracking_uri

    rows = predictions(reference)
    assert [r["question_id"] for r in rows] == [str(i) for i in range(30)]
    assert all(
        set(r) == {"question_id", "prompt", "text", "model_id", "hit_max_new_tokens"} for r in rows
    )
    assert not any(r["hit_max_new_tokens"] for r in rows)
    scores = json.loads((reference / "scores.json").read_text())
    record = json.loads((reference / "run.answer.json").read_text())
    ref = score_vqa("vqa_rad", demo["questions"], reference / "predictions.jsonl")
    run = MlflowClient(tracking_uri(demo["store"])).get_run(record["mlflow_run_id"])
    for key in ("open_recall", "open_f1", "closed_acc", "bleu1", "n_open", "n_closed"):
        assert scores[key] == pytest.approx(ref[key], rel=1e-12)
        assert run.data.metrics[f"test/demo_vqa/{key}"] == pytest.approx(scores[key])
    assert scores["partial"] is False and scores["answered"] == 30
    assert scores["n_hit_max_new_tokens"] == 0
    assert record["decoding"] == {"strategy": "greedy", "temperature": None, "top_p": None,
                                  "top_k": None, "max_new_tokens": 24, "seed": 0}  # fmt: skip
    tags = run.data.tags
    assert tags["model"] == "m" and tags["endpoint"].startswith("http://127.0.0.1:")
    assert tags["partial"] == "false" and tags["verb"] == "answer"
    assert record["notice"] == [  # the config's keys a served model cannot take
        "model.init_args.model", "trainer.accelerator", "trainer.devices",
        "trainer.precision", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    ]  # fmt: skip


def test_faults_are_retried_and_change_nothing(
    demo: dict[str, Path], api: FakeAPI, reference: Path, tmp_path: Path
) -> None:
    """429 (Retry-After), 500, timeouts, resets, malformed and empty bodies on a third of the
    calls: every question is answered in the end, the files are the fault-free run's."""
    api.sleep_s = 1.0
    api.random_faults(0.35, seed=3, kinds=("429", "500", "sleep", "reset", "malformed", "empty"))
    out = tmp_path / "out"
    record = _run(
        demo, api, out, *FAST_RETRIES, "--client.max_attempts", "12", "--client.timeout_s", "0.5"
    )
    assert sum(api.faults_injected.values()) >= 8 and len(api.faults_injected) >= 4
    assert (out / "predictions.jsonl").read_bytes() == (
        reference / "predictions.jsonl"
    ).read_bytes()
    assert record["counts"]["failed"] == 0 and record["partial"] is False


def test_a_failed_question_is_counted_never_scored_empty_and_a_rerun_completes(
    demo: dict[str, Path], api: FakeAPI, reference: Path, tmp_path: Path
) -> None:
    question = "Which fluid appears bright in this image?"  # qid 16, open
    qid = next(it.question_id for it in load_vqa_rad(demo["questions"], "test")
               if it.question == question)  # fmt: skip
    api.arm(question, "500", "500", "500")
    out = tmp_path / "out"
    record = _run(demo, api, out, *FAST_RETRIES, "--client.max_attempts", "3")
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["question_id"] for f in failed] == [qid]
    assert failed[0]["reason"].startswith("http_500") and "3 attempts" in failed[0]["reason"]
    assert qid not in {r["question_id"] for r in predictions(out)}
    scores = json.loads((out / "scores.json").read_text())
    assert scores["partial"] is True and scores["answered"] == 29
    assert scores["n_open"] + scores["n_closed"] == 29  # scored over the answers there are
    assert record["counts"]["failed_by_reason"] == {"http_500": 1}
    api.reset()
    record = _run(demo, api, out)  # the endpoint works again: only that question goes out
    assert api.n_requests == 1 and record["partial"] is False
    assert (out / "predictions.jsonl").read_bytes() == (
        reference / "predictions.jsonl"
    ).read_bytes()


def test_the_papers_decoding_asks_each_question_with_its_seed_and_counts_cut_answers(
    demo: dict[str, Path], api: FakeAPI, tmp_path: Path
) -> None:
    """``--config conf/eval/paper_decoding.yaml`` on top: every request samples as released
    (temperature 0.7, top-k 50, 1024 tokens) with its question's own seed; a reply cut at the
    limit (``finish_reason: length``) records ``hit_max_new_tokens`` and is counted."""
    from biomedvital.evaluation.decoding import Decoding

    question = "Which fluid appears bright in this image?"
    api.arm(question, "length:the fluid that")
    out = tmp_path / "out"
    record = _run(demo, api, out, "--config", str(CONF / "paper_decoding.yaml"))
    paper = Decoding.of(record["decoding"])
    assert (paper.strategy, paper.temperature, paper.top_k) == ("sample", 0.7, 50)
    qid_of = _qid_of(demo)
    for body in api.seen:
        _, image, text = sent_parts(body)
        assert (body["temperature"], body["top_p"], body["top_k"]) == (0.7, 1.0, 50)
        assert body["max_tokens"] == 1024
        assert body["seed"] == paper.question_seed(qid_of[(image, text)])
    assert len({body["seed"] for body in api.seen}) == len(api.seen) == 30
    cut = [r["question_id"] for r in predictions(out) if r["hit_max_new_tokens"]]
    items = load_vqa_rad(demo["questions"], "test")
    assert cut == [it.question_id for it in items if it.question == question]
    assert json.loads((out / "scores.json").read_text())["n_hit_max_new_tokens"] == 1
    assert record["counts"]["truncated"] == 1


def test_kill_9_then_rerun_sends_no_answered_question_again(
    demo: dict[str, Path], api: FakeAPI, reference: Path, tmp_path: Path
) -> None:
    """SIGKILL a run (a forked process) once answers are journaled; the rerun sends only what
    was not journaled and writes the uninterrupted run's predictions byte for byte."""
    api.delay_s = 0.25
    out = tmp_path / "out"
    pid = os.fork()
    if pid == 0:  # the run to kill: a process of its own
        code = 1
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            _run(demo, api, out, "--client.concurrency", "2")
            code = 0
        finally:
            os._exit(code)
    journal = out / "journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert not (out / "predictions.jsonl").exists()
    answered = {
        json.loads(line)["meta"]["question_id"]
        for line in journal.read_bytes().splitlines(keepends=True)
        if line.endswith(b"\n")
    }
    assert 8 <= len(answered) < 30
    api.reset()
    api.delay_s = 0.0
    _run(demo, api, out)
    qid_of = _qid_of(demo)
    sent = [qid_of[(image, text)] for _, image, text in map(sent_parts, api.seen)]
    assert not answered & set(sent) and answered | set(sent) == {str(i) for i in range(30)}
    assert (out / "predictions.jsonl").read_bytes() == (
        reference / "predictions.jsonl"
    ).read_bytes()


def test_batch_mode_writes_the_online_runs_files(
    demo: dict[str, Path], api: FakeAPI, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    record = _run(demo, api, out, "--client.mode", "batch", "--client.batch_poll_s", "0.05")
    assert api.uploads == 1 and api.batch_creates == 1 and record["batch"]
    assert (out / "predictions.jsonl").read_bytes() == (
        reference / "predictions.jsonl"
    ).read_bytes()


def test_the_exports_system_prompt_and_lineage(
    demo: dict[str, Path], api: FakeAPI, tmp_path: Path
) -> None:
    """A model served under its export folder's path (``vllm serve DIR``) is asked with the
    system prompt its ``run.json`` records; the run is tagged with the export's upstream run and
    records the image preprocessing the served model applies (the export's, not the config's)."""
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    export = tmp_path / "export"
    (export / "merged").mkdir(parents=True)
    (export / "run.json").write_text(
        json.dumps(
            {
                "mlflow_run_id": "tuning-run-1",
                "system_prompt": "Answer briefly.",
                "image_aspect_ratio": "crop",
            }
        )
    )
    out = tmp_path / "out"
    record = _run(demo, api, out, model=str(export / "merged"))
    assert {sent_parts(b)[0] for b in api.seen} == {"Answer briefly."}
    assert record["system_prompt"] == "Answer briefly."
    assert record["export"]["record"]["image_aspect_ratio"] == "crop"
    run = MlflowClient(tracking_uri(demo["store"])).get_run(record["mlflow_run_id"])
    assert run.data.tags["upstream_run"] == "tuning-run-1"
    api.reset()
    other = _run(
        demo, api, tmp_path / "other", "--model.init_args.system_prompt", "",
        "--model.init_args.image_aspect_ratio", "pad",
    )  # fmt: skip
    assert "model.init_args.image_aspect_ratio" in other["notice"]  # the server preprocesses
    assert {sent_parts(b)[0] for b in api.seen} == {""}  # as configured: none (sent empty)


def test_a_missing_image_is_an_error_naming_the_question_or_is_skipped(
    demo: dict[str, Path], api: FakeAPI, tmp_path: Path
) -> None:
    import shutil

    from biomedvital.data.report import BadRecordError

    images = tmp_path / "images"
    shutil.copytree(demo["images"], images)
    (images / "retina.jpg").unlink()
    missing = [it.question_id for it in load_vqa_rad(demo["questions"], "test")
               if it.image == "retina.jpg"]  # fmt: skip
    out = tmp_path / "out"
    args = ("--data.init_args.image_root", str(images))
    with pytest.raises(BadRecordError, match=f"question_id '{missing[0]}'.*retina.jpg"):
        _run(demo, api, out, *args)
    assert api.n_requests == 0 and not out.exists()
    record = _run(demo, api, out, *args, "--missing_image", "skip")
    assert record["counts"]["skipped_missing_image"] == len(missing) and record["partial"]
    assert api.n_requests == 30 - len(missing)
    unanswered = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert [u["question_id"] for u in unanswered] == missing
    assert all(u["reason"].startswith("missing_image") for u in unanswered)


@pytest.mark.parametrize(
    "case", ["benchmark", "endpoint_down", "model_not_served", "key", "no_export"]
)
def test_bad_input_is_one_error_naming_the_key_and_nothing_is_written(
    demo: dict[str, Path], api: FakeAPI, tmp_path: Path, case: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Through ``python -m biomedvital``: one ``biomedvital: error:`` line naming the key."""
    from biomedvital.__main__ import run
    from biomedvital.llm.server_common import free_port

    out = tmp_path / "out"
    url, extra, wanted = api.base_url, [], ""
    if case == "benchmark":
        extra, wanted = ["--data.init_args.benchmark", "vqa_radd"], "data.init_args.benchmark"
    elif case == "endpoint_down":
        url, wanted = f"http://127.0.0.1:{free_port()}/v1", "client.base_url"
    elif case == "model_not_served":
        api.models, wanted = ["llava-med-7b", "gpt-4o"], "client.model 'm' is not served"
    elif case == "no_export":
        url = f"local-hf:{tmp_path / 'nowhere'}"
        wanted = f"client.base_url local-hf:{tmp_path / 'nowhere'}: no model there"
    else:
        monkeypatch.delenv(KEY_ENV)
        wanted = f"client.api_key_env: environment variable {KEY_ENV} is not set"
    argv = ["biomedvital", "answer", "--config", str(DEMO), "--client.base_url", url,
            "--client.model", "m", "--client.api_key_env", KEY_ENV,
            "--data.init_args.data", str(demo["questions"]),
            "--data.init_args.image_root", str(demo["images"]),
            "--trainer.default_root_dir", str(out), *extra]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code in (1, 2) and len(err) == 1 and err[0].startswith("biomedvital: error:")
    assert wanted in err[0], err[0]
    if case == "model_not_served":
        assert "'gpt-4o', 'llava-med-7b'" in err[0]
    assert api.n_requests == 0 and not out.exists()


def test_a_test_runs_folder_is_not_overwritten(
    demo: dict[str, Path], api: FakeAPI, tmp_path: Path
) -> None:
    from biomedvital.cli import ConfigError

    out = tmp_path / "eval"
    out.mkdir()
    (out / "run.test.json").write_text("{}")
    (out / "predictions.jsonl").write_text("kept\n")
    with pytest.raises(ConfigError, match="trainer.default_root_dir .* `test` run"):
        _run(demo, api, out)
    assert (out / "predictions.jsonl").read_text() == "kept\n" and api.n_requests == 0


def test_images_go_as_the_pixels_test_sees(tmp_path: Path) -> None:
    """JPEG/PNG as stored; DICOM, a 16-bit PNG and an EXIF-rotated JPEG as the PNG of what
    ``load_image`` decodes (a server would clip the first and may not rotate the second)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from biomedvital.data.images import load_image
    from biomedvital.llm.images import image_data_url

    def sent(path: Path) -> tuple[str, bytes]:
        head, data = image_data_url(path).split(",", 1)
        return head, base64.b64decode(data)

    plain = tmp_path / "plain.jpg"
    Image.new("RGB", (8, 6), (10, 200, 30)).save(plain)
    assert sent(plain) == ("data:image/jpeg;base64", plain.read_bytes())
    wide = tmp_path / "wide.png"
    Image.fromarray(np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000).save(wide)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.new("RGB", (8, 6), (10, 200, 30)).save(rotated, exif=exif)
    for path in (wide, rotated, demo_dicom()):
        head, data = sent(path)
        assert head == "data:image/png;base64"
        got = np.asarray(Image.open(io.BytesIO(data)))
        assert np.array_equal(got, np.asarray(load_image(path)))
    assert Image.open(io.BytesIO(sent(rotated)[1])).size == (6, 8)


def demo_dicom() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


def test_the_demo_images_are_the_files_sent(demo: dict[str, Path], reference: Path) -> None:
    """The echo names the image each question went out with: its own file's bytes (DICOM: the
    PNG of its decoded pixels)."""
    from biomedvital.llm.images import image_data_url

    items = {it.question_id: it for it in load_vqa_rad(demo["questions"], "test")}
    for row in predictions(reference):
        path = demo["images"] / items[row["question_id"]].image
        if path.suffix == ".dcm":
            import base64
            import hashlib

            raw = base64.b64decode(image_data_url(path).split(",", 1)[1])
            digest = hashlib.sha256(raw).hexdigest()
        else:
            digest = file_digest(path)
        assert row["text"].startswith(digest[:16]), row
    assert VICUNA_V1_SYSTEM  # the default system prompt (no export): checked in the benchmarks


EVAL_OVERLAYS = [CONF / "paper_decoding.yaml"]
"""Overlays of conf/eval: added to a benchmark config, not one on their own."""


@pytest.mark.parametrize(
    "config", sorted(set(CONF.glob("*.yaml")) - set(EVAL_OVERLAYS)), ids=lambda p: p.name
)
def test_every_benchmark_config_parses_for_answer(config: Path) -> None:
    """The configs of ``test`` as shipped, alone, with the OpenAI endpoint overlay and with the
    paper's decoding."""
    from biomedvital.evaluation.answer import build_parser

    parser = build_parser()
    cfg = parser.parse_args(["--config", str(config), "--client.base_url", "http://h/v1",
                             "--client.model", "m"])  # fmt: skip
    assert cfg.data.class_path.endswith("VQADataModule") and cfg.trainer.default_root_dir
    openai = CONF.parent / "endpoints" / "openai.yaml"
    cfg = parser.parse_args(["--config", str(config), "--config", str(openai)])
    assert (cfg.client.base_url, cfg.client.model) == ("https://api.openai.com/v1", "gpt-4o")
    for overlay in EVAL_OVERLAYS:
        cfg = parser.parse_args(["--config", str(config), "--config", str(overlay),
                                 "--config", str(openai)])  # fmt: skip
        want = yaml.safe_load(overlay.read_text())["model"]["init_args"]["decoding"]
        assert cfg.model.init_args.decoding.as_dict() == want


def test_vllms_offline_batch_runner_file_then_its_results(
    demo: dict[str, Path], api: FakeAPI, reference: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """``--client.batch_runner file`` writes the request file for vLLM's ``run_batch`` and
    stops with the command; a rerun with ``--batch_results`` imports its output."""
    from answer_helpers import echo

    out = tmp_path / "out"
    batch = ("--client.mode", "batch", "--client.batch_runner", "file")
    argv = ["answer", "--config", str(DEMO), "--client.base_url", "http://vllm.invalid/v1",
            "--client.model", "m", "--data.init_args.data", str(demo["questions"]),
            "--data.init_args.image_root", str(demo["images"]), "--trainer.default_root_dir",
            str(out), "--trainer.logger.init_args.store", str(demo["store"]), *batch]  # fmt: skip
    main(argv)
    assert "vllm.entrypoints.openai.run_batch" in capsys.readouterr().out
    assert not (out / "predictions.jsonl").exists()
    lines = [json.loads(x) for f in sorted((out / "batch").glob("*.requests.jsonl"))
             for x in f.read_text().splitlines()]  # fmt: skip
    assert len(lines) == 30
    results = tmp_path / "results.jsonl"
    results.write_text("".join(
        json.dumps({"custom_id": line["custom_id"], "response": {"status_code": 200, "body": {
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": echo(line["body"])}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}}}}) + "\n"
        for line in lines
    ))  # fmt: skip
    main([*argv, "--batch_results", str(results)])
    assert (out / "predictions.jsonl").read_bytes() == (
        reference / "predictions.jsonl"
    ).read_bytes()
