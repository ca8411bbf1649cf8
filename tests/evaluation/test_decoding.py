"""The evaluator's ``decoding`` block without a model: bad values are one error naming the key
(in Python and through ``test`` and ``answer``), old keys are refused naming their new place,
each question's seed is fixed by ``(seed, question_id)``, and the per-row sampler draws a
row's tokens whatever its batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from biomedvital.cli import ConfigError, main
from biomedvital.evaluation.decoding import Decoding, PerQuestionSampler, hit_limit

CONF = Path(__file__).resolve().parents[2] / "conf" / "eval"
KEY = "model.init_args.decoding"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"strategy": "beam"}, f"{KEY}.strategy must be 'greedy' or 'sample', got 'beam'"),
        ({"max_new_tokens": 0}, f"{KEY}.max_new_tokens must be an integer >= 1, got 0"),
        ({"seed": "x"}, f"{KEY}.seed must be an integer, got 'x'"),
        ({"temperature": 0.7}, f"{KEY}.temperature is a setting of strategy 'sample'"),
        ({"strategy": "sample"}, f"{KEY}.temperature must be in (0, 2] to sample, got None"),
        ({"strategy": "sample", "temperature": 0}, f"{KEY}.temperature must be in (0, 2]"),
        ({"strategy": "sample", "temperature": 0.7, "top_p": 1.5}, f"{KEY}.top_p must be in"),
        ({"strategy": "sample", "temperature": 0.7, "top_k": 0}, f"{KEY}.top_k must be an"),
        ({"max_tokens": 8}, f"{KEY} has no key 'max_tokens'; keys: strategy, temperature"),
    ],
)
def test_a_bad_value_is_one_error_naming_its_key(bad: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Decoding.of(bad)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_through_test_a_bad_value_is_one_line_naming_the_key_and_where(tmp_path: Path) -> None:
    """A choice outside ``greedy | sample`` (refused by the parser) and a value out of range
    (refused by the block, inside jsonargparse's build) alike; a flat ``max_new_tokens`` is
    refused naming its new place."""
    out = ["--trainer.default_root_dir", str(tmp_path / "out")]
    base = ["test", "--config", str(CONF / "demo_vqa.yaml")]
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"decoding": {"top_k": 0}}}}))
    cases = [
        (
            [*base, f"--{KEY}.strategy", "beam"],
            f"test: the command line: {KEY}.strategy must be one of 'greedy', 'sample', got 'beam'",
        ),
        (
            [*base, "--config", str(CONF / "paper_decoding.yaml"), "--config", str(overlay)],
            f"test: {overlay}: {KEY}.top_k must be an integer >= 1 or null, got 0",
        ),
        (
            [*base, "--model.init_args.max_new_tokens", "8"],
            f"test: the command line: model.init_args.max_new_tokens moved to {KEY}.max_new_tokens",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError) as err:
            main([*argv, *out])
        assert str(err.value) == message
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_through_answer_old_and_bad_keys_are_one_line(tmp_path: Path) -> None:
    """``answer``'s own ``--decoding`` block moved to the evaluator's; bad values of it are
    refused before anything is sent."""
    base = ["answer", "--config", str(CONF / "demo_vqa.yaml"), "--client.base_url", "http://h/v1",
            "--client.model", "m", "--trainer.default_root_dir", str(tmp_path / "out")]  # fmt: skip
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"decoding": {"temperature": 0.2}}))
    cases = [
        (["--decoding.max_tokens", "8"], f"answer: the command line: decoding.max_tokens moved "
         f"to {KEY}.max_new_tokens"),
        (["--config", str(old)], f"answer: {old}: decoding.temperature moved to {KEY}.temperature"),
        (["--model.init_args.max_new_tokens", "8"], "answer: the command line: "
         f"model.init_args.max_new_tokens moved to {KEY}.max_new_tokens"),
        ([f"--{KEY}.strategy", "sample"], f"answer: {KEY}.temperature must be in (0, 2] to sample"),
    ]  # fmt: skip
    for extra, message in cases:
        with pytest.raises(ConfigError) as err:
            main([*base, *extra])
        assert str(err.value).startswith(message), str(err.value)
    assert not (tmp_path / "out").exists()


def test_each_question_has_its_own_fixed_seed() -> None:
    """A stable hash of (seed, question_id): pinned, so a change that would move every sampled
    answer of a reported run fails here."""
    d = Decoding("sample", 0.7, seed=0)
    assert d.question_seed("1") == d.question_seed("1") == 1249356648
    assert len({d.question_seed(str(q)) for q in range(100)}) == 100
    assert Decoding("sample", 0.7, seed=1).question_seed("1") != d.question_seed("1")


def test_request_fields_greedy_as_before_and_sampled_per_question() -> None:
    """Greedy sends what ``answer`` always sent (its journal keys stay); sampling sends each
    question's seed, and ``top_k`` only when set."""
    assert Decoding().request_params("7") == {
        "temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "seed": 0,
    }  # fmt: skip
    paper = Decoding.of(yaml.safe_load((CONF / "paper_decoding.yaml").read_text())["model"][
        "init_args"]["decoding"])  # fmt: skip
    got = paper.request_params("7")
    assert got == {"temperature": 0.7, "top_p": 1.0, "top_k": 50, "max_tokens": 1024,
                   "seed": paper.question_seed("7")}  # fmt: skip
    assert paper.request_params("8")["seed"] != got["seed"]
    assert "top_k" not in Decoding("sample", 0.7).request_params("7")


def _draw(sampler: PerQuestionSampler, logits: torch.Tensor, steps: int) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in range(logits.shape[0])]
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    for step in range(steps):
        out = sampler(ids, logits[:, step])
        assert torch.isfinite(out).sum(dim=1).tolist() == [1] * logits.shape[0]
        for i, token in enumerate(out.argmax(dim=1).tolist()):
            rows[i].append(token)
    return rows


def test_a_row_draws_the_same_tokens_in_any_batch() -> None:
    """Three questions sampled together, alone, and in another order: each row's tokens are its
    own; top-k 1 is the most likely token; another seed draws other tokens."""
    torch.manual_seed(0)
    logits = torch.randn(3, 12, 50)
    d = Decoding("sample", 1.0)
    qids = ["a", "b", "c"]
    together = _draw(PerQuestionSampler(d, [d.question_seed(q) for q in qids]), logits, 12)
    alone = [_draw(PerQuestionSampler(d, [d.question_seed(q)]), logits[i : i + 1], 12)[0]
             for i, q in enumerate(qids)]  # fmt: skip
    reversed_ = _draw(PerQuestionSampler(d, [d.question_seed(q) for q in qids[::-1]]),
                      logits.flip(0), 12)[::-1]  # fmt: skip
    assert together == alone == reversed_
    other = Decoding("sample", 1.0, seed=1)
    assert _draw(PerQuestionSampler(other, [other.question_seed(q) for q in qids]), logits, 12) != (
        together
    )
    top1 = Decoding("sample", 1.0, top_k=1)
    assert _draw(PerQuestionSampler(top1, [1, 2, 3]), logits, 12) == logits.argmax(-1).tolist()


def test_hit_limit_is_no_end_token_by_the_limit() -> None:
    new = torch.tensor([[5, 6, 2], [5, 2, 0], [7, 7, 7]])
    assert hit_limit(new, [2], 3) == [False, False, True]
    assert hit_limit(new, [2, 7], 3) == [False, False, False]
    assert hit_limit(new[:, :2], [2], 3) == [False, False, False]  # all stopped before it
