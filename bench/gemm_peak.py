"""What bf16 matrix products reach on this GPU, at the shapes of LLaVA-1.5-13B's linear layers.

MFU divides by the data-sheet peak (989 TFLOP/s dense bf16 for an H100 SXM), which no kernel
reaches; this measures what cuBLAS does reach for the decoder's GEMMs at the tuner's token count
(batch 3 × 2,048 tokens): forward (x·Wᵀ) and the two backward products (dX, dW) of the q/k/v/o
(5120 → 5120), gate/up (5120 → 13824) and down (13824 → 5120) projections. The sweep runs it
first, so the MFU figures can be read against what the card can do.

    python bench/gemm_peak.py --gpu h100
    python bench/gemm_peak.py --device cpu --tokens 64 --hidden 64 --intermediate 128 --iters 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0}  # dense bf16, SXM (as tuner_mfu)


def _time(a: torch.Tensor, b: torch.Tensor, iters: int, device: torch.device) -> float:
    """Seconds per ``a @ b``."""
    torch.matmul(a, b)  # warm-up (cuBLAS heuristics, allocations)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def measure(tokens: int, hidden: int, intermediate: int, iters: int, device: torch.device) -> dict:
    """TFLOP/s per layer shape and pass, and the FLOP-weighted mean over one decoder layer."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {"attn": (hidden, hidden, 4), "gate_up": (hidden, intermediate, 2),
              "down": (intermediate, hidden, 1)}  # (in, out, how many per layer)  # fmt: skip
    results, flops_total, seconds_total = {}, 0.0, 0.0
    for name, (d_in, d_out, count) in shapes.items():
        x = torch.randn(tokens, d_in, device=device, dtype=dtype)
        w = torch.randn(d_out, d_in, device=device, dtype=dtype)
        g = torch.randn(tokens, d_out, device=device, dtype=dtype)
        flops = 2.0 * tokens * d_in * d_out
        for kind, (a, b) in {"fwd": (x, w.t()), "dx": (g, w), "dw": (g.t(), x)}.items():
            sec = _time(a, b, iters, device)
            results[f"{name}_{kind}"] = float(f"{flops / sec / 1e12:.4g}")
            flops_total += count * flops
            seconds_total += count * sec
    results["layer_mean"] = float(f"{flops_total / seconds_total / 1e12:.4g}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", choices=sorted(PEAK_TFLOPS), default="h100")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=3 * 2048)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--intermediate", type=int, default=13824)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tflops = measure(args.tokens, args.hidden, args.intermediate, args.iters, device)
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **vars(args),
        "tflops": tflops,
        "layer_mean_of_peak": round(tflops["layer_mean"] / PEAK_TFLOPS[args.gpu], 3),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
