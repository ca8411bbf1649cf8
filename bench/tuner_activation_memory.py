"""Activation memory of one LLaVA-1.5 decoder layer under LoRA, per option, measured on CPU.

What a training step keeps for its backward does not depend on the device: this counts the
bytes of every tensor autograd saves (``saved_tensors_hooks``, each storage once, weights left
out) in one Llama decoder layer of the 7B or 13B shape with LoRA r 128 on every linear layer,
bf16 weights and adapters (as FSDP2's bf16 ``MixedPrecisionPolicy`` computes them), at one
sequence length, for each option side by side:

- ``peft``: peft's LoRA with dropout 0.05 (LLaVA-1.5's recipe), each adapter its own copy;
- ``recompute``: ``LlavaTuner``'s ``memory.lora_dropout_recompute`` (the same gradients);
- ``no-dropout``: dropout 0, the floor for the adapters' share;
- each again with ``memory.compile`` (regional ``torch.compile``; ``--no-compile`` skips).

Units are ``seq × hidden`` bf16 elements (the size of the layer's input). The per-sample
figure for the whole language model at ``--project-seq`` follows from it: layers that keep
their activations cost the measured units, checkpointed layers one unit (their input); logits
and the frozen vision tower (which saves nothing) are not included. ::

    python bench/tuner_activation_memory.py --size 13b          # ≈ 3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_publish, save  # noqa: E402
from tuner_mfu import TEXT  # noqa: E402  (the 7B / 13B shapes the MFU bench uses)

from biomedvital.tuning.lora_memory import recompute_lora_dropout  # noqa: E402
from biomedvital.tuning.module import LLAMA_LINEAR  # noqa: E402

OPTIONS = ("peft", "recompute", "no-dropout")


def saved_bytes(size: str, option: str, compiled: bool, seq: int, lora_r: int) -> int:
    """Bytes autograd keeps for the backward of one decoder layer on one sample."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = TEXT[size]
    config = LlamaConfig(vocab_size=256, **{**shape, "num_hidden_layers": 1})
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    dropout = 0.0 if option == "no-dropout" else 0.05
    model = get_peft_model(
        model,
        LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=dropout,
                   target_modules=LLAMA_LINEAR),
        autocast_adapter_dtype=False,
    )  # fmt: skip
    if option == "recompute":
        recompute_lora_dropout(model)
    model.train()
    llama = model.get_base_model().model
    layer = llama.layers[0]
    if compiled:
        torch._dynamo.reset()
        layer.compile()
    hidden = shape["hidden_size"]
    x = torch.randn(1, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    rotary = llama.rotary_emb(x, torch.arange(seq)[None])
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip.add(x.untyped_storage().data_ptr())
    for _ in range(2 if compiled else 1):  # the first compiled call compiles
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x, position_embeddings=rotary, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()  # the graph runs, so what was kept was usable
    return sum(n for ptr, n in seen.items() if ptr not in skip)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(TEXT), default="13b")
    parser.add_argument("--seq", type=int, default=512, help="measured sequence length")
    parser.add_argument("--project-seq", type=int, default=2048)
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true")
    add_publish(parser)
    args = parser.parse_args(argv)
    shape = TEXT[args.size]
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    unit = args.seq * hidden * 2
    rows = []
    for compiled in (False,) if args.no_compile else (False, True):
        for option in OPTIONS:
            t0 = time.perf_counter()
            units = saved_bytes(args.size, option, compiled, args.seq, args.lora_r) / unit
            per_layer_gib = units * args.project_seq * hidden * 2 / 2**30
            row = {
                "size": args.size, "option": option, "compile": compiled,
                "units_per_layer": round(units, 2),
                "gib_per_layer_per_sample": round(per_layer_gib, 3),
                "gib_per_sample_no_checkpointing": round(layers * per_layer_gib, 2),
            }  # fmt: skip
            one = args.project_seq * hidden * 2 / 2**30  # a checkpointed layer keeps its input
            for k in (1, 2):
                recomputed = len(range(0, layers, k))
                row[f"gib_per_sample_checkpoint_every_{k}"] = round(
                    recomputed * one + (layers - recomputed) * per_layer_gib, 2
                )
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["compile"]: r["units_per_layer"] for r in rows if r["option"] == "peft"}
    print(f"\n{args.size}, seq {args.seq} measured, per sample at {args.project_seq}:")
    print("option       compile  units/layer  ratio  GiB none  GiB every2  GiB every1")
    for r in rows:
        ratio = r["units_per_layer"] / base[False]
        print(
            f"{r['option']:<12} {r['compile']!s:<8} {r['units_per_layer']:>11.1f} {ratio:>6.2f}"
            f" {r['gib_per_sample_no_checkpointing']:>9.1f}"
            f" {r['gib_per_sample_checkpoint_every_2']:>11.1f}"
            f" {r['gib_per_sample_checkpoint_every_1']:>11.1f}"
        )
    for r in rows:
        r["ratio_vs_peft"] = round(r["units_per_layer"] / base[False], 3)
    result = {
        "size": args.size,
        "measured_seq": args.seq,
        "project_seq": args.project_seq,
        "lora_r": args.lora_r,
        "layers": layers,
        "unit": "seq x hidden bf16 elements per layer",
        # by path: the option, "+compile" when compiled
        "paths": {r["option"] + ("+compile" if r["compile"] else ""): r for r in rows},
    }
    path = save(f"tuner_activation_memory-{args.size}", result, publish=args.publish)
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
