"""Training throughput and MFU of a LLaVA-1.5-shaped model under FSDP2, on GPUs.

The model is built from a config (random weights, no download): LLaVA-1.5-7B or -13B shapes
(CLIP ViT-L/14-336 tower, 2-layer MLP projector, Vicuna/Llama language model), LoRA on the
language model as ``conf/paper/tuner.yaml`` (``lora.r`` 128) or full fine-tuning, every decoder and
vision layer its own FSDP2 unit as ``LlavaTuner.configure_model``, bf16 weights, synthetic
batches (576 image tokens + text to ``--seq-len``). Reports tokens/s/GPU, MFU = 6·N·tokens/s /
peak FLOP/s (N: all parameters; for LoRA the backward skips the frozen weights' gradients, so
about 4·N is done and MFU by 6·N overstates it: both are printed) and peak GPU memory per device.

    torchrun --nproc_per_node 8 bench/tuner_mfu.py --size 13b --gpu h100
    python bench/tuner_mfu.py --size 13b --batch-size 4 --compile --lora-dropout-recompute \
        --activation-checkpointing --checkpoint-every 2                # the memory-lean path
    python bench/tuner_mfu.py --size 7b --gpu a100 --batch-size 2         # one GPU
    python bench/tuner_mfu.py --size 13b --dry-run                         # CPU: shapes, N, FLOPs
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0}  # dense bf16, SXM
TEXT = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
            "num_attention_heads": 40, "num_key_value_heads": 40},
    # a smoke test of this script on CPU (--device cpu), the same code path at toy widths
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4},
}  # fmt: skip
VISION = {  # CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower)
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
}  # fmt: skip
TINY_VISION = {**VISION, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "projection_dim": 32}  # fmt: skip
VOCAB, IMAGE_TOKEN = 32064, 32000


def llava_config(size: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, **TEXT[size])  # fmt: skip
    vision = TINY_VISION if size == "tiny" else VISION
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=text,
        image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576,
        tie_word_embeddings=False,
    )  # fmt: skip


def build(size: str, mode: str, lora_r: int, device: torch.device | str):
    """The model on ``device`` (``meta``: shapes only), LoRA-wrapped in ``lora`` mode."""
    from transformers import LlavaForConditionalGeneration

    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(llava_config(size), dtype=torch.bfloat16)
    model.config.use_cache = False
    model.requires_grad_(mode == "full")
    model.model.vision_tower.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        from biomedvital.tuning.module import LLAMA_LINEAR, PROJECTOR, lora_target_regex

        model = get_peft_model(model, LoraConfig(
            r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05, bias="none",
            target_modules=lora_target_regex(LLAMA_LINEAR, "language_model"),
            modules_to_save=[PROJECTOR], task_type="CAUSAL_LM",
        ))  # fmt: skip
    return model


def counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": total, "trainable_params": trainable}


def flops_per_token(n_params: int) -> dict:
    return {"6N": 6 * n_params, "4N_frozen_base": 4 * n_params}


def shard(model, mesh) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.vision_tower.encoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    for layer in base.model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def run(args: argparse.Namespace) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" not in os.environ:  # plain `python`: a process group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda device: None)
    torch.manual_seed(0)
    model = build(args.size, args.mode, args.lora_r, device)
    if args.activation_checkpointing:
        from biomedvital.tuning.module import enable_checkpointing

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        enable_checkpointing(base, args.checkpoint_every)
    if args.lora_dropout_recompute:
        from biomedvital.tuning.lora_memory import recompute_lora_dropout

        recompute_lora_dropout(model)
    if args.compile:
        from biomedvital.tuning.module import compile_layers

        compile_layers(model.get_base_model() if hasattr(model, "get_base_model") else model)
    n = counts(model)
    shard(model, mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    b, s = args.batch_size, args.seq_len
    ids = torch.randint(0, IMAGE_TOKEN, (b, s), device=device)
    ids[:, 1:577] = IMAGE_TOKEN
    labels = ids.clone()
    labels[:, :600] = -100
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    keep = targets != -100
    pixels = torch.randn(b, 3, 336, 336, device=device, dtype=torch.bfloat16)
    mask = torch.ones_like(ids)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        if args.loss == "hf":
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
            loss = out.loss
        else:  # as LlavaTuner.supervised_loss: logits at supervised positions only
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                           logits_to_keep=keep).logits  # fmt: skip
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    tokens_per_s_gpu = b * s / step_s
    peak = PEAK_TFLOPS[args.gpu] * 1e12 if args.peak_tflops is None else args.peak_tflops * 1e12
    if cuda:
        peak_mem = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    else:  # the process's peak resident memory (KiB on Linux)
        import resource

        peak_mem = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])
    all_mem = [torch.zeros_like(peak_mem) for _ in range(world)]
    dist.all_gather(all_mem, peak_mem)
    dist.destroy_process_group()
    return {
        **vars(args), **n, "world_size": world, "step_seconds": round(step_s, 4),
        "tokens_per_s_per_gpu": round(tokens_per_s_gpu, 1),
        "mfu_6N": round(6 * n["params"] * tokens_per_s_gpu / peak, 4),
        "mfu_4N": round(4 * n["params"] * tokens_per_s_gpu / peak, 4),
        "peak_gpu_memory_gib_per_device": [round(float(m), 2) for m in all_mem],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(TEXT), default="13b")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--gpu", choices=sorted(PEAK_TFLOPS), default="h100")
    parser.add_argument("--peak-tflops", type=float, default=None, help="overrides --gpu")
    parser.add_argument("--batch-size", type=int, default=4, help="per GPU")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="recompute every k-th decoder layer only (LlavaTuner memory.checkpoint_every)")  # fmt: skip
    parser.add_argument("--lora-dropout-recompute", action="store_true",
                        help="LlavaTuner memory.lora_dropout_recompute: no dropped input copies kept")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="LlavaTuner memory.compile: regional torch.compile of every layer")  # fmt: skip
    parser.add_argument("--loss", choices=["supervised", "hf"], default="supervised",
                        help="logits at supervised positions only (LlavaTuner) or Hugging "
                        "Face's loss over every position (the figures measured before it)")  # fmt: skip
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: gloo and CPU tensors, a smoke test of this script (--size tiny)")  # fmt: skip
    parser.add_argument("--port", type=int, default=29511, help="rendezvous port (plain python)")
    parser.add_argument("--dry-run", action="store_true", help="shapes and counts only (CPU)")
    args = parser.parse_args(argv)
    if args.seq_len <= 600:
        parser.error("--seq-len must exceed the 576 image tokens plus a prompt (> 600)")
    if args.dry_run:
        model = build(args.size, args.mode, args.lora_r, "meta")
        n = counts(model)
        tokens = args.batch_size * args.seq_len
        peak = PEAK_TFLOPS[args.gpu] if args.peak_tflops is None else args.peak_tflops
        result = {
            **vars(args), **n, **flops_per_token(n["params"]),
            "tokens_per_step_per_gpu": tokens,
            "tflop_per_step_per_gpu_6N": round(6 * n["params"] * tokens / 1e12, 1),
            "peak_tflops": peak,
            "tokens_per_s_per_gpu_at_mfu_0.4": round(0.4 * peak * 1e12 / (6 * n["params"]), 1),
            "bf16_weights_gib": round(2 * n["params"] / 2**30, 2),
        }  # fmt: skip
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("needs CUDA GPUs (use --dry-run, or --device cpu --size tiny, on a CPU)")
        result = run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
