"""Worker of test_tuner_sharded's FSDP (v1) export test: 2 gloo processes on CPU wrap the tiny
tuner as Lightning's FSDPStrategy does (the whole LightningModule in a root FSDP unit, each
decoder and CLIP layer auto-wrapped, ``use_orig_params``), take one training step, then all
call ``export``. Lightning refuses FSDP (v1) on CPU, so torch's FSDP is driven directly.

    python tests/tuning/fsdp1_export.py OUT_DIR PORT
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run(rank: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from biomedvital.tuning import LlavaTuner, LoraArgs
    from biomedvital.tuning.models import image_token_count

    tuner = LlavaTuner("tiny:tiny-llava", lora=LoraArgs(r=4, alpha=8, dropout=0.0))
    root = FullyShardedDataParallel(
        tuner,
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer, CLIPEncoderLayer}),
        use_orig_params=True,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=torch.device("cpu"),
    )
    image = tuner.processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[1] + [image] * image_token_count(tuner.processor) + [5, 6, 7, 8]])
    size = tuner.processor.image_processor.crop_size
    torch.manual_seed(0)  # the same batch on both ranks
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "pixel_values": torch.randn(1, 3, size["height"], size["width"]),
    }
    opt = torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=0.5)
    root(batch).loss.backward()
    opt.step()
    assert tuner.is_sharded()
    written = tuner.export(out, root=root)
    assert bool(written) == (rank == 0), written
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
