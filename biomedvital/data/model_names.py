"""Model names with an explicit prefix: one parser for the selector's backbones, the tuner's and
the evaluator's LLaVA, and the benchmarks.

``hf-hub:ORG/REPO``   weights from the Hugging Face hub (BiomedCLIP, LLaVA-1.5).
``local-dir:PATH``    the same files fetched beforehand, for offline clusters.
``tiny:NAME``         a small architecture from the package's ``model_configs/NAME.json``, seeded
                      random weights: tests and the demo.
``open_clip:ARCH``    random weights on one of open_clip's named architectures (``ViT-B-16``):
                      full-size compute without a download, for benchmarks.

``hf:`` is the tuner's former spelling of ``hf-hub:``: still read, with a warning. Each registry
accepts the prefixes it can build; behaviour is chosen by the prefix only, never by substrings
of a path. Lives in ``data/`` so that every stage may import it without importing another.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Prefix = Literal["hf-hub:", "local-dir:", "tiny:", "open_clip:"]
PREFIXES: tuple[Prefix, ...] = ("hf-hub:", "local-dir:", "tiny:", "open_clip:")
DEPRECATED = {"hf:": "hf-hub:"}


@dataclass(frozen=True)
class ModelName:
    """A parsed name: its prefix (with the colon) and what follows it."""

    prefix: Prefix
    value: str

    def __str__(self) -> str:
        return f"{self.prefix}{self.value}"


def parse_model_name(
    name: str,
    accepted: Sequence[str] = PREFIXES,
    *,
    what: str = "model",
    example: str = "hf-hub:llava-hf/llava-1.5-13b-hf",
) -> ModelName:
    """Split ``name`` at its prefix, one of ``accepted`` (a registry's own subset of
    :data:`PREFIXES`); ``hf:`` reads as ``hf-hub:`` with a ``FutureWarning`` (shown to users,
    unlike a ``DeprecationWarning``). Anything else raises a ``ValueError`` naming ``name``,
    the prefixes ``accepted`` and ``example``."""
    for old, new in DEPRECATED.items():
        if name.startswith(old):
            rest = name.removeprefix(old)
            warnings.warn(
                f"{what} {name!r}: the prefix {old!r} is deprecated; write {new}{rest}",
                FutureWarning,
                stacklevel=2,
            )
            name = new + rest
    valid = ", ".join(accepted)
    prefix = next((p for p in PREFIXES if name.startswith(p)), None)
    if prefix is None:
        raise ValueError(
            f"{what} {name!r} has no known prefix; use one of {valid} (e.g. {example})"
        )
    if prefix not in accepted:
        raise ValueError(f"{what} {name!r}: {prefix} is not built here; use one of {valid}")
    value = name.removeprefix(prefix)
    if not value:
        raise ValueError(f"{what} {name!r} names nothing after {prefix}")
    return ModelName(prefix, value)
