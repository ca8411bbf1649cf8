"""Image–text backbones for the selector, from a registry with explicit prefixes
(:mod:`biomedvital.data.model_names` parses them).

``hf-hub:ORG/REPO``   open_clip weights and config from the Hugging Face hub (the paper's
                       ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``).
``local-dir:PATH``    the same files downloaded beforehand (``open_clip_config.json`` +
                       ``open_clip_pytorch_model.bin``/``.safetensors``), for offline clusters.
``tiny:NAME``         a small architecture from ``model_configs/NAME.json`` with seeded random
                       weights and open_clip's bundled BPE tokenizer: for tests and the demo.
``open_clip:ARCH``    one of open_clip's built-in architectures (``ViT-B-16``…) with seeded
                       random weights: full-size compute without a download, for benchmarks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from biomedvital.data.hashing import sha256_file
from biomedvital.data.model_names import PREFIXES, ModelName, parse_model_name


class Backbone:
    """A CLIP-style model with the preprocessing that must accompany it.

    The weights are built on first use of ``model``: preprocessing, tokenizer and the content
    identity come without them, so a frozen backbone whose features are all cached never pays
    for building or loading the network.
    """

    def __init__(
        self,
        name: str,
        preprocess: Callable,
        tokenizer: Callable,
        embed_dim: int,
        build: Callable[[], nn.Module],
        identity: Callable[[], str] | None = None,
    ) -> None:
        self.name = name
        self.preprocess = preprocess  # PIL image -> float tensor [3, H, W]
        self.tokenizer = tokenizer  # list[str] -> long tensor [N, context_length]
        self.embed_dim = embed_dim
        self._build = build
        self._identity = identity
        self._model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        """The network (open_clip model: ``encode_image`` / ``encode_text``), built on demand."""
        if self._model is None:
            self._model = self._build()
        return self._model

    @property
    def built(self) -> bool:
        return self._model is not None

    def fingerprint(self, *, from_weights: bool = False) -> str:
        """Hash of the weights' identity and the preprocessing: the feature-cache key.

        By default the identity is derived without building the model (seeded config, or the
        bytes of the weight file); ``from_weights`` hashes the tensors themselves.
        """
        h = hashlib.sha256(self.name.encode())
        h.update(repr(self.preprocess).encode())
        h.update(str(getattr(self.tokenizer, "context_length", "")).encode())
        if self._identity is not None and not from_weights:
            h.update(self._identity().encode())
            return h.hexdigest()[:32]
        for key, tensor in sorted(self.model.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:32]


def _versions() -> str:
    """The libraries that compute the features: an upgrade may change them (kernels, the
    Hugging Face text tower of BiomedCLIP, preprocessing), so cached features are not reused."""
    import open_clip
    import transformers

    return (
        f"torch={torch.__version__};open_clip={open_clip.__version__};"
        f"transformers={transformers.__version__}"
    )


def available_tiny() -> list[str]:
    """Names usable after ``tiny:``."""
    folder = resources.files("biomedvital.selection") / "model_configs"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def _seeded(build: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def run() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()

    return run


def _tiny(name: str, seed: int) -> Backbone:
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    path = resources.files("biomedvital.selection") / "model_configs" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown tiny backbone 'tiny:{name}'; available: {available_tiny()}")
    text = path.read_text()
    cfg = json.loads(text)
    return Backbone(
        f"tiny:{name}",
        open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False),
        SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"]),
        cfg["embed_dim"],
        _seeded(lambda: open_clip.CLIP(**cfg), seed),
        lambda: f"{text};seed={seed};{_versions()}",
    )


def _random_arch(arch: str, seed: int) -> Backbone:
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    return Backbone(
        f"open_clip:{arch}",
        open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False),
        open_clip.get_tokenizer(arch),
        cfg["embed_dim"],
        _seeded(lambda: open_clip.create_model(arch, pretrained=None), seed),
        lambda: f"{json.dumps(cfg, sort_keys=True)};seed={seed};{_versions()}",
    )


def _embed_dim(model: nn.Module) -> int:
    """Width of the joint embedding, whatever the text tower.

    A built-in CLIP text tower ends in ``text_projection``; a Hugging Face one (BiomedCLIP's
    PubMedBERT: open_clip's ``CustomTextCLIP``) has no such attribute and projects inside
    ``model.text``, whose ``output_dim`` is the width.
    """
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    width = getattr(getattr(model, "text", None), "output_dim", None)
    if width is None:
        raise ValueError(f"cannot tell the embedding width of {type(model).__name__}")
    return int(width)


def _open_clip(parsed: ModelName) -> Backbone:
    """``hf-hub:`` / ``local-dir:``. Preprocessing comes from a weightless (meta-device) build
    and the identity from the bytes of the weight file: neither loads a tensor."""
    import open_clip
    from open_clip.factory import _find_checkpoint_in_dir

    name = str(parsed)  # open_clip reads both prefixes itself
    if parsed.prefix == "local-dir:":
        folder = Path(parsed.value)
        if not folder.is_dir():
            raise FileNotFoundError(f"backbone folder not found: {folder}")

        def weights() -> str | None:
            return _find_checkpoint_in_dir(folder)
    else:
        from open_clip.pretrained import download_pretrained_from_hf

        def weights() -> str | None:
            return download_pretrained_from_hf(parsed.value)

    skeleton, _, preprocess = open_clip.create_model_and_transforms(
        name, load_weights=False, device="meta"
    )
    embed_dim = _embed_dim(skeleton)
    del skeleton

    def build() -> nn.Module:
        model, _ = open_clip.create_model_from_pretrained(name)
        return model

    def identity() -> str:
        path = weights()
        if not path:
            raise FileNotFoundError(f"no weight file found for backbone {name}")
        return f"{sha256_file(path)};{_versions()}"

    return Backbone(name, preprocess, open_clip.get_tokenizer(name), embed_dim, build, identity)


def create_backbone(name: str, *, seed: int = 0) -> Backbone:
    """The backbone that ``name`` designates (see the module docstring for prefixes)."""
    parsed = parse_model_name(
        name,
        PREFIXES,
        what="backbone",
        example="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    )
    if parsed.prefix == "tiny:":
        return _tiny(parsed.value, seed)
    if parsed.prefix == "open_clip:":
        return _random_arch(parsed.value, seed)
    return _open_clip(parsed)  # hf-hub: / local-dir:
