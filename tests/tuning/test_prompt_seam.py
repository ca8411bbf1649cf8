"""The seam between tuning and evaluation, token by token: the prompt a tuned model is asked
with is the start of what it was trained on, its image placeholders are what the vision tower
produces (576 for LLaVA-1.5's 336 px CLIP-L/14), and the chat template saved with the export
renders the training format.

Besides the tiny byte-level tokenizer of the tests, the checks use a Llama tokenizer
(``LlamaTokenizer``, SentencePiece-style ``▁`` pre-tokenizer with byte fallback, as LLaVA-1.5's)
whose vocabulary is trained here on a fixed text: no download, same pipeline as the real one
in both its ``legacy`` modes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from PIL import Image

from biomedvital.data.records import Turn
from biomedvital.tuning.conversation import (
    IGNORE_INDEX,
    ConversationError,
    chat_template,
    encode,
    prompt,
    render,
)
from biomedvital.tuning.registry import (
    _TINY_CORPUS,
    CLIP_MEAN,
    CLIP_STD,
    create_llava,
    image_token_count,
)

QUESTION = "What does this image show?"
ANSWER = "The image shows an axial CT slice of the chest."


def _llama_tokenizer(legacy: bool) -> Any:
    """A Llama tokenizer (Metaspace ``▁``, byte fallback, ``<s>`` prepended) with LLaVA's added
    ``<pad>`` and ``<image>``; ``legacy`` as in ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    sp.train_from_iterator([_TINY_CORPUS + "\n?!:'-"] * 4, trainer)
    bpe = json.loads(sp.to_str())["model"]
    tok = LlamaTokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) for m in bpe["merges"]],
        legacy=legacy,
        add_bos_token=True,
    )
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def _llava15_processor(tokenizer: Any) -> Any:
    """LLaVA-1.5's processor settings: 336 px crop, patch 14, CLS token dropped."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


@pytest.fixture(scope="module", params=["tiny", "llama", "llama-legacy"])
def processor(request: pytest.FixtureRequest) -> Any:
    if request.param == "tiny":
        return create_llava("tiny:tiny-llava").processor
    return _llava15_processor(_llama_tokenizer(legacy=request.param == "llama-legacy"))


def _turns(*pairs: tuple[str, str]) -> list[Turn]:
    out = []
    for q, a in pairs:
        out += [Turn(**{"from": "human", "value": q}), Turn(**{"from": "gpt", "value": a})]
    return out


def _image() -> Image.Image:
    return Image.new("RGB", (500, 380), (90, 40, 20))


def _ids(batch: Any) -> list[int]:
    return [int(i) for i in batch["input_ids"][0]]


def test_eval_prompt_is_the_start_of_the_training_sample(processor: Any) -> None:
    """The evaluator's prompt (``prompt`` through the processor) is token for token the start
    of the training sample, and the first supervised token is the first one generated."""
    tok = processor.tokenizer
    n_img = image_token_count(processor)
    train = encode(render(_turns((QUESTION + "\n<image>", ANSWER))), tok, n_img, 2048)
    asked = _ids(processor(text=prompt(QUESTION), images=_image(), return_tensors="pt"))
    ids = train.input_ids.tolist()
    assert ids[: len(asked)] == asked
    image_id = tok.convert_tokens_to_ids("<image>")
    assert asked.count(image_id) == ids.count(image_id) == n_img
    assert asked[0] == tok.bos_token_id and asked.count(tok.bos_token_id) == 1
    # nothing of the prompt is learned; the answer is, from the first token the model generates
    assert (train.labels[: len(asked)] == IGNORE_INDEX).all()
    assert (train.labels[len(asked) :] != IGNORE_INDEX).all()
    assert tok.decode(ids[len(asked) :]).strip() == ANSWER + "</s>"
    assert ids[-1] == tok.eos_token_id


def test_llava15_image_placeholders_are_the_vision_towers_features() -> None:
    """576 placeholders for a 336 px CLIP-L/14 tower (577 positions, CLS dropped by the
    ``default`` strategy), in training and in the processor, and the model takes both."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    proc = _llava15_processor(_llama_tokenizer(legacy=False))
    tok = proc.tokenizer
    assert image_token_count(proc) == 576
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=8, intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = Llava(config).eval()
    asked = proc(text=prompt(QUESTION), images=_image(), return_tensors="pt")
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=asked["pixel_values"])
        feats = getattr(feats, "pooler_output", feats)  # transformers 5 returns an output object
        feats = feats[0] if isinstance(feats, (list, tuple)) else feats
        assert feats.reshape(-1, text.hidden_size).shape[0] == 576
        # the model checks placeholders against features: both sides' ids go through it
        train = encode(render(_turns(("<image>\n" + QUESTION, ANSWER))), tok, 576, 2048)
        model(
            input_ids=torch.as_tensor(train.input_ids)[None],
            pixel_values=asked["pixel_values"],
            labels=torch.as_tensor(train.labels)[None],
        )
        model(**asked)


def test_max_length_counts_the_576_image_placeholders() -> None:
    """2,048 tokens include the image's 576; a cut never reaches into them, and a sample left
    without an answer token is refused (the data module counts it as ``too_long``)."""
    proc = _llava15_processor(_llama_tokenizer(legacy=False))
    tok, n_img = proc.tokenizer, image_token_count(proc)
    long_answer = render(_turns(("<image>\n" + QUESTION, "the image shows " * 600)))
    cut = encode(long_answer, tok, n_img, 2048)
    assert cut.truncated and len(cut.input_ids) == 2048
    assert int((cut.input_ids == tok.convert_tokens_to_ids("<image>")).sum()) == 576
    assert (cut.labels != IGNORE_INDEX).sum() > 0
    long_question = render(_turns(("<image>\n" + "the image shows " * 600, ANSWER)))
    with pytest.raises(ConversationError, match="nothing supervised") as err:
        encode(long_question, tok, n_img, 2048)
    assert err.value.category == "too_long"
    with pytest.raises(ConversationError, match="cut into the image"):
        encode(long_answer, tok, n_img, 600)


def test_chat_template_renders_the_training_conversation(processor: Any) -> None:
    """``apply_chat_template`` with :func:`chat_template` gives the training sample's ids, its
    assistant mask is the loss mask, and its generation prompt is the evaluator's prompt."""
    proc = processor
    saved = proc.chat_template
    proc.chat_template = chat_template()
    try:
        turns = _turns(("What is this?\n<image>", "A CT."), ("Abnormal? ", "No, normal."))
        messages = [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A CT."}]},
            {"role": "user", "content": "Abnormal? "},
            {"role": "assistant", "content": "No, normal."},
        ]  # fmt: skip
        train = encode(render(turns), proc.tokenizer, image_token_count(proc))
        assert proc.apply_chat_template(messages) == render(turns).text
        out = proc.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            images=[_image()],
            return_assistant_tokens_mask=True,
        )
        assert _ids(out) == train.input_ids.tolist()
        loss_mask = (train.labels != IGNORE_INDEX).astype(int).tolist()
        assert [int(m) for m in out["assistant_masks"][0]] == loss_mask
        # one question, as the evaluator (and a server using the template) asks it
        ask = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": True}
        served = proc.apply_chat_template(ask, return_dict=True, images=[_image()], **kwargs)
        asked = proc(text=prompt(QUESTION), images=_image(), return_tensors="pt")
        assert _ids(served) == _ids(asked)
        # a system message replaces the trained one (here: none)
        bare = [{"role": "system", "content": ""}, *ask]
        assert proc.apply_chat_template(bare, add_generation_prompt=True) == prompt(QUESTION, "")
    finally:
        proc.chat_template = saved
