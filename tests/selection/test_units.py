"""Unit tests of the selector's parts, with hand-computed golden values."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from biomedvital.data.images import ImageRoot
from biomedvital.data.pool import FilePool
from biomedvital.selection.backbones import PREFIXES, available_tiny, create_backbone
from biomedvital.selection.batching import Entry
from biomedvital.selection.cache import EmbeddingCache, content_key
from biomedvital.selection.datamodule import SelectorDataModule
from biomedvital.selection.losses import pair_loss
from biomedvital.selection.module import SelectorModule, mlp
from biomedvital.selection.pairs import (
    MODEL,
    preference_record,
    sample_model_pairs,
    split_clinician,
    split_levels,
)
from biomedvital.selection.select import top_count
from biomedvital.selection.text import candidate_text

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- losses


def test_hinge_golden() -> None:
    sa = torch.tensor([0.9, 0.2, 0.5, 0.7])
    sb = torch.tensor([0.1, 0.6, 0.5, 0.7])
    junk = torch.full((4,), 123.0)  # hinge must not read the logits
    got = pair_loss("hinge", sa, sb, junk, -junk, margin=1.0)
    torch.testing.assert_close(got, torch.tensor([0.2, 1.4, 1.0, 1.0]))
    # a smaller margin saturates at 0 once the gap exceeds it
    got = pair_loss("hinge", sa, sb, junk, -junk, margin=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.9, 0.5, 0.5]))


def test_ranknet_golden() -> None:
    la = torch.tensor([2.0, 0.0, -1.0])
    lb = torch.tensor([0.0, 0.0, 1.0])
    junk = torch.full((3,), 0.5)  # ranknet must not read the sigmoid scores
    got = pair_loss("ranknet", junk, junk, la, lb, margin=1.0)
    want = torch.tensor([math.log1p(math.exp(-2.0)), math.log(2.0), math.log1p(math.exp(2.0))])
    torch.testing.assert_close(got, want)


def test_unknown_loss_raises() -> None:
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown loss 'hing'"):
        pair_loss("hing", x, x, x, x)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- pairs


def test_split_levels_golden() -> None:
    scores = [5, 8, 5, 8, 5, 8, 5, 8, 5, 8, 2]
    train, val = split_levels(scores, 0.8)
    assert train == {2.0: [10], 5.0: [0, 2, 4, 6], 8.0: [1, 3, 5, 7]}
    assert val == {5.0: [8], 8.0: [9]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_levels_first_part_of_each_level(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = [float(s) for s in rng.integers(0, 11, size=300)]
    train, val = split_levels(scores, 0.8)
    by_level: dict[float, list[int]] = defaultdict(list)
    for i, s in enumerate(scores):
        by_level[s].append(i)
    train_items = {i for v in train.values() for i in v}
    val_items = {i for v in val.values() for i in v}
    assert not train_items & val_items
    assert train_items | val_items == set(range(len(scores)))
    for level, items in by_level.items():
        cut = round(0.8 * len(items))
        if len(items) > 1:
            cut = min(max(cut, 1), len(items) - 1)
        assert train[level] == items[:cut], level  # a prefix of the level, in file order
        assert val.get(level, []) == items[cut:], level


def test_split_levels_full_train_and_bad_fraction() -> None:
    train, val = split_levels([1, 1, 2, 2], 1.0)
    assert train == {1.0: [0, 1], 2.0: [2, 3]} and val == {}
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="train_fraction"):
            split_levels([1, 2], bad)


def test_sample_model_pairs_cross_levels_better_first() -> None:
    levels = {2.0: [10], 5.0: [0, 2, 4], 8.0: [1, 3]}
    level_of = {i: k for k, v in levels.items() for i in v}
    pairs = sample_model_pairs(levels, 300, np.random.default_rng(0))
    assert len(pairs) == 300
    for p in pairs:
        assert level_of[p.a] > level_of[p.b], p
        assert p.kind == MODEL
    # every combination of two levels is drawn
    assert {(level_of[p.a], level_of[p.b]) for p in pairs} == {(5.0, 2.0), (8.0, 2.0), (8.0, 5.0)}
    again = sample_model_pairs(levels, 300, np.random.default_rng(0))
    other = sample_model_pairs(levels, 300, np.random.default_rng(1))
    assert pairs == again
    assert pairs != other


def test_sample_model_pairs_needs_two_levels() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="two or more rating levels"):
        sample_model_pairs({7.0: [0, 1, 2]}, 5, rng)
    with pytest.raises(ValueError, match="two or more rating levels"):
        sample_model_pairs({7.0: [0, 1], 3.0: []}, 5, rng)  # an empty level does not count
    assert sample_model_pairs({7.0: [0, 1, 2]}, 0, rng) == []
    assert sample_model_pairs({}, 0, rng) == []


def test_split_clinician_whole_groups() -> None:
    groups = [f"img{i // 3}" for i in range(30)]  # 10 images, 3 pairs each
    train, val = split_clinician(groups, 0.3, np.random.default_rng(0))
    assert sorted(train + val) == list(range(30))
    assert not set(train) & set(val)
    val_groups = {groups[i] for i in val}
    train_groups = {groups[i] for i in train}
    assert not val_groups & train_groups  # whole groups go to one side
    assert len(val_groups) == 3 and len(val) == 9  # 30 % of the groups
    assert (train, val) == split_clinician(groups, 0.3, np.random.default_rng(0))
    others = {tuple(split_clinician(groups, 0.3, np.random.default_rng(s))[1]) for s in range(5)}
    assert len(others) > 1  # the seed matters


def test_split_clinician_train_pairs_counts_pairs_of_whole_groups() -> None:
    rng = np.random.default_rng(0)
    singles = [f"i{k}" for k in range(30)]
    train, val = split_clinician(singles, 0.5, rng, train_pairs=7)
    assert (len(train), len(val)) == (7, 23)  # the fraction is not used
    grouped = [f"g{k // 3}" for k in range(30)]  # 10 figures of 3 pairs
    train, val = split_clinician(grouped, 0.5, np.random.default_rng(1), train_pairs=7)
    assert len(train) == 9 and len(val) == 21  # whole figures: 3 of them
    assert not {grouped[i] for i in train} & {grouped[i] for i in val}
    with pytest.raises(ValueError, match="leaves none of the 30"):
        split_clinician(singles, 0.5, rng, train_pairs=30)
    with pytest.raises(ValueError, match="at least 1"):
        split_clinician(singles, 0.5, rng, train_pairs=0)


def test_split_clinician_edges() -> None:
    rng = np.random.default_rng(0)
    assert split_clinician(["a", "a", "b"], 0.0, rng) == ([0, 1, 2], [])
    # a tiny fraction still holds out one group, a large one keeps one for training
    train, val = split_clinician(["a", "b", "c"], 0.01, rng)
    assert len(val) == 1 and len(train) == 2
    train, val = split_clinician(["a", "b", "c"], 0.99, rng)
    assert len(val) == 2 and len(train) == 1
    assert split_clinician([], 0.5, rng) == ([], [])
    with pytest.raises(ValueError, match="clinician_val_fraction"):
        split_clinician(["a"], 1.0, rng)


@pytest.mark.parametrize(
    ("scored", "percent", "kept"),
    [(100_000, 1.1, 1100), (60_000, 8.3, 4980), (24, 80, 20), (7, 10, 1), (3, 100.0, 3)],
)
def test_top_count_is_exact_for_decimal_percents(scored: int, percent: float, kept: int) -> None:
    assert top_count(scored, percent) == kept


def test_preference_record_strips_the_expansion_suffix_only() -> None:
    assert preference_record("m1#0>2") == "m1"
    assert preference_record("m1#10>11") == "m1"
    assert preference_record("fig0-p1") == "fig0-p1"
    assert preference_record("a#b") == "a#b"  # a '#' of the user's own id is kept


def _set_up(pool: dict[str, Path], **kw: object) -> SelectorDataModule:
    """A data module over the pool's files, set up for fit (few pairs, no workers)."""
    args: dict = {"model_pairs": 16, "val_model_pairs": 4, "num_workers": 0, **kw}
    dm = SelectorDataModule(FilePool(**{k: str(v) for k, v in pool.items()}), **args)
    dm.setup("fit")
    return dm


def test_pair_split_keeps_an_answer_marks_record_on_one_side(pool: dict[str, Path]) -> None:
    # each marks record expands into 4 pairs sharing its question and answers; a by-pair
    # split that separated them would validate on answers the selector trained on
    images = ["retina.jpg", "ihc.png", "cell.png", "ct.dcm"]
    with pool["preferences"].open("a") as f:
        for k in range(8):
            answers = [{"text": f"good {k}.{i}", "acceptable": True} for i in range(2)]
            answers += [{"text": f"bad {k}.{j}", "acceptable": False} for j in range(2)]
            rec = {"id": f"m{k}", "image": images[k % 4], "question": f"Q(m{k})?"}
            rec["pair_id"] = f"fig{k % 4}"  # its figure: the paper recipe needs the caption
            f.write(json.dumps({**rec, "answers": answers}) + "\n")
    for seed in range(3):
        dm = _set_up(pool, clinician_split="pair", seed=seed)
        side: dict[str, set[str]] = defaultdict(set)
        for name in ("train_clinician", "val_clinician"):
            for pair in dm.sets[name]:
                text = dm.entries[pair.a].text
                if "Q(m" in text:
                    side[text.split("Q(")[1].split(")")[0]].add(name)
        assert len(side) == 8
        assert all(len(sides) == 1 for sides in side.values()), (seed, dict(side))


def test_image_split_knows_one_figure_however_its_path_is_spelled(pool: dict[str, Path]) -> None:
    # "cell.png", "./cell.png" and "x/../cell.png" are one file: a by-image split that grouped
    # the strings would put the same figure on both sides of the clinician hold-out
    rows = [json.loads(line) for line in pool["preferences"].read_text().splitlines()]
    spellings = ["{}", "./{}", "x/../{}"]
    for n, row in enumerate(rows):
        row["image"] = spellings[n % 3].format(row["image"])
    pool["preferences"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = pool["image_root"].resolve()
    for seed in range(3):
        dm = _set_up(pool, clinician_split="image", seed=seed)
        sides = {
            name: {(root / dm.entries[p.a].image).resolve() for p in dm.sets[name]}
            for name in ("train_clinician", "val_clinician")
        }
        assert sides["train_clinician"] and sides["val_clinician"]
        assert not sides["train_clinician"] & sides["val_clinician"], seed


def test_epoch_shuffle_shares_and_resumes_like_a_wrapped_sampler() -> None:
    # each process's share is what Lightning's DistributedSamplerWrapper would have given it
    # (so DDP batches are unchanged), and resume() skips exactly the samples already trained
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from biomedvital.selection.samplers import EpochShuffle

    for world in (1, 2, 3):
        for rank in range(world):
            mine = EpochShuffle(7, seed=5, num_replicas=world, rank=rank)
            plain = EpochShuffle(7, seed=5)
            wrapped = DistributedSamplerWrapper(plain, num_replicas=world, rank=rank, shuffle=False)
            for epoch in (0, 1):
                mine.set_epoch(epoch)
                wrapped.set_epoch(epoch)
                want = list(wrapped)
                assert list(mine) == want and len(mine) == len(want)
                mine.resume(epoch, 2)
                assert list(mine) == want[2:]
                assert list(mine) == want  # the skip applies once
    full = EpochShuffle(7, seed=5)
    full.resume(0, 7)  # a finished epoch resumes at the start of the next
    nxt = EpochShuffle(7, seed=5)
    nxt.set_epoch(1)
    assert list(full) == list(nxt)


def test_held_out_model_pairs_never_score_a_training_input(pool: dict[str, Path]) -> None:
    # "dup" repeats fig0-c0 (same image, same conversation) under another id, last in the file:
    # level 8 is then fig0..3-c0 (train) + dup (held out), and dup is an input trained on
    rows = [json.loads(line) for line in pool["candidates"].read_text().splitlines()]
    twin = next(r for r in rows if r["id"] == "fig0-c0")
    rows.append({**twin, "id": "dup"})
    pool["candidates"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pool["ratings"].open("a") as f:
        f.write(json.dumps({"candidate_id": "dup", "score": 8, "judge": "t"}) + "\n")
    dm = _set_up(pool, model_pairs=64, val_model_pairs=64, seed=0)
    inputs = lambda name: {dm.entries[i] for p in dm.sets[name] for i in (p.a, p.b)}  # noqa: E731
    train, val = inputs("train"), inputs("val_model")
    assert val and not train & val
    assert dm.describe()["val_model_repeats"] == 1


# ----------------------------------------------------------------------------- text

CAPTION = "Fig 1: CT of the chest."
MENTIONS = "As shown in Fig 1, a nodule."
TURNS = [("<image>\nWhat is shown?", " A nodule. "), ("Where is it?", "Left lower lobe.")]


def test_paper_recipe_golden() -> None:
    got = candidate_text("paper", CAPTION, MENTIONS, TURNS)
    assert got == (
        "Fig 1: CT of the chest.As shown in Fig 1, a nodule.Question:What is shown?Answer:A nodule."
    )


def test_conversation_recipe_has_every_turn() -> None:
    got = candidate_text("conversation", CAPTION, MENTIONS, TURNS)
    assert got == (
        "Fig 1: CT of the chest. As shown in Fig 1, a nodule. "
        "Question: What is shown? Answer: A nodule. "
        "Question: Where is it? Answer: Left lower lobe."
    )
    assert "<image>" not in got
    # without figure context, no stray leading separator
    assert candidate_text("conversation", "", "", TURNS[:1]) == (
        "Question: What is shown? Answer: A nodule."
    )


def test_text_recipe_errors() -> None:
    for recipe in ("paper", "conversation"):
        with pytest.raises(ValueError, match="no question-answer turn"):
            candidate_text(recipe, CAPTION, MENTIONS, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown text recipe"):
        candidate_text("novel", CAPTION, MENTIONS, TURNS)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- cache


def _child_reads(cache: EmbeddingCache, keys: list[str], want: torch.Tensor) -> None:
    # runs in a forked child: must open its own connection and see the parent's rows
    got = cache.get(keys)
    assert torch.equal(got, want)
    cache.put(["from-child"], torch.full((1, want.shape[1]), 7.0))
    assert cache._pid == os.getpid()  # a connection of its own, not the parent's


def test_cache_round_trip_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "c" / "emb.sqlite"
    cache = EmbeddingCache(path)
    vecs = torch.tensor([[1 / 3, -2.5, 1e-8], [3.0, 0.1, -0.7]], dtype=torch.float64)
    cache.put(["a", "b"], vecs)
    got = cache.get(["b", "a", "b"])
    assert got.dtype == torch.float32
    assert torch.equal(got, vecs.float()[[1, 0, 1]])  # exact float32 values, in key order
    assert cache.known(["a", "x", "b"]) == {"a", "b"}
    assert len(cache) == 2
    with pytest.raises(KeyError, match="missing"):
        cache.get(["a", "nope"])
    cache.put(["a"], torch.zeros(1, 3))  # replace
    assert torch.equal(cache.get(["a"]), torch.zeros(1, 3))
    cache.close()

    reopened = EmbeddingCache(path, memory_items=0)  # read from disk, not the memory layer
    assert torch.equal(reopened.get(["b"]), vecs.float()[[1]])
    assert reopened.known([]) == set()


def test_cache_in_forked_child(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "emb.sqlite")
    want = torch.randn(3, 4)
    keys = ["k0", "k1", "k2"]
    cache.put(keys, want)  # the parent's connection is open across the fork
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_child_reads, args=(cache, keys, want))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    # the parent still works after the child, and sees what the child stored
    assert torch.equal(cache.get(keys), want)
    assert torch.equal(cache.get(["from-child"]), torch.full((1, 4), 7.0))


def test_content_key_separates_kinds_and_backbones() -> None:
    k = content_key("fp", "img", "abc")
    assert k == content_key("fp", "img", b"abc")
    assert k != content_key("fp", "txt", "abc")
    assert k != content_key("fp2", "img", "abc")


# ----------------------------------------------------------------------------- backbones


def test_unknown_prefix_names_the_valid_ones() -> None:
    for name in ("microsoft/BiomedCLIP", "models/hf-hub:x", "TINY:tiny-clip"):
        with pytest.raises(ValueError) as e:
            create_backbone(name)
        for prefix in PREFIXES:
            assert prefix in str(e.value)


def test_local_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="backbone folder not found"):
        create_backbone(f"local-dir:{tmp_path / 'absent'}")


def test_unknown_tiny_lists_available() -> None:
    assert "tiny-clip" in available_tiny()
    with pytest.raises(ValueError, match="tiny-clip"):
        create_backbone("tiny:no-such-model")


def test_fingerprint_follows_weights() -> None:
    a = create_backbone("tiny:tiny-clip", seed=0)
    b = create_backbone("tiny:tiny-clip", seed=0)
    c = create_backbone("tiny:tiny-clip", seed=1)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    # the default identity needs no weights; hashing the tensors follows any change to them
    assert not a.built and not c.built
    assert a.fingerprint(from_weights=True) == b.fingerprint(from_weights=True)
    with torch.no_grad():
        next(b.model.parameters()).add_(1e-3)
    assert a.fingerprint(from_weights=True) != b.fingerprint(from_weights=True)


# ----------------------------------------------------------------------------- module

ENTRIES = [
    Entry("retina.jpg", "alpha text"),
    Entry("cell.png", "alpha text"),  # same text, other image
    Entry("retina.jpg", "beta words"),  # same image, other text
]


def _module(tmp_path: Path, **kw: object) -> SelectorModule:
    kw = {"head_hidden": [16], "dropout": 0.0, "cache_dir": str(tmp_path / "cache"), **kw}
    return SelectorModule(backbone="tiny:tiny-clip", **kw).eval()  # type: ignore[arg-type]


def test_unpinned_seeds_follow_the_global_seed(
    tmp_path: Path, pool: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def same(a: SelectorModule, b: SelectorModule) -> bool:
        return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # none set: 0, the former default
    assert same(_module(tmp_path), _module(tmp_path, init_seed=0))
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # what every shipped config sets
    assert same(_module(tmp_path), _module(tmp_path, init_seed=0))
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # --seed_everything 7
    followed = _module(tmp_path)
    assert followed.hparams.init_seed == followed.hparams_initial.init_seed == 7  # logged too
    assert same(followed, _module(tmp_path, init_seed=7))
    assert not same(followed, _module(tmp_path, init_seed=0))
    assert _module(tmp_path, init_seed=3).hparams.init_seed == 3  # a pinned seed stays
    files = FilePool(**{k: str(v) for k, v in pool.items()})
    assert SelectorDataModule(files).seed == 7 and SelectorDataModule(files, seed=2).seed == 2
    monkeypatch.setenv("PL_GLOBAL_SEED", "seven")
    with pytest.raises(ValueError, match="PL_GLOBAL_SEED='seven'"):
        _module(tmp_path)


def test_head_reads_text_then_image(tmp_path: Path, pool: dict[str, Path]) -> None:
    m = _module(tmp_path)
    dim = m._backbone.embed_dim
    assert m.head[0].in_features == 2 * dim
    batch = m.make_codec(ImageRoot(pool["image_root"])).encode(ENTRIES)
    weight = m.head[0].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[:, dim:] = 0  # image half off: only the text counts
        text_only = m.entry_logits(batch)
        weight.copy_(saved)
        weight[:, :dim] = 0  # text half off: only the image counts
        image_only = m.entry_logits(batch)
    assert text_only[0] == text_only[1] and text_only[0] != text_only[2]
    assert image_only[0] == image_only[2] and image_only[0] != image_only[1]


def test_frozen_trains_the_head_only(tmp_path: Path) -> None:
    frozen = _module(tmp_path, backbone_mode="frozen")
    assert not [n for n, p in frozen.encoder().named_parameters() if p.requires_grad]
    held = {id(p) for g in frozen.configure_optimizers().param_groups for p in g["params"]}
    assert held == {id(p) for p in frozen.head.parameters()}
    frozen.train()
    assert frozen.head.training and not frozen.encoder().training
    assert not any(k.startswith("backbone.") for k in frozen.state_dict())

    tuned = _module(tmp_path, backbone_mode="finetune")
    held = {id(p) for g in tuned.configure_optimizers().param_groups for p in g["params"]}
    assert held == {id(p) for p in tuned.parameters() if p.requires_grad}
    assert {id(p) for p in tuned.backbone.parameters()} <= held


def _count_encoders(m: SelectorModule, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"img": 0, "txt": 0}
    for kind, name in (("img", "encode_image"), ("txt", "encode_text")):
        real = getattr(m.encoder(), name)

        def counted(x: torch.Tensor, _real=real, _kind=kind) -> torch.Tensor:
            calls[_kind] += 1
            return _real(x)

        monkeypatch.setattr(m.encoder(), name, counted)
    return calls


def test_frozen_features_come_from_the_cache(
    tmp_path: Path, pool: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = ImageRoot(pool["image_root"])
    m = _module(tmp_path, backbone_mode="frozen")
    calls = _count_encoders(m, monkeypatch)
    codec = m.make_codec(root)
    with torch.no_grad():
        first = m.entry_logits(codec.encode(ENTRIES))
        assert calls == {"img": 1, "txt": 1}
        batch = codec.encode(ENTRIES)
        assert len(batch["pixel_rows"]) == 0 and len(batch["token_rows"]) == 0
        second = m.entry_logits(batch)
    assert calls == {"img": 1, "txt": 1}
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)

    # a new module with the same weights is served from the same cache...
    same = _module(tmp_path, backbone_mode="frozen")
    same_calls = _count_encoders(same, monkeypatch)
    with torch.no_grad():
        third = same.entry_logits(same.make_codec(root).encode(ENTRIES))
    assert same_calls == {"img": 0, "txt": 0}
    torch.testing.assert_close(first, third, rtol=0, atol=1e-6)
    # ...one with other weights is not
    other = _module(tmp_path, backbone_mode="frozen", init_seed=5)
    other_calls = _count_encoders(other, monkeypatch)
    with torch.no_grad():
        other.entry_logits(other.make_codec(root).encode(ENTRIES))
    assert other_calls == {"img": 1, "txt": 1}


def test_paper_head_sizes() -> None:
    cfg = yaml.safe_load((REPO / "conf" / "paper" / "selector.yaml").read_text())
    args = cfg["model"]["init_args"]
    biomedclip_embed = 512
    head = mlp(2 * biomedclip_embed, args["head_hidden"], args["dropout"])
    linears = [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)]
    assert linears == [(1024, 512), (512, 512), (512, 512), (512, 1)]
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "ReLU"] * 3 + ["Linear"]  # the released head has no dropout
    assert [type(m).__name__ for m in mlp(8, [4], 0.2)] == ["Linear", "ReLU", "Dropout", "Linear"]


def test_module_default_head_is_the_papers(tmp_path: Path) -> None:
    m = SelectorModule(backbone="tiny:tiny-clip", cache_dir=str(tmp_path))
    linears = [(x.in_features, x.out_features) for x in m.head if isinstance(x, nn.Linear)]
    dim = 2 * m._backbone.embed_dim
    assert linears == [(dim, 512), (512, 512), (512, 512), (512, 1)]


def test_cached_frozen_backbone_is_never_built(tmp_path: Path, pool: dict[str, Path]) -> None:
    """A grid cell whose features are all cached pays nothing for the backbone."""
    root = ImageRoot(pool["image_root"])
    first = _module(tmp_path, backbone_mode="frozen")
    with torch.no_grad():
        expected = first.entry_logits(first.make_codec(root).encode(ENTRIES))
    assert first._backbone.built
    again = _module(tmp_path, backbone_mode="frozen")
    with torch.no_grad():
        got = again.entry_logits(again.make_codec(root).encode(ENTRIES))
    assert not again._backbone.built
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_local_dir_backbone_matches_the_saved_weights(tmp_path: Path) -> None:
    """``local-dir:`` loads an open_clip folder (config + weights) without the hub."""
    import json

    from biomedvital.selection.backbones import create_backbone

    tiny = create_backbone("tiny:tiny-clip", seed=3)
    folder = tmp_path / "clip"
    folder.mkdir()
    cfg_path = (
        Path(__file__).resolve().parents[2] / "biomedvital/selection/model_configs/tiny-clip.json"
    )
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": json.loads(cfg_path.read_text()), "preprocess_cfg": {}})
    )
    torch.save(tiny.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    local = create_backbone(f"local-dir:{folder}")
    assert not local.built and local.embed_dim == tiny.embed_dim
    for (k, a), b in zip(
        tiny.model.state_dict().items(), local.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    fp = local.fingerprint()
    torch.save(
        {k: v + 1 for k, v in tiny.model.state_dict().items()},
        folder / "open_clip_pytorch_model.bin",
    )
    changed = create_backbone(f"local-dir:{folder}").fingerprint()
    assert changed != fp
    # an upgraded library may compute other features from the same weights: a new key
    import open_clip

    real = open_clip.__version__
    open_clip.__version__ = real + ".post1"
    try:
        assert create_backbone(f"local-dir:{folder}").fingerprint() != changed
    finally:
        open_clip.__version__ = real


def test_backbone_with_a_hugging_face_text_tower(tmp_path: Path) -> None:
    # BiomedCLIP's layout (open_clip CustomTextCLIP: a BERT text tower, no text_projection),
    # tiny and local: its embedding width must come from the text tower's projection
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    bert = tmp_path / "bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    wordpiece = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]"}
    tok = tmp_path / "clip"  # open_clip reads a local-dir tokenizer from the folder itself
    PreTrainedTokenizerFast(tokenizer_object=wordpiece, **special).save_pretrained(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(
            BertConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
            )
        ).save_pretrained(bert)
    clip = tok
    text_cfg = {
        "hf_model_name": str(bert),
        "hf_tokenizer_name": str(tok),
        "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": 16,
    }
    vision_cfg = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}
    model_cfg = {"embed_dim": 24, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    (clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    import open_clip

    weights = open_clip.create_model(f"local-dir:{clip}", load_weights=False)
    torch.save(weights.state_dict(), clip / "open_clip_pytorch_model.bin")

    backbone = create_backbone(f"local-dir:{clip}")
    assert backbone.embed_dim == 24
    with torch.no_grad():
        text = backbone.model.encode_text(backbone.tokenizer(["abc"]))
    assert text.shape == (1, backbone.embed_dim)
