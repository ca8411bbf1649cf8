"""The data-selection model: backbone image and text features -> MLP -> a quality score."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

from biomedvital.data.images import ImageRoot
from biomedvital.selection.backbones import create_backbone
from biomedvital.selection.batching import Codec
from biomedvital.selection.cache import EmbeddingCache
from biomedvital.selection.losses import LossName, pair_loss
from biomedvital.selection.metrics import NormalisedMeanRank
from biomedvital.selection.pairs import CLINICIAN, MODEL
from biomedvital.selection.seeds import resolve_seed

BackboneMode = Literal["finetune", "frozen"]

# pair set evaluated -> the name of its dropped-pair count under ``val/`` and ``test/``
_EVAL_DROPPED = {"val_model": "dropped_pairs_model", "val_clinician": "dropped_pairs_clinician"}


def mlp(in_dim: int, hidden: list[int], dropout: float) -> nn.Sequential:
    """The paper's head: Linear-ReLU(-Dropout) blocks down to one logit."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


class SelectorModule(LightningModule):
    """Scores (image, text) candidates; trained on preference pairs.

    Args:
        backbone: ``hf-hub:…`` / ``local-dir:…`` / ``tiny:…`` (see ``backbones.py``). Paper:
            ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``.
        backbone_mode: ``finetune`` (paper: the whole model trains) or ``frozen`` (only the head
            trains; features come from an on-disk cache keyed by content hash).
        cache_dir: where the frozen backbone's feature cache lives.
        head_hidden: hidden widths of the MLP head (paper: 512, 512, 512; input is twice the
            backbone's embedding size, text features first).
        dropout: dropout after each hidden layer of the head (paper: 0, none in the released
            head; the demo uses 0.2).
        loss: ``hinge`` (paper, margin 1 on sigmoid scores) or ``ranknet``.
        margin: hinge margin.
        w: weight of a clinician pair in the loss; model pairs weigh 1 (paper's best: 400).
        lr: learning rate (paper: 1e-5, Adam).
        head_lr: learning rate of the head when it should differ from the backbone's.
        weight_decay: Adam(W) weight decay.
        init_seed: seed of randomly initialised weights (``tiny:`` backbones and the head) and
            of per-step dropout, so that the same config gives the same model whatever else
            consumed the RNG. ``None`` (default): the run's ``seed_everything`` (0 when unset),
            so that ``--seed_everything`` and a grid's seed replicates vary the model; the
            checkpoint records the seed used.
    """

    def __init__(
        self,
        backbone: str = "tiny:tiny-clip",
        backbone_mode: BackboneMode = "finetune",
        cache_dir: str = ".cache/biomedvital/embeddings",
        head_hidden: list[int] | None = None,
        dropout: float = 0.2,
        loss: LossName = "hinge",
        margin: float = 1.0,
        w: float = 400.0,
        lr: float = 1e-5,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        if backbone_mode not in ("finetune", "frozen"):
            raise ValueError(f"backbone_mode must be 'finetune' or 'frozen', got {backbone_mode!r}")
        if w < 0:
            raise ValueError(f"w must be >= 0, got {w}")
        head_hidden = [512, 512, 512] if head_hidden is None else list(head_hidden)
        self.save_hyperparameters()
        # the seed used, not None, in checkpoints (a frozen ``tiny:`` backbone is rebuilt from
        # it) and in the logged parameters (a resumed run logs the checkpoint's: they must
        # match). LightningCLI saves the config's values (None), hence the rewrite of both.
        init_seed = resolve_seed(init_seed)
        for saved in (self.hparams, self._hparams_initial):
            saved["init_seed"] = init_seed
        self._backbone = create_backbone(backbone, seed=init_seed)
        self.frozen = backbone_mode == "frozen"
        if not self.frozen:
            # trained: a submodule, saved in checkpoints. Frozen: built only if a feature is
            # missing from the cache, and left out of checkpoints (the name rebuilds it)
            self.backbone = self._backbone.model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed + 1)
            self.head = mlp(2 * self._backbone.embed_dim, head_hidden, dropout)
        self._cache: EmbeddingCache | None = None
        self._fingerprint: str | None = None
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            self.metrics[f"{stage}_pair_acc"] = MeanMetric()
            self.metrics[f"{stage}_align_rate"] = MeanMetric()
            self.metrics[f"{stage}_align_ties"] = MeanMetric()
            self.metrics[f"{stage}_auroc"] = BinaryAUROC()
            self.metrics[f"{stage}_map"] = BinaryAveragePrecision()
            self.metrics[f"{stage}_mean_rank"] = NormalisedMeanRank()
        # positions of the pairs dropped for unreadable images, by pair set (``train``,
        # ``train_clinician``, ``val_model``, ``val_clinician``): a set, so that a pair met
        # again in a later epoch is counted once
        self._dropped: dict[str, set[int]] = {}
        self._warned: set[str] = set()

    @property
    def dropped_pairs(self) -> dict[str, int]:
        """Pairs dropped for unreadable images (``on_bad_record: skip``) by pair set, each pair
        once: the run record's ``dropped_pairs``, beside the data's ``pairs`` counts."""
        return {name: len(found) for name, found in sorted(self._dropped.items())}

    # -- features and scores ---------------------------------------------------------------

    @property
    def cache(self) -> EmbeddingCache | None:
        if self.frozen and self._cache is None:
            self._cache = EmbeddingCache(Path(self.hparams.cache_dir) / "embeddings.sqlite")
        return self._cache

    def fingerprint(self) -> str:
        """Identity of the frozen backbone's weights, the feature cache's key (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = self._backbone.fingerprint()
        return self._fingerprint

    def encoder(self) -> nn.Module:
        """The image–text network; a frozen one is built (eval, no grad) on first need."""
        if not self.frozen:
            return self.backbone
        model = self._backbone.model
        if next(model.parameters()).device != self.device or model.training:
            model.requires_grad_(False)
            model.to(self.device).eval()
        return model

    def make_codec(self, root: ImageRoot, **kwargs: Any) -> Codec:
        """Preprocessing for the data module's workers, matched to this backbone."""
        return Codec(
            root,
            self._backbone.preprocess,
            self._backbone.tokenizer,
            self.fingerprint() if self.frozen else "",
            cache=self.cache,
            **kwargs,
        )

    def _encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text features for the batch's unique images and texts."""
        dim = self._backbone.embed_dim
        feats = []
        for keys, rows, inputs, method in (
            (batch["image_keys"], batch["pixel_rows"], batch["pixels"], "encode_image"),
            (batch["text_keys"], batch["token_rows"], batch["tokens"], "encode_text"),
        ):
            out = torch.zeros(len(keys), dim, device=self.device)
            if len(rows):
                encode = getattr(self.encoder(), method)
                with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
                    enc = F.normalize(encode(inputs.to(self.device)).float(), dim=-1)
                out = out.index_copy(0, rows.to(self.device), enc)
                if self.frozen and self.cache is not None:
                    self.cache.put([keys[i] for i in rows.tolist()], enc)
            if self.frozen:
                done = set(rows.tolist())
                rest = [i for i, k in enumerate(keys) if i not in done and k]
                if rest:
                    vecs = self.cache.get([keys[i] for i in rest]).to(self.device)
                    out = out.index_copy(0, torch.tensor(rest, device=self.device), vecs)
            feats.append(out)
        return feats[0], feats[1]

    def entry_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """One logit per entry of the batch (text features first, as the paper's code)."""
        img, txt = self._encode(batch)
        x = torch.cat(
            [txt[batch["entry_text"].to(self.device)], img[batch["entry_image"].to(self.device)]],
            dim=-1,
        )
        return self.head(x).squeeze(-1)

    # -- training --------------------------------------------------------------------------

    def _pair_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.entry_logits(batch)
        la, lb = logits[batch["pair_a"]], logits[batch["pair_b"]]
        return {"la": la, "lb": lb, "sa": torch.sigmoid(la), "sb": torch.sigmoid(lb)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # lineage: runs that load this checkpoint tag the run that trained it
        checkpoint["mlflow_run_id"] = getattr(self.logger, "run_id", None)
        # a resumed fit (or a rerun of a finished one, which runs no epoch) reports them too
        checkpoint["dropped_pairs"] = {k: sorted(v) for k, v in self._dropped.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only a fit continues the run that dropped them: test and predict runs count their own
        if self._trainer is not None and self._trainer.state.fn == "fit":
            self._dropped = {k: set(v) for k, v in checkpoint.get("dropped_pairs", {}).items()}

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "check_truncation"):
            return
        found = dm.check_truncation(self._backbone.tokenizer)
        for name, counts in found.items():
            if counts["identical_after_truncation"]:
                rank_zero_warn(
                    f"{counts['identical_after_truncation']} of {counts['checked']} {name} pairs are "
                    "identical after truncation to the backbone's context length: the selector "
                    "cannot tell their answers apart (use a longer context or text_recipe: "
                    "conversation with shorter captions)"
                )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # dropout draws from the global RNG, which loaders and hooks also consume in an order
        # that differs after a restart: seeding per step makes a resumed run continue exactly
        torch.manual_seed(self.hparams.init_seed * 1_000_003 + self.global_step)

    def _count_dropped(self, batch: dict[str, Any]) -> None:
        """Note the batch's dropped pairs under its pair set (clinician ones of ``train`` under
        ``train_clinician`` too, as the data's pair counts)."""
        source = batch["source"]
        self._dropped.setdefault(source, set()).update(batch["dropped_index"])
        if source == "train":
            clinician = [
                i
                for i, k in zip(batch["dropped_index"], batch["dropped_kind"], strict=True)
                if k == CLINICIAN
            ]
            self._dropped.setdefault("train_clinician", set()).update(clinician)

    def _report_dropped(self, stage: str, names: dict[str, str]) -> None:
        """Log the pairs dropped so far per set (joined across processes), and warn once per
        set when a validation metric is measured on fewer pairs than the set holds."""
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            parts: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, self._dropped)
            for part in parts:
                for name, found in part.items():
                    self._dropped.setdefault(name, set()).update(found)
        for name, metric in names.items():
            if name not in self._dropped:
                continue
            n = len(self._dropped[name])
            self.log(f"{stage}/{metric}", float(n), rank_zero_only=True)
            if n and stage != "train" and name not in self._warned:
                self._warned.add(name)
                rank_zero_warn(
                    f"{n} {name} pair(s) dropped for unreadable images (on_bad_record: skip): "
                    f"{stage} metrics of {name} are measured without them (counted in the run "
                    "record's dropped_pairs)"
                )

    def on_train_epoch_end(self) -> None:
        self._report_dropped(
            "train", {"train": "dropped_pairs", "train_clinician": "dropped_pairs_clinician"}
        )

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._report_dropped("val", _EVAL_DROPPED)

    def on_test_epoch_end(self) -> None:
        self._report_dropped("test", _EVAL_DROPPED)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._count_dropped(batch)
        out = self._pair_outputs(batch)
        per_pair = pair_loss(
            self.hparams.loss, out["sa"], out["sb"], out["la"], out["lb"], self.hparams.margin
        )
        kind = batch["kind"].to(self.device)
        weight = torch.where(kind == CLINICIAN, float(self.hparams.w), 1.0)
        n = max(len(per_pair), 1)
        loss = (weight * per_pair).sum() / n
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for name, k in (("model", MODEL), ("clinician", CLINICIAN)):
            mask = kind == k
            if mask.any():
                self.log(f"train/loss_{name}", per_pair[mask].mean(), batch_size=int(mask.sum()))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        self._count_dropped(batch)
        out = self._pair_outputs(batch)
        # rank by logits: the sigmoid saturates to exactly 1.0 in float32 for confident pairs,
        # which would turn real orderings into ties (same ranking, no false ties)
        sa, sb = out["la"], out["lb"]
        n = len(sa)
        if n == 0:
            return
        m = self.metrics
        if batch["source"] == "val_model":
            m[f"{stage}_pair_acc"].update((sa > sb).float())
            self.log(
                f"{stage}/pair_acc", m[f"{stage}_pair_acc"], batch_size=n, add_dataloader_idx=False
            )
        else:
            m[f"{stage}_align_rate"].update((sa > sb).float())
            m[f"{stage}_align_ties"].update((sa == sb).float())
            scores = torch.sigmoid(torch.cat([sa, sb]).double())
            labels = torch.cat([torch.ones(n), torch.zeros(n)]).long().to(self.device)
            m[f"{stage}_auroc"].update(scores, labels)
            m[f"{stage}_map"].update(scores, labels)
            m[f"{stage}_mean_rank"].update(torch.cat([sa, sb]), labels)  # logits: no false ties
            for name in ("align_rate", "align_ties", "auroc", "map", "mean_rank"):
                self.log(
                    f"{stage}/{name}",
                    m[f"{stage}_{name}"],
                    batch_size=n,
                    add_dataloader_idx=False,
                    prog_bar=name == "align_rate",
                )

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        valid = batch["valid"]
        logits = self.entry_logits(batch) if len(batch["ids"]) else torch.empty(0)
        logits = logits[valid.to(logits.device)].float().cpu()
        ids = [i for i, ok in zip(batch["ids"], valid.tolist(), strict=True) if ok]
        return {
            "ids": ids,
            "scores": torch.sigmoid(logits),
            "logits": logits,
            "skipped": batch["skipped"],
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = [{"params": self.head.parameters(), "lr": hp.head_lr or hp.lr}]
        if not self.frozen:
            groups.append({"params": self.backbone.parameters(), "lr": hp.lr})
        return torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
