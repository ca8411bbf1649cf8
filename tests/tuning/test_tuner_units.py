"""Conversation rendering, label masking, bad samples, batching and the trainable parameters."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from biomedvital.data.records import Turn
from biomedvital.data.report import BadRecordError
from biomedvital.tuning import (
    LlavaTuner,
    LoraArgs,
    MemoryArgs,
    OptimArgs,
    TunerDataModule,
    VisionArgs,
)
from biomedvital.tuning.batching import GroupedBatchSampler, min_padding_sizes
from biomedvital.tuning.conversation import IGNORE_INDEX, VICUNA_V1_SYSTEM, encode, render
from biomedvital.tuning.models import image_token_count
from biomedvital.tuning.module import cosine_with_warmup


@pytest.fixture(scope="module")
def tuner() -> LlavaTuner:
    return LlavaTuner(
        "tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8), optim=OptimArgs(lr=2e-4, projector_lr=2e-5)
    )


def _turns(*pairs: tuple[str, str]) -> list[Turn]:
    out = []
    for q, a in pairs:
        out += [Turn(**{"from": "human", "value": q}), Turn(**{"from": "gpt", "value": a})]
    return out


def test_rendered_text_is_llava_v1() -> None:
    r = render(_turns(("What is this?\n<image>", "A CT."), ("Abnormal?", "No.")))
    assert r.text == (
        f"{VICUNA_V1_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A CT.</s>"
        "USER: Abnormal? ASSISTANT: No.</s>"
    )
    assert [r.text[s:e] for s, e in r.supervised] == ["A CT.</s>", "No.</s>"]


@pytest.mark.parametrize("image_turn", [0, 1])
def test_labels_token_by_token(tuner: LlavaTuner, image_turn: int) -> None:
    """Every non-assistant token is -100; every assistant token, ``</s>`` included, is its id;
    also when the image comes with the second question (answers before it do not move)."""
    tok = tuner.processor.tokenizer
    n_img = image_token_count(tuner.processor)
    answers = ["The image shows an axial CT slice.", "Nothing abnormal, the bones look intact."]
    questions = ["What does this image show?", "Abnormal?"]
    questions[image_turn] = "<image>\n" + questions[image_turn]
    turns = _turns((questions[0], answers[0]), (questions[1], answers[1]))
    rendered = render(turns)
    enc = encode(rendered, tok, n_img)
    # the rendered conversation with the image expanded, and where the answers are in it
    text = rendered.text.replace("<image>", "<image>" * n_img)
    regions = []
    start = 0
    for a in answers:
        s = text.index(a + "</s>", start)
        regions.append((s, s + len(a) + len("</s>")))
        start = regions[-1][1]
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(enc.input_ids)
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE_INDEX
    for i, ((s, e), tid, lab) in enumerate(zip(offsets, enc.input_ids, enc.labels, strict=True)):
        inside = e > s and any(s < re_ and e > rs for rs, re_ in regions)
        piece = text[s:e]
        if inside:
            assert lab == tid, (i, piece)
            # a token may only reach outside an answer by the separator space before it
            # (byte-level BPE and SentencePiece both glue the space to the first word)
            rs, re_ = next((rs, re_) for rs, re_ in regions if s < re_ and e > rs)
            assert e <= re_ and not text[s:rs].strip(), (i, piece)
        else:
            assert lab == IGNORE_INDEX, (i, piece)
    # the supervised runs decode to exactly the answers with their end-of-turn token
    sup = enc.labels != IGNORE_INDEX
    runs, cur = [], []
    for tid, on in zip(enc.input_ids.tolist(), sup.tolist(), strict=True):
        if on:
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    decoded = [tok.decode(r).removeprefix(" ") for r in runs]  # the separator space, above
    assert decoded == [a + "</s>" for a in answers]
    assert all(r[-1] == tok.eos_token_id for r in runs)
    assert int((enc.input_ids == tok.convert_tokens_to_ids("<image>")).sum()) == n_img


def test_tokens_match_the_processor_at_inference(tuner: LlavaTuner) -> None:
    """Training and ``LlavaProcessor`` agree on the prompt's tokens and image placeholders."""
    from PIL import Image

    from biomedvital.tuning.conversation import prompt

    tok = tuner.processor.tokenizer
    n_img = image_token_count(tuner.processor)
    img = Image.new("RGB", (80, 60), (120, 30, 30))
    ours = encode(render(_turns(("<image>\nWhat?", "X"))), tok, n_img).input_ids
    theirs = tuner.processor(text=prompt("What?"), images=img, return_tensors="pt")["input_ids"][0]
    assert ours[: len(theirs)].tolist() == theirs.tolist()


def test_truncation_counted_and_overlong_refused(tuner: LlavaTuner) -> None:
    tok, n_img = tuner.processor.tokenizer, image_token_count(tuner.processor)
    r = render(_turns(("<image>\nQ?", "word " * 200)))
    full = encode(r, tok, n_img)
    cut = encode(r, tok, n_img, max_length=len(full.input_ids) - 10)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 10
    from biomedvital.tuning.conversation import ConversationError

    with pytest.raises(ConversationError, match="image"):
        encode(r, tok, n_img, max_length=20)


def _write_bad(tmp: Path, demo_root: Path) -> Path:
    ok = {
        "id": "ok",
        "image": "retina.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat?"},
            {"from": "gpt", "value": "A retina."},
        ],
    }
    bad = [
        ok,
        {**ok, "id": "alt", "conversations": [ok["conversations"][0]] * 2},
        {**ok, "id": "noimg", "image": ""},
        {**ok, "id": "missing", "image": "nope.png"},
        {**ok, "id": "escape", "image": "../../etc/passwd"},
        {
            **ok,
            "id": "notoken",
            "conversations": [{"from": "human", "value": "What?"}, ok["conversations"][1]],
        },
        {
            **ok,
            "id": "long",
            "conversations": [
                {"from": "human", "value": "<image>\n" + "why " * 400},
                ok["conversations"][1],
            ],
        },  # fmt: skip
        ok,  # duplicate id
    ]
    path = tmp / "bad.json"
    path.write_text(json.dumps(bad))
    return path


def test_bad_samples_raise_naming_the_record(tmp_path: Path, demo_root: Path, tuner) -> None:
    path = _write_bad(tmp_path, demo_root)
    dm = TunerDataModule(str(path), str(demo_root / "images"), max_length=96, num_workers=0)
    dm.processor = tuner.processor
    with pytest.raises(BadRecordError, match=r"bad\.json: record 2: field 'conversations"):
        dm.setup("fit")


def test_bad_samples_skipped_and_counted(tmp_path: Path, demo_root: Path, tuner) -> None:
    path = _write_bad(tmp_path, demo_root)
    dm = TunerDataModule(
        str(path), str(demo_root / "images"), max_length=96, num_workers=0, on_bad_record="skip"
    )
    dm.processor = tuner.processor
    dm.setup("fit")
    rep = dm.describe()["records"]["data"]
    assert rep["kept"] == 1 and rep["skipped"] == 7
    assert rep["skipped_by_reason"] == {
        "bad_image": 2,
        "duplicate_id": 1,
        "missing_image": 1,
        "no_image_token": 1,
        "too_long": 1,
        "turns_not_alternating": 1,
    }


def test_a_resumed_run_with_other_image_preprocessing_is_warned() -> None:
    """The checkpoint records the data module's ``image_aspect_ratio``; resuming with another
    value warns (the resumed steps see other pixels), the same value does not."""
    import warnings

    dm = TunerDataModule("x.json", "images", image_aspect_ratio="crop")
    assert dm.state_dict() == {"image_aspect_ratio": "crop"}
    with pytest.warns(UserWarning, match="is 'crop', but the checkpoint's run trained with 'pad'"):
        dm.load_state_dict({"image_aspect_ratio": "pad"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.load_state_dict({"image_aspect_ratio": "crop"})


def test_grouped_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=103).tolist()
    groups = ["ct" if i % 3 else "micro" for i in range(103)]
    s = GroupedBatchSampler(lengths, groups, batch_size=4, seed=1, megabatch=4)
    batches = list(s)
    assert len(batches) == len(s)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)  # never mixes modalities
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest first
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    plain = GroupedBatchSampler(lengths, ["all"] * 103, 4, seed=1, megabatch=1)
    plain = list(GroupedBatchSampler([1] * 103, ["all"] * 103, 4, seed=1, megabatch=1))
    pad_plain = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plain)
    assert pad < pad_plain / 2
    assert list(s) == batches  # same epoch, same order
    s.set_epoch(1)
    assert list(s) != batches
    # two ranks split each global batch of the single-process run with batch 2 x 2
    one = list(GroupedBatchSampler(lengths, groups, 4, seed=1, megabatch=4))
    ranks = [
        list(GroupedBatchSampler(lengths, groups, 2, seed=1, megabatch=4, num_replicas=2, rank=r))
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for g, a, b in zip(one, *ranks, strict=True):
        assert set(a) | set(b) == set(g)


def test_lora_only_on_the_language_model(tuner: LlavaTuner) -> None:
    names = [n for n, _ in tuner.model.named_modules()]
    lora = [n for n in names if n.endswith("lora_A")]
    assert lora and all(".language_model." in n for n in lora)
    assert not any("vision_tower" in n and "lora_" in n for n in names)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(n.endswith(f"{proj}.lora_A") for n in lora), proj
    trainable = [n for n, p in tuner.model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n or "embed_tokens" in n for n in trainable)


def test_projector_has_its_own_lr(tuner: LlavaTuner) -> None:
    groups = {g["name"]: g for g in tuner.param_groups()}
    assert groups["model"]["lr"] == 2e-4 and groups["projector"]["lr"] == 2e-5
    proj = {id(p) for p in groups["projector"]["params"]}
    named = dict(tuner.model.named_parameters())
    assert proj == {
        id(p) for n, p in named.items() if "multi_modal_projector" in n and p.requires_grad
    }
    assert not proj & {id(p) for p in groups["model"]["params"]}


def test_full_mode_trains_the_language_model_not_the_tower() -> None:
    full = LlavaTuner("tiny:tiny-llava", mode="full", optim=OptimArgs(lr=2e-5, projector_lr=None))
    trainable = {n for n, p in full.model.named_parameters() if p.requires_grad}
    assert any("language_model.layers.0.self_attn.q_proj" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert {g["lr"] for g in full.param_groups()} == {2e-5}
    unfrozen = LlavaTuner("tiny:tiny-llava", mode="full", vision=VisionArgs(freeze_tower=False))
    assert any("vision_tower" in n for n, p in unfrozen.model.named_parameters() if p.requires_grad)


def test_cosine_with_warmup() -> None:
    values = [cosine_with_warmup(s, 3, 10) for s in range(11)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert values[3] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[3:], values[4:], strict=False))


def test_gradient_checkpointing_gives_the_same_gradients(tuner: LlavaTuner) -> None:
    from PIL import Image

    torch.manual_seed(0)
    tok = tuner.processor.tokenizer
    enc = encode(
        render(_turns(("<image>\nQ?", "An answer."))), tok, image_token_count(tuner.processor)
    )
    pix = tuner.processor.image_processor(
        images=Image.new("RGB", (64, 64), (9, 90, 200)), return_tensors="pt"
    )
    batch = {
        "input_ids": torch.tensor(enc.input_ids)[None],
        "labels": torch.tensor(enc.labels)[None],
        "attention_mask": torch.ones(1, len(enc.input_ids), dtype=torch.long),
        "pixel_values": pix["pixel_values"],
    }
    grads = []
    for gc, every in ((False, 1), (True, 1), (True, 2)):
        m = LlavaTuner(
            "tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8, dropout=0.0),
            memory=MemoryArgs(gradient_checkpointing=gc, checkpoint_every=every),
        )  # fmt: skip
        layers = m.model.get_base_model().model.language_model.layers
        assert [bool(layer.gradient_checkpointing) for layer in layers] == [
            gc and i % every == 0 for i in range(len(layers))
        ]
        m.train()
        m(batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    for other in grads[1:]:
        for n, g in grads[0].items():
            torch.testing.assert_close(other[n], g, msg=n)
    with pytest.raises(ValueError, match="checkpoint_every"):
        LlavaTuner(
            "tiny:tiny-llava", memory=MemoryArgs(gradient_checkpointing=True, checkpoint_every=0)
        )


def _padding(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def _brute_force(lengths: list[int], k: int, max_size: int) -> int:
    """Fewest pad tokens over every cut of a sorted list into k batches of at most max_size."""
    best = None
    n = len(lengths)
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = [0, *cuts, n]
        sizes = [b - a for a, b in itertools.pairwise(edges)]
        if max(sizes) > max_size:
            continue
        pad = sum(lengths[a] * (b - a) - sum(lengths[a:b]) for a, b in itertools.pairwise(edges))
        best = pad if best is None else min(best, pad)
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(6))
def test_min_padding_sizes_is_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(5, 400, size=int(rng.integers(2, 13))).tolist(), reverse=True)
    sizes = min_padding_sizes(lengths, 3)
    assert sum(sizes) == len(lengths) and len(sizes) == -(-len(lengths) // 3)
    assert all(1 <= s <= 3 for s in sizes)
    edges = np.cumsum([0, *sizes]).tolist()
    pad = sum(lengths[a] * (b - a) - sum(lengths[a:b]) for a, b in itertools.pairwise(edges))
    assert pad == _brute_force(lengths, len(sizes), 3)
    fixed = [lengths[j : j + 3] for j in range(0, len(lengths), 3)]
    assert pad <= sum(b[0] * len(b) - sum(b) for b in fixed)


def test_min_padding_sizes_units_and_order() -> None:
    # one long sample no longer drags three short ones along; sizes stay whole per rank
    assert min_padding_sizes([900, 100, 100, 100, 100, 90, 90, 90, 90], 4) == [1, 4, 4]
    sizes = min_padding_sizes([900, 800, 100, 100, 90, 90, 90, 80, 10], 4, unit=2)
    assert all(s % 2 == 0 for s in sizes[:-1]) and sum(sizes) == 9 and len(sizes) == 3
    with pytest.raises(ValueError, match="sorted longest first"):
        min_padding_sizes([1, 2], 2)


def test_sampler_min_padding_split() -> None:
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(80, 300, 90), rng.integers(400, 1000, 13)]).tolist()
    groups = ["all"] * len(lengths)
    fixed = GroupedBatchSampler(lengths, groups, 4, seed=1, megabatch=8)
    split = GroupedBatchSampler(lengths, groups, 4, seed=1, megabatch=8, split="min_padding")
    a, b = list(fixed), list(split)
    assert len(b) == len(a) == len(split)  # same number of steps
    assert sorted(i for x in b for i in x) == list(range(len(lengths)))
    assert max(len(x) for x in b) <= 4
    assert _padding(lengths, b) < _padding(lengths, a)
    assert max(lengths[i] for i in b[0]) == max(lengths)  # still longest first


def test_lineage_of_tuning_data_and_export(tmp_path: Path) -> None:
    from biomedvital.tuning.models import exported_by

    data = tmp_path / "selected" / "selected.json"
    data.parent.mkdir()
    data.write_text("[]")
    dm = TunerDataModule(str(data), str(tmp_path))
    assert dm.upstream_runs() == {}  # no manifest: nothing to tag
    (data.parent / "manifest.json").write_text(json.dumps({"mlflow_run_id": "sel123"}))
    assert dm.upstream_runs() == {"selected": ["sel123"]}
    export = tmp_path / "export"
    (export / "merged").mkdir(parents=True)
    assert exported_by(f"local-dir:{export / 'merged'}") is None
    (export / "run.json").write_text(json.dumps({"mlflow_run_id": "fit456"}))
    assert exported_by(f"local-dir:{export / 'merged'}") == "fit456"
    assert exported_by(f"local-dir:{export}") == "fit456"
    assert exported_by("tiny:tiny-llava") is None


def test_trainable_keys_match_state_dict_under_wrappers(tuner: LlavaTuner) -> None:
    """FSDP (v1) and activation-checkpoint wrappers put prefixes into parameter names but not
    into state-dict keys: a trainable-only checkpoint must still find every trainable tensor
    (on an H100, FSDP v1 otherwise saved none)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = tuner.model.get_base_model().model.language_model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)
    assert any("_checkpoint_wrapped_module" in n for n, _ in tuner.named_parameters())
    keys = tuner.trainable_keys()
    assert any("lora_" in k for k in keys)
    assert keys <= set(tuner.state_dict())
    ckpt = {"state_dict": tuner.state_dict()}
    tuner.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == keys


def _one_batch(tuner: LlavaTuner) -> dict[str, torch.Tensor]:
    from PIL import Image

    tok = tuner.processor.tokenizer
    enc = encode(
        render(_turns(("<image>\nQ?", "An answer."), ("And then?", "More text here."))),
        tok,
        image_token_count(tuner.processor),
    )
    pix = tuner.processor.image_processor(
        images=Image.new("RGB", (64, 64), (9, 90, 200)), return_tensors="pt"
    )
    return {
        "input_ids": torch.tensor(enc.input_ids)[None],
        "labels": torch.tensor(enc.labels)[None],
        "attention_mask": torch.ones(1, len(enc.input_ids), dtype=torch.long),
        "pixel_values": pix["pixel_values"],
    }


def _grads(tuner: LlavaTuner, batch: dict[str, torch.Tensor], seed: int = 7) -> dict:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # lora_B starts at zero, which would hide the adapters' paths
        for name, p in sorted(tuner.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    tuner.train()
    torch.manual_seed(seed)  # the same dropout masks for both paths
    loss = tuner(batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tuner.named_parameters() if p.requires_grad}
    return {"loss": loss.detach(), **grads}


def test_lora_dropout_recompute_gives_peft_gradients_and_keeps_keys(tuner: LlavaTuner) -> None:
    from biomedvital.tuning.lora_memory import RecomputedDropoutLinear

    batch = _one_batch(tuner)
    kw = {"lora": LoraArgs(r=4, alpha=8, dropout=0.3)}
    plain = LlavaTuner("tiny:tiny-llava", **kw)
    folded = LlavaTuner("tiny:tiny-llava", memory=MemoryArgs(lora_dropout_recompute=True), **kw)
    a_mods = [m for n, m in folded.named_modules() if n.endswith("lora_A.default")]
    assert a_mods and all(type(m) is RecomputedDropoutLinear for m in a_mods)
    assert all(m.input_dropout == 0.3 for m in a_mods)
    assert folded.state_dict().keys() == plain.state_dict().keys()
    ref, got = _grads(plain, batch), _grads(folded, batch)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=0, atol=0)
    nested = LlavaTuner(  # its checkpoint inside each layer's
        "tiny:tiny-llava",
        memory=MemoryArgs(lora_dropout_recompute=True, gradient_checkpointing=True),
        **kw,
    )
    in_checkpointed_layers = _grads(nested, batch)
    without = _grads(LlavaTuner("tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8, dropout=0.0)), batch)
    assert not torch.equal(without["loss"], ref["loss"])  # dropout is active in both paths
    lora_a = [n for n in ref if "lora_A" in n]
    assert lora_a and all(ref[n].abs().sum() > 0 for n in lora_a)
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(in_checkpointed_layers[n], g, rtol=1e-5, atol=1e-7, msg=n)
    # and it recomputes instead of saving a dropped copy of each adapter's input
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    sizes = []
    for model in (plain, folded):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        sizes.append(sum(v for k, v in saved.items() if k not in params))
    assert sizes[1] < 0.85 * sizes[0], sizes


def test_regional_compile_matches_eager(tuner: LlavaTuner) -> None:
    from biomedvital.tuning.module import compile_layers

    batch = _one_batch(tuner)
    kw = {"lora": LoraArgs(r=4, alpha=8, dropout=0.0)}
    eager = LlavaTuner("tiny:tiny-llava", **kw)
    compiled = LlavaTuner("tiny:tiny-llava", memory=MemoryArgs(compile=True), **kw)
    layers = compiled.llava().model.language_model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    ref, got = _grads(eager, batch), _grads(compiled, batch)
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-5, msg=n)
    assert compile_layers(LlavaTuner("tiny:tiny-llava", **kw).llava()) == len(layers) + len(
        compiled.llava().model.vision_tower.encoder.layers
    )
    # with dropout: inductor draws its own masks (not eager's), the same for both adapter paths
    kw["lora"] = LoraArgs(r=4, alpha=8, dropout=0.3)
    peft_path = _grads(LlavaTuner("tiny:tiny-llava", memory=MemoryArgs(compile=True), **kw), batch)
    folded = _grads(
        LlavaTuner(
            "tiny:tiny-llava", memory=MemoryArgs(compile=True, lora_dropout_recompute=True), **kw
        ),
        batch,
    )
    assert not torch.equal(peft_path["loss"], ref["loss"])
    for n, g in peft_path.items():
        torch.testing.assert_close(folded[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_supervised_loss_is_hugging_face_loss_without_unsupervised_logits(
    tuner: LlavaTuner,
) -> None:
    one = _one_batch(tuner)
    batch = {k: torch.cat([v, v]) for k, v in one.items()}
    batch["labels"][1, -6:] = -100  # rows with different supervised spans
    batch["attention_mask"][1, -3:] = 0
    model = LlavaTuner("tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8, dropout=0.0))
    model.train()
    torch.manual_seed(0)
    ref = model(batch)
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    seen: list[int] = []
    hook = model.llava().lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-2]))
    summed, count = model.supervised_loss(batch)
    hook.remove()
    loss = summed / count
    loss.backward()
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    assert count == (shifted != -100).sum() and seen == [int(count)]  # only those logits
    assert int(count) < batch["labels"].numel() / 2
    torch.testing.assert_close(loss, ref.loss, rtol=1e-6, atol=1e-6)
    params = dict(model.named_parameters())
    for n, g in want.items():
        torch.testing.assert_close(params[n].grad, g, msg=n)


@pytest.mark.parametrize(
    ("accumulate", "limit", "max_steps", "want"),
    [(1, 1.0, -1, 20), (3, 1.0, -1, 8), (3, 0.5, -1, 4), (3, 4, -1, 4), (3, 1.0, 5, 5)],
)
def test_total_steps_counts_as_lightning_without_building_the_loader(
    tuner: LlavaTuner, accumulate: int, limit: float, max_steps: int, want: int
) -> None:
    """ceil(batches / accumulate) * epochs, capped by max_steps (Lightning's
    estimated_stepping_batches), from the data module's count: 10 batches, 2 epochs."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(train_batches=lambda: 10),
        max_epochs=2,
        limit_train_batches=limit,
        accumulate_grad_batches=accumulate,
        max_steps=max_steps,
    )
    tuner._trainer = trainer  # type: ignore[assignment]
    try:
        assert tuner.total_steps() == want
    finally:
        tuner._trainer = None


def test_lightning_sets_the_grouped_samplers_epoch() -> None:
    """Lightning calls set_epoch on ``loader.batch_sampler.sampler`` at each epoch's start; the
    grouped sampler is its own, so each epoch gets its own batch order."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = GroupedBatchSampler([5, 9, 3, 7, 2, 8, 4, 6], ["a"] * 8, batch_size=2, seed=1)
    loader = DataLoader(list(range(8)), batch_sampler=sampler)
    first = list(sampler)
    _set_sampler_epoch(loader, 3)
    full = list(sampler)
    assert sampler.epoch == 3 and full != first and len(full) == 4
    sampler.resume(3, 2)  # 2 of the epoch's 4 batches trained: the other 2 follow, once
    assert list(sampler) == full[2:] and list(sampler) == full
    sampler.resume(3, 4)  # a finished epoch: the next one, from its start
    assert sampler.epoch == 4 and len(list(sampler)) == 4


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trainable_weights_are_float32_under_mixed_precision(mode: str) -> None:
    """Weights loaded in bf16 (the paper config): under ``bf16-mixed`` the trainable ones
    become float32, so small AdamW updates are not rounded away; frozen ones stay bf16."""
    from types import SimpleNamespace

    tuner = LlavaTuner("tiny:tiny-llava", mode=mode, lora=LoraArgs(r=4, alpha=8), dtype="bfloat16")
    projector = [p for n, p in tuner.named_parameters() if p.requires_grad and "projector" in n]
    assert projector and all(p.dtype == torch.bfloat16 for p in projector)  # as loaded
    tuner._trainer = SimpleNamespace(precision="bf16-mixed", strategy=None)  # type: ignore[assignment]
    try:
        tuner.configure_model()
    finally:
        tuner._trainer = None
    dtypes = {p.dtype for p in tuner.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    frozen = {p.dtype for p in tuner.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    before = [p.detach().clone() for p in projector]
    opt = torch.optim.AdamW(projector, lr=2e-5)
    for p in projector:
        p.grad = torch.ones_like(p)
    opt.step()
    moved = sum(int((p != b).sum()) for p, b in zip(projector, before, strict=True))
    assert moved == sum(p.numel() for p in projector)  # in bf16 most would not move


def test_fsdp_v1_refuses_mixed_dtypes_in_a_unit() -> None:
    """FSDP (v1) flattens each wrapped layer into one tensor of one dtype: bf16 weights with
    float32 adapters are refused before wrapping, naming the two ways out."""
    from biomedvital.tuning.module import check_fsdp1_dtypes, upcast_trainable

    tuner = LlavaTuner("tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8), dtype="bfloat16")
    upcast_trainable(tuner.model)
    with pytest.raises(ValueError, match=r"FSDP \(v1\).*bfloat16 and float32.*fsdp2"):
        check_fsdp1_dtypes(tuner.llava())
    check_fsdp1_dtypes(LlavaTuner("tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8)).llava())


def test_collate_keeps_a_placeholder_when_every_image_failed() -> None:
    """Failed images are dropped and named; a batch of failures only keeps one as a
    placeholder with nothing supervised (the step still runs the model), and lists no id."""
    from biomedvital.tuning.batching import PadCollate, Sample

    def item(i: str, n: int, error: bool) -> dict:
        s = Sample(i, f"{i}.png", np.arange(1, n + 1), np.arange(1, n + 1), "ct", 0)
        row = {"sample": s, "pixel_values": torch.zeros(3, 4, 4)}
        return {**row, "error": "ImageLoadError: broken"} if error else row

    collate = PadCollate(pad_id=0)
    some = collate([item("a", 3, False), item("b", 5, True)])
    assert some["ids"] == ["a"] and some["bad_ids"] == ["b"] and some["input_ids"].shape == (1, 3)
    assert (some["labels"] != IGNORE_INDEX).sum() == 3
    none = collate([item("b", 5, True), item("c", 2, True)])
    assert none["ids"] == [] and none["bad_ids"] == ["b", "c"]
    assert none["input_ids"].shape == (1, 5) and none["pixel_values"].shape == (1, 3, 4, 4)
    assert (none["labels"] == IGNORE_INDEX).all() and none["attention_mask"].sum() == 5


def test_dropout_seeds_differ_between_ranks_and_repeat_per_step(tuner: LlavaTuner) -> None:
    """Per-step seeding (exact resume) includes the rank: two processes do not drop the same
    positions of their different samples; the same rank and step draw the same masks."""
    from types import SimpleNamespace

    def draw(rank: int, step: int) -> torch.Tensor:
        tuner._trainer = SimpleNamespace(global_rank=rank, current_epoch=1)  # type: ignore[assignment]
        try:
            tuner.on_train_batch_start({}, step)
        finally:
            tuner._trainer = None
        return torch.rand(8)

    assert torch.equal(draw(0, 3), draw(0, 3))
    assert not torch.equal(draw(0, 3), draw(1, 3)) and not torch.equal(draw(0, 3), draw(0, 4))


def test_accumulated_micro_batches_weight_tokens_as_one_batch(
    demo_root: Path, selected: Path
) -> None:
    """Two micro-batches of an accumulation window (their supervised tokens differ) give the
    gradient of one batch's token-weighted mean, as Lightning sums them (each divided by
    accumulate_grad_batches); the data module's plan counts exactly the loader's tokens."""
    from types import SimpleNamespace

    tuner = LlavaTuner("tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8, dropout=0.0))
    dm = TunerDataModule(str(selected), str(demo_root / "images"), max_length=192, batch_size=2)
    dm.processor = tuner.processor
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(itertools.islice(iter(loader), 2))
    k = 2
    tuner._trainer = SimpleNamespace(  # type: ignore[assignment]
        world_size=1, accumulate_grad_batches=k, num_training_batches=len(loader),
        datamodule=dm, current_epoch=0, global_rank=0,
    )  # fmt: skip
    params = [p for p in tuner.parameters() if p.requires_grad]

    def grads(loss_of) -> list[torch.Tensor]:
        tuner.zero_grad()
        loss_of().backward()
        return [p.grad.clone() for p in params]

    try:
        parts = [tuner.supervised_loss(b) for b in batches]
        counts = [int(c) for _, c in parts]
        plan = [dm.supervised_tokens(0, i, k) for i in range(2)]
        assert [m for m, _ in plan] == counts and plan[0][1] == plan[1][1] == sum(counts)
        assert counts[0] != counts[1]  # else a mean per micro-batch would agree by chance

        def accumulated() -> torch.Tensor:
            out = [
                tuner.scaled_loss(*tuner.supervised_loss(b), i)[0] for i, b in enumerate(batches)
            ]
            return sum(x / k for x in out)

        def one_batch() -> torch.Tensor:
            return sum(s for s, _ in (tuner.supervised_loss(b) for b in batches)) / sum(counts)

        def per_micro_mean() -> torch.Tensor:
            return sum(s / c for s, c in (tuner.supervised_loss(b) for b in batches)) / k

        want = grads(one_batch)
        for got, w in zip(grads(accumulated), want, strict=True):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
        old = grads(per_micro_mean)
        assert any(not torch.allclose(g, w, rtol=1e-3) for g, w in zip(old, want, strict=True))
    finally:
        tuner._trainer = None


def test_fsdp1_clips_by_norm_through_the_root_unit(tmp_path: Path) -> None:
    """``gradient_clip_val`` under Lightning's FSDP (v1) strategy: its precision plugin refuses
    norm clipping, so the tuner clips with the root unit's ``clip_grad_norm_``. Lightning
    refuses FSDP (v1) on CPU, so a CPU trainer is given the strategy holding a real FSDP unit
    (one gloo process)."""
    import torch.distributed as dist
    from lightning.pytorch import Trainer
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        tuner = LlavaTuner("tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8, dropout=0.0))
        batch = _one_batch(tuner)
        root = FullyShardedDataParallel(tuner, use_orig_params=True, device_id=torch.device("cpu"))
        trainer = Trainer(accelerator="cpu", devices=1, gradient_clip_val=0.01, logger=False)
        strategy = FSDPStrategy(precision_plugin=FSDPPrecision("32-true"))
        trainer._accelerator_connector.strategy = strategy
        strategy.model = root
        tuner.trainer = trainer
        root(batch).loss.backward()
        trainable = [p for p in tuner.parameters() if p.requires_grad]
        before = [p.grad.clone() for p in trainable]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in before]))
        assert norm > 0.01
        opt = torch.optim.SGD(trainable, lr=0.1)
        tuner.configure_gradient_clipping(opt, 0.01, trainer.gradient_clip_algorithm)
        for p, g in zip(trainable, before, strict=True):
            torch.testing.assert_close(p.grad, g * (0.01 / norm), rtol=1e-4, atol=1e-9)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_weight_decay_spares_biases_and_norms(mode: str) -> None:
    """As LLaVA's trainer: AdamW decays the weight matrices (adapters included) but not the
    biases and norm gains; every trainable parameter is in exactly one group."""
    tuner = LlavaTuner(
        "tiny:tiny-llava", mode=mode, lora=LoraArgs(r=4, alpha=8), optim=OptimArgs(weight_decay=0.5)
    )
    groups = tuner.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    named = {n: p for n, p in tuner.model.named_parameters() if p.requires_grad}
    assert sorted(ids) == sorted(id(p) for p in named.values())
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=tuner.optim.weight_decay)
    with torch.no_grad():  # lora_B and biases start at 0, which no decay would move
        for p in named.values():
            if not p.any():
                p.fill_(0.5)
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.zeros_like(p)
    opt.step()  # a zero gradient: only the decay moves a weight
    spared = {n for n, p in named.items() if torch.equal(p, before[n])}
    norms = {n for n in named if "norm" in n or n.endswith(".bias")}
    assert norms and spared == norms
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr.get("projector_no_decay", lr["projector"]) == lr["projector"]


def test_lora_scope_all_trains_the_towers_adapters() -> None:
    """``lora_scope: all`` adapts the CLIP tower too: its adapters must train (frozen ones
    would cost compute and export as no-ops) while the tower's own weights stay frozen."""
    tuner = LlavaTuner("tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8, scope="all"))
    tower = {n: p for n, p in tuner.model.named_parameters() if "vision_tower" in n}
    adapters = {n for n in tower if "lora_" in n}
    assert adapters
    assert {n for n, p in tower.items() if p.requires_grad} == adapters
    ids = {id(p) for g in tuner.param_groups() for p in g["params"]}
    assert all(id(tower[n]) in ids for n in adapters)
