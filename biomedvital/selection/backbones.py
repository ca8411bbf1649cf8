"""Image–text backbones for the selector, from a registry with explicit prefixes.

``hf-hub:ORG/REPO``   open_clip weights and config from the Hugging Face hub (the paper's
                       ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``).
``local-dir:PATH``    the same files downloaded beforehand (``open_clip_config.json`` +
                       ``open_clip_pytorch_model.bin``/``.safetensors``), for offline clusters.
``tiny:NAME``         a small architecture from ``model_configs/NAME.json`` with seeded random
                       weights and open_clip's bundled BPE tokenizer: for tests and the demo.
``open_clip:ARCH``    one of open_clip's built-in architectures (``ViT-B-16``…) with seeded
                       random weights: full-size compute without a download, for benchmarks.

Behaviour is chosen by the prefix only, never by substrings of a path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

PREFIXES = ("hf-hub:", "local-dir:", "tiny:", "open_clip:")


@dataclass
class Backbone:
    """A CLIP-style model with the preprocessing that must accompany it."""

    name: str
    model: nn.Module  # open_clip model: encode_image / encode_text
    preprocess: Callable  # PIL image -> float tensor [3, H, W]
    tokenizer: Callable  # list[str] -> long tensor [N, context_length]
    embed_dim: int

    def fingerprint(self) -> str:
        """Hash of the weights and preprocessing: the key under which features may be cached.

        Hashing the weights (not the name) means a fine-tuned or re-initialised backbone can
        never be served features computed by another one.
        """
        h = hashlib.sha256(self.name.encode())
        h.update(repr(self.preprocess).encode())
        h.update(str(getattr(self.tokenizer, "context_length", "")).encode())
        for key, tensor in sorted(self.model.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:32]


def available_tiny() -> list[str]:
    """Names usable after ``tiny:``."""
    folder = resources.files("biomedvital.selection") / "model_configs"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def _tiny(name: str, seed: int) -> Backbone:
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    path = resources.files("biomedvital.selection") / "model_configs" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown tiny backbone 'tiny:{name}'; available: {available_tiny()}")
    cfg = json.loads(path.read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg)
    vision = cfg["vision_cfg"]
    preprocess = open_clip.image_transform(vision["image_size"], is_train=False)
    tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    return Backbone(f"tiny:{name}", model, preprocess, tokenizer, cfg["embed_dim"])


def _random_arch(arch: str, seed: int) -> Backbone:
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    tokenizer = open_clip.get_tokenizer(arch)
    embed_dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") else 512
    return Backbone(f"open_clip:{arch}", model, preprocess, tokenizer, embed_dim)


def _open_clip(name: str) -> Backbone:
    import open_clip

    if name.startswith("local-dir:") and not Path(name.removeprefix("local-dir:")).is_dir():
        raise FileNotFoundError(f"backbone folder not found: {name.removeprefix('local-dir:')}")
    model, preprocess = open_clip.create_model_from_pretrained(name)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        embed_dim = int(model.encode_text(tokenizer(["x"])).shape[-1])
    return Backbone(name, model, preprocess, tokenizer, embed_dim)


def create_backbone(name: str, *, seed: int = 0) -> Backbone:
    """Build the backbone that ``name`` designates (see the module docstring for prefixes)."""
    if name.startswith("tiny:"):
        return _tiny(name.removeprefix("tiny:"), seed)
    if name.startswith("open_clip:"):
        return _random_arch(name.removeprefix("open_clip:"), seed)
    if name.startswith(("hf-hub:", "local-dir:")):
        return _open_clip(name)
    raise ValueError(
        f"backbone {name!r} has no known prefix; use one of {', '.join(PREFIXES)} "
        "(e.g. hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224)"
    )
