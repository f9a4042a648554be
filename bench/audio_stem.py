"""The audio tower's stem (kernel-7 Conv1d in_dim -> dim, SiLU, gated ConvMLP dim -> 8192 -> dim),
forward + backward, through the model's modules (one matmul over unfolded windows) against the same
weights through torch's Conv1d (cuDNN on the GPU, with the channel-first transposes Ovi's
channel-last tokens need), in one run:

    python bench/audio_stem.py --variant 720x720_5s --batch 1 --out audio_stem.json

Both paths share one set of parameters and one input; the output records their median times, the
ratio, and the largest difference of their outputs and input gradients (rounding alone).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a script: the repo root, not bench/ (bench/precompute.py), first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from distill.models import variant_config
from distill.models.layers import audio_stem
from precompute.variants import get_variant


def through_torch_conv1d(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The same stem with the same weights through F.conv1d on [B, C, L]."""
    first, _, mlp = model
    h = F.silu(F.conv1d(x.transpose(1, 2), first.weight, first.bias, padding=3))
    gated = F.silu(F.conv1d(h, mlp.w1.weight, padding=3)) * F.conv1d(h, mlp.w3.weight, padding=3)
    return F.conv1d(gated, mlp.w2.weight, padding=3).transpose(1, 2)


def median_ms(step, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(variant: str, batch: int, device: torch.device, dtype: torch.dtype, repeats: int,
            dim: int | None = None) -> dict:
    tower = variant_config(variant).audio
    dim = dim or tower.dim
    tokens = get_variant(variant).audio_latents
    torch.manual_seed(0)
    model = audio_stem(tower.in_dim, dim).to(device=device, dtype=dtype)
    x = torch.randn(batch, tokens, tower.in_dim, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, tokens, dim, device=device, dtype=dtype)

    def step(forward):
        def run():
            model.zero_grad(set_to_none=True)
            x.grad = None
            out = forward(x)
            out.backward(grad_out)
            return out
        return run

    ours, reference = step(model), step(lambda inp: through_torch_conv1d(model, inp))
    out_ours, grad_ours = ours().detach(), x.grad.clone()
    out_ref, grad_ref = reference().detach(), x.grad.clone()
    scale = lambda t: t.float().abs().max().item()
    row = {"variant": variant, "batch": batch, "tokens": tokens, "dim": dim, "dtype": str(dtype).removeprefix("torch."),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "unfolded_matmul_ms": median_ms(ours, device, repeats),
           "torch_conv1d_ms": median_ms(reference, device, repeats),
           "max_abs_diff_out_rel": (out_ours - out_ref).float().abs().max().item() / scale(out_ref),
           "max_abs_diff_input_grad_rel": (grad_ours - grad_ref).float().abs().max().item() / scale(grad_ref)}
    row["speedup"] = row["torch_conv1d_ms"] / row["unfolded_matmul_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="720x720_5s")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dim", type=int, default=None, help="a narrower stem (CPU tests); default: the variant's")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--out", default="audio_stem.json")
    args = parser.parse_args(argv)
    rows = [measure(args.variant, b, torch.device(args.device), getattr(torch, args.dtype), args.repeats, args.dim)
            for b in args.batch]
    for row in rows:
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
