"""How a chat model samples its reply: one set of arguments for every verb that asks one."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from biomedvital.llm.config import ClientConfigError


class SamplingConfigError(ClientConfigError):
    """A sampling argument out of range, named by its ``sampling.`` key (one line, nothing
    sent)."""


@dataclass(frozen=True)
class SamplingArgs:
    """The ``sampling`` block of the chat verbs (YAML ``sampling: {temperature: 0.2}``, flags
    ``--sampling.max_tokens 512``). Every value is sent with each request and is part of its
    cache key, so changing one asks again.

    Args:
        temperature: sampling temperature, 0 to 2 (0: the most likely tokens).
        top_p: nucleus sampling, the probability mass kept, in (0, 1]; ``null`` sends none (the
            endpoint's default).
        seed: the endpoint's sampling seed (honoured on a best-effort basis by most endpoints).
        max_tokens: the most tokens a reply may have; a reply cut there ends with
            ``finish_reason: length``.
    """

    temperature: float = 0.0
    top_p: float | None = None
    seed: int = 0
    max_tokens: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise SamplingConfigError(
                f"sampling.temperature must be between 0 and 2, got {self.temperature}"
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SamplingConfigError(f"sampling.top_p must be in (0, 1] or null, got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SamplingConfigError(f"sampling.seed must be an integer, got {self.seed!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise SamplingConfigError(
                f"sampling.max_tokens must be an integer, got {self.max_tokens!r}"
            )
        if self.max_tokens < 1:
            raise SamplingConfigError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")

    def params(self, extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The request parameters: these arguments (``top_p`` only when set), then the
        endpoint's own fields (``extra_body``), which win."""
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }
        if self.top_p is not None:
            params["top_p"] = self.top_p
        params.update(extra_body or {})
        return params

    def public(self) -> dict[str, Any]:
        """The arguments as recorded in manifests and MLflow."""
        return asdict(self)
