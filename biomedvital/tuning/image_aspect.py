"""LLaVA-1.5's ``image_aspect_ratio``: how a non-square image becomes the vision tower's square.

``pad`` (LLaVA-1.5's training and evaluation): the image is centred on a square of its longer
side, the border filled with the image processor's mean colour (``int(255 * mean)`` per
channel), then resized; nothing of the image is lost. ``crop``: the processor resizes the
shorter side and centre-crops, cutting the longer side's edges.

:func:`set_image_aspect_ratio` sets it on a model's processor; the tuner's data module and the
evaluator both call it, and both then preprocess with that processor, so training and
evaluation see the same pixels. ``pad`` is transformers' ``LlavaImageProcessor`` with
``do_pad``; a ``CLIPImageProcessor`` (llava-hf's checkpoints, the tiny models) is replaced by one
with the same settings, as the two differ only by that step. The processor records the value as
``image_aspect_ratio``, so the tuner's export carries it in its processor config (with
``do_pad``, which a server of the export, ``vllm serve`` or ``transformers serve``, follows), and
:func:`recorded_image_aspect_ratio` reads it back.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

ImageAspectRatio = Literal["pad", "crop"]
IMAGE_ASPECT_RATIOS: tuple[str, ...] = get_args(ImageAspectRatio)
RECORD_KEY = "image_aspect_ratio"
"""The image processor's attribute holding the value (a field of the saved processor config:
``processor_config.json``'s ``image_processor``)."""


def check_image_aspect_ratio(value: Any, key: str = "image_aspect_ratio") -> None:
    """Refuse anything but ``pad`` or ``crop``, naming the config key."""
    if value not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"{key} must be 'pad' or 'crop', got {value!r}")


def _pads_to_square(image_processor: Any) -> bool:
    """A processor with transformers' LLaVA square padding (``do_pad``)."""
    return callable(getattr(image_processor, "pad_to_square", None))


def recorded_image_aspect_ratio(image_processor: Any) -> str | None:
    """The value a processor records: its ``image_aspect_ratio`` (an export of the tuner), else
    ``pad`` for a LLaVA processor whose ``do_pad`` is set; ``None`` when it says nothing."""
    value = getattr(image_processor, RECORD_KEY, None)
    if value in IMAGE_ASPECT_RATIOS:
        return value
    if _pads_to_square(image_processor) and getattr(image_processor, "do_pad", False):
        return "pad"
    return None


def _with_square_padding(image_processor: Any) -> Any:
    """A ``LlavaImageProcessor`` (of the same backend) with a CLIP processor's settings."""
    from transformers import (
        CLIPImageProcessor,
        CLIPImageProcessorPil,
        LlavaImageProcessor,
        LlavaImageProcessorPil,
    )

    if not isinstance(image_processor, CLIPImageProcessor | CLIPImageProcessorPil):
        raise ValueError(
            "image_aspect_ratio 'pad' needs LLaVA-1.5's CLIP image processor; this model's is "
            f"{type(image_processor).__name__}: set image_aspect_ratio: crop"
        )
    pil = isinstance(image_processor, CLIPImageProcessorPil)
    settings = {
        k: v
        for k, v in image_processor.to_dict().items()
        if k not in ("image_processor_type", "processor_class", "do_pad")
    }
    return (LlavaImageProcessorPil if pil else LlavaImageProcessor)(**settings)


def set_image_aspect_ratio(processor: Any, value: str) -> None:
    """Make ``processor`` (a ``LlavaProcessor``) preprocess images as ``value`` says, in place,
    and record it; ``crop`` leaves a CLIP processor as it is."""
    check_image_aspect_ratio(value)
    image_processor = processor.image_processor
    if value == "pad" and not _pads_to_square(image_processor):
        image_processor = _with_square_padding(image_processor)
    if _pads_to_square(image_processor):
        image_processor.do_pad = value == "pad"
    setattr(image_processor, RECORD_KEY, value)
    processor.image_processor = image_processor
