"""LLaVA models and their processors, from a registry with explicit prefixes
(:mod:`biomedvital.data.model_names` parses them).

``hf-hub:ORG/REPO``  a LLaVA checkpoint in transformers layout from the Hugging Face hub (the
                     paper's base: ``hf-hub:llava-hf/llava-1.5-13b-hf``; ``hf:`` is read too,
                     with a deprecation warning).
``local-dir:PATH``   the same files fetched beforehand (``hf download llava-hf/llava-1.5-13b-hf
                     --local-dir /models/llava-1.5-13b``), for offline clusters.
``tiny:NAME``        a small ``LlavaForConditionalGeneration`` (tiny CLIP tower, tiny Llama) from
                     ``model_configs/NAME.json`` with seeded random weights, and a processor built
                     without any download (see :func:`tiny_tokenizer`): tests and the demo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from biomedvital.data.model_names import ModelName, parse_model_name

PREFIXES = ("hf-hub:", "local-dir:", "tiny:")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The tiny tokenizer's merges are learned from this fixed text (the template's words and common
# words of biomedical figure conversations): deterministic, no download, short sequences.
_TINY_CORPUS = """
A chat between a curious human and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the human's questions. USER: ASSISTANT:
What does this image show? What is shown in the figure? Is anything abnormal? Describe the image.
What type of imaging is this? Where is the lesion? What are the main findings?
The image shows an axial CT slice of the chest, abdomen and spine. This is a magnetic resonance
image of the brain. The fundus photograph shows the retina, optic disc, vessels and macula.
Microaneurysms appear as small red dots. The immunohistochemistry stain shows brown nuclei in
the tissue. Cells, nucleus, cytoplasm, membrane, fluorescence microscopy, histology, pathology.
There is no obvious abnormality. The bones look intact. The finding is consistent with the
caption. I cannot tell from this image. It is a cropped slice, so the diagnosis is uncertain.
left right anterior posterior upper lower normal abnormal mass tumor lesion contrast enhanced
"""


@dataclass
class LlavaBundle:
    """A model with the processor that must accompany it, and how it was obtained."""

    name: str
    model: Any  # LlavaForConditionalGeneration
    processor: Any  # LlavaProcessor

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor


def image_token_count(processor: Any) -> int:
    """Placeholders one image takes in the text, computed as ``LlavaProcessor`` does."""
    crop = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size
    h, w = crop["height"], crop["width"]
    n = (h // processor.patch_size) * (w // processor.patch_size)
    n += processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n


def available_tiny() -> list[str]:
    """Names usable after ``tiny:``."""
    folder = resources.files("biomedvital.tuning") / "model_configs"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def tiny_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained in-process on a fixed text (``_TINY_CORPUS``).

    Byte-level, so any text encodes and decodes losslessly (like Llama's byte fallback); the
    specials are Llama's (``<s>`` prepended, ``</s>`` ends a turn) plus ``<image>``. Training
    on a fixed text is deterministic, so the same name always gives the same vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )


def _tiny(name: str, seed: int) -> LlavaBundle:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = resources.files("biomedvital.tuning") / "model_configs" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown tiny model 'tiny:{name}'; available: {available_tiny()}")
    cfg = json.loads(path.read_text())
    tokenizer = tiny_tokenizer(cfg["tokenizer_vocab_size"])
    vision = CLIPVisionConfig(**cfg["vision"])
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg["text"],
    )
    n_image = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act=cfg["projector_hidden_act"],
        vision_feature_layer=cfg["vision_feature_layer"],
        vision_feature_select_strategy=cfg["vision_feature_select_strategy"],
        image_seq_length=n_image,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    size = vision.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=cfg["vision_feature_select_strategy"],
        num_additional_image_tokens=1,  # the CLIP tower's CLS token
    )
    return LlavaBundle(f"tiny:{name}", model, processor)


def _pretrained(parsed: ModelName, dtype: torch.dtype | None) -> Any:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if parsed.prefix == "local-dir:":
        source: Any = Path(parsed.value)
        if not source.is_dir():
            raise FileNotFoundError(f"model folder not found: {source}")
        kwargs: dict[str, Any] = {"local_files_only": True}
    else:
        source, kwargs = parsed.value, {}
    model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype, **kwargs)
    processor = AutoProcessor.from_pretrained(source, **kwargs)
    if not processor.num_additional_image_tokens:
        # llava-hf configs predate the field: a CLIP tower adds its CLS token
        processor.num_additional_image_tokens = 1
    return model, processor


def create_llava(name: str, *, seed: int = 0, dtype: torch.dtype | None = None) -> LlavaBundle:
    """The model and processor that ``name`` designates (see the module docstring)."""
    parsed = parse_model_name(name, PREFIXES)
    if parsed.prefix == "tiny:":
        bundle = _tiny(parsed.value, seed)
        if dtype is not None:
            bundle.model.to(dtype)  # float32 random weights, then as asked (tests of bf16 runs)
        return bundle
    return LlavaBundle(name, *_pretrained(parsed, dtype))
