"""How a VQA answer is decoded: the ``decoding`` block of the evaluator, read by ``test`` (Hugging
Face ``generate``) and by ``answer`` (the request's sampling fields).

``greedy`` (the default) takes the most likely token at each step: the answers are the same
whatever the run, batch size or number of processes. ``sample`` draws each token from the
model's distribution (temperature, then top-k, then top-p, as ``transformers`` applies them).
Each question draws from its own random stream, seeded from ``(seed, question_id)``
(:meth:`Decoding.question_seed`): a rerun, a resumed run, another batch size or another process
layout gives the same answers. In a batch each row samples with its own generator
(:class:`PerQuestionSampler`), so batching costs nothing in speed and changes no answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from biomedvital.config_keys import ConfigError
from biomedvital.llm.sampling import SamplingArgs

Strategy = Literal["greedy", "sample"]
KEY = "model.init_args.decoding"
"""Where the block lives in a benchmark config (errors name their key by it)."""
SAMPLING_ONLY = ("temperature", "top_p", "top_k")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Decoding:
    """The ``decoding`` block (YAML ``decoding: {strategy: sample, temperature: 0.7}``, flags
    ``--model.init_args.decoding.max_new_tokens 1024``); a bad value is one error naming its key.

    Args:
        strategy: ``greedy`` (the most likely token: deterministic, comparable across runs) or
            ``sample`` (drawn from the distribution, seeded per question).
        temperature: with ``sample``, in (0, 2]; required there (no silent default).
        top_p: with ``sample``, the nucleus mass kept, in (0, 1]; ``null`` keeps every token.
        top_k: with ``sample``, the most likely tokens kept; ``null`` keeps every token.
        max_new_tokens: the most tokens an answer may have; an answer cut there records
            ``hit_max_new_tokens`` (``answer``: sent as ``max_tokens``).
        seed: with ``sample``, question ``q`` draws from a stream seeded by ``(seed, q)``;
            ``answer`` sends it as the request seed.
    """

    strategy: Strategy = "greedy"
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "sample"):
            raise ConfigError(f"{KEY}.strategy must be 'greedy' or 'sample', got {self.strategy!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(
                f"{KEY}.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"
            )
        if not _is_int(self.seed):
            raise ConfigError(f"{KEY}.seed must be an integer, got {self.seed!r}")
        if self.strategy == "greedy":
            for name in SAMPLING_ONLY:
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{KEY}.{name} is a setting of strategy 'sample' (greedy takes the most "
                        f"likely token): set {KEY}.strategy: sample, or leave {name} null"
                    )
            return
        t, p, k = self.temperature, self.top_p, self.top_k
        if t is None or isinstance(t, bool) or not 0 < t <= 2:
            raise ConfigError(f"{KEY}.temperature must be in (0, 2] to sample, got {t!r}")
        if p is not None and (isinstance(p, bool) or not 0 < p <= 1):
            raise ConfigError(f"{KEY}.top_p must be in (0, 1] or null, got {p!r}")
        if k is not None and (not _is_int(k) or k < 1):
            raise ConfigError(f"{KEY}.top_k must be an integer >= 1 or null, got {k!r}")

    @classmethod
    def of(cls, value: Decoding | Mapping[str, Any] | None) -> Decoding:
        """``value`` as a :class:`Decoding`: as is, from a mapping (a config block, stored
        hyper-parameters), or the defaults for ``None``; an unknown key is refused naming the
        block's keys."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{KEY} must be a mapping, got {type(value).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ConfigError(f"{KEY} has no key {unknown[0]!r}; keys: {', '.join(known)}")
        return cls(**value)

    @property
    def sampled(self) -> bool:
        return self.strategy == "sample"

    def public(self) -> dict[str, Any]:
        """The block as recorded (journal key, run records, MLflow)."""
        return asdict(self)

    def question_seed(self, question_id: str) -> int:
        """The seed of one question's random stream: a stable hash of ``(seed, question_id)``
        (31 bits, which every endpoint's ``seed`` field takes), independent of the run's
        order, batches and processes."""
        digest = hashlib.sha256(f"{self.seed}\0{question_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % 2**31

    # -- test: Hugging Face generate ---------------------------------------------------------

    def generate_kwargs(self, question_ids: Sequence[str] | None) -> dict[str, Any]:
        """``generate`` arguments for a batch of these questions (rows in this order). Sampling
        runs as greedy decoding over a processor that leaves one token per row: the one its
        own generator drew."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
        }
        if self.sampled:
            if question_ids is None:
                raise ValueError("sampling seeds each question by its id: pass question_ids")
            seeds = [self.question_seed(q) for q in question_ids]
            kwargs["logits_processor"] = LogitsProcessorList([PerQuestionSampler(self, seeds)])
        return kwargs

    # -- answer: a request's sampling fields -------------------------------------------------

    def request_params(self, question_id: str) -> dict[str, Any]:
        """The request's decoding fields for one question: greedy as temperature 0 with the
        block's seed; sampling with the question's own seed (an endpoint that honours seeds
        answers it the same in any run); ``top_k`` only when set (not every endpoint takes
        it: OpenAI's API does not)."""
        if not self.sampled:
            greedy = SamplingArgs(0.0, 1.0, seed=self.seed, max_tokens=self.max_new_tokens)
            return greedy.params()
        top_p = 1.0 if self.top_p is None else self.top_p
        seed = self.question_seed(question_id)
        args = SamplingArgs(
            temperature=float(self.temperature or 0),
            top_p=top_p,
            seed=seed,
            max_tokens=self.max_new_tokens,
        )
        return args.params({"top_k": self.top_k} if self.top_k is not None else None)


class PerQuestionSampler(LogitsProcessor):
    """Draws each row's next token with that row's own generator, after ``transformers``'
    temperature, top-k and top-p warpers, and leaves only that token (greedy decoding then takes
    it). A row's ``t``-th token uses its generator's ``t``-th draw, whatever the other rows, so
    a question's answer does not depend on the batch it is in. Draws are made on the CPU and
    applied to the probabilities in float64 by inverse CDF: the same on any device."""

    def __init__(self, decoding: Decoding, seeds: Sequence[int]) -> None:
        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(float(decoding.temperature))]
        if decoding.top_k is not None:
            warpers.append(TopKLogitsWarper(decoding.top_k))
        if decoding.top_p is not None and decoding.top_p < 1:
            warpers.append(TopPLogitsWarper(decoding.top_p))
        self.warpers = warpers
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"{scores.shape[0]} rows for {len(self.generators)} generators")
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        cdf = scores.double().softmax(dim=-1).cumsum(dim=-1)
        draws = torch.cat(
            [torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators]
        ).to(cdf.device)
        target = (draws * cdf[:, -1]).unsqueeze(1)
        picked = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, picked, 0.0)


def hit_limit(new_tokens: torch.Tensor, eos_ids: Sequence[int], max_new_tokens: int) -> list[bool]:
    """Per row of generated tokens (the prompt cut off): whether the answer ran to
    ``max_new_tokens`` without an end-of-sequence token."""
    if new_tokens.shape[1] < max_new_tokens:
        return [False] * new_tokens.shape[0]  # every row stopped before the limit
    eos = torch.tensor(list(eos_ids), device=new_tokens.device)
    ended = torch.isin(new_tokens, eos).any(dim=1)
    return [not bool(e) for e in ended]
