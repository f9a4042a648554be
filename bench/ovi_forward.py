"""OviFusion speed on one GPU (random weights, bf16): one fused block pair at Ovi width, forward
and forward+backward, at 720² (15,004 video tokens) and 704×1280 (27,280) + 157 audio tokens;
the full 30+30-block forward; peak memory; and, in the same run, a plain DiT block (LayerNorm,
fused QKV, attention, GELU MLP: the block of the three-engine probe) at the same token counts.

    python bench/ovi_forward.py --out results.json      # GPU; prints a markdown table

TFLOP/s use model FLOPs (spec/perf_eval.md §3.2): forward F, forward+backward 3F.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.models import OviFusion, variant_config
from distill.models import layers
from distill.models.ovi_fusion import fused_block

GRIDS = {"720x720": (31, 44, 44), "704x1280": (31, 44, 80)}  # video latent F, H, W (tokens F·H/2·W/2)
AUDIO_TOKENS, TEXT_TOKENS = 157, 512


def cuda_time(fn, warmup=2, iters=5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def fused_block_flops(n_v: int, n_a: int, d=3072, d_ff=14336, l_t=TEXT_TOKENS) -> float:
    def branch(n_x, n_o):
        linear = 2 * n_x * (4 * d * d + 2 * d * d + 2 * d * d_ff) + 2 * 2 * d * d * (l_t + n_o)
        return linear + 4 * d * n_x * (n_x + l_t + n_o)
    return branch(n_v, n_a) + branch(n_a, n_v)


def random_model(num_layers: int) -> OviFusion:
    cfg = variant_config("960x960_5s")
    cfg = type(cfg)(*(type(c)(**{**c.__dict__, "num_layers": num_layers}) for c in (cfg.video, cfg.audio)))
    with torch.device("meta"):
        model = OviFusion(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def inputs(grid, batch=1):
    f, h, w = grid
    g = torch.Generator(device="cuda").manual_seed(0)
    video = torch.randn(batch, 48, f, h, w, device="cuda", generator=g, dtype=torch.bfloat16)
    audio = torch.randn(batch, AUDIO_TOKENS, 20, device="cuda", generator=g, dtype=torch.bfloat16)
    text = torch.randn(batch, TEXT_TOKENS, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    return video, audio, torch.full((batch,), 700.0, device="cuda"), text


def bench_fused_block(model: OviFusion, grid) -> dict:
    video, audio, t, text = inputs(grid)
    with torch.no_grad():
        v = model.video_model.prepare(video, t, text, first_frame_clean=True)
        a = model.audio_model.prepare(audio, t, text, False)
    vb, ab = model.video_model.blocks[0], model.audio_model.blocks[0]
    n_v, n_a = v.x.shape[1], a.x.shape[1]
    flops = fused_block_flops(n_v, n_a)

    def forward():
        with torch.no_grad():
            fused_block(vb, ab, v, a, v.x, a.x)

    vx, ax = v.x.detach().requires_grad_(), a.x.detach().requires_grad_()

    def forward_backward():
        ov, oa = fused_block(vb, ab, v, a, vx, ax)
        torch.autograd.backward((ov, oa), (torch.ones_like(ov), torch.ones_like(oa)))

    torch.cuda.reset_peak_memory_stats()
    fwd = cuda_time(forward)
    fwd_bwd = cuda_time(forward_backward)
    return {"video_tokens": n_v, "audio_tokens": n_a, "fwd_ms": fwd * 1e3, "fwd_tflops": flops / fwd / 1e12,
            "fwd_bwd_ms": fwd_bwd * 1e3, "fwd_bwd_tflops": 3 * flops / fwd_bwd / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


class PlainBlock(nn.Module):
    """The reference DiT block: pre-LN self-attention with fused QKV and a GELU MLP, no modulation."""

    def __init__(self, d=3072, d_ff=14336, heads=24):
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
        q, k, v = self.qkv(F.layer_norm(x, x.shape[-1:])).unflatten(-1, (3, self.heads, -1)).unbind(2)
        x = x + self.o(layers.attention(q, k, v).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(F.layer_norm(x, x.shape[-1:])), approximate="tanh"))


def fused_block_output(model: OviFusion, grid) -> torch.Tensor:
    video, audio, t, text = inputs(grid)
    with torch.no_grad():
        v = model.video_model.prepare(video, t, text, first_frame_clean=True)
        a = model.audio_model.prepare(audio, t, text, False)
        return fused_block(model.video_model.blocks[0], model.audio_model.blocks[0], v, a, v.x, a.x)[0].float()


def profile_fused_block(model: OviFusion, grid, rows: int = 25) -> str:
    """Top CUDA kernels of one fused forward+backward (where the time beyond the GEMMs goes)."""
    from torch.profiler import ProfilerActivity, profile
    video, audio, t, text = inputs(grid)
    with torch.no_grad():
        v = model.video_model.prepare(video, t, text, first_frame_clean=True)
        a = model.audio_model.prepare(audio, t, text, False)
    vx, ax = v.x.detach().requires_grad_(), a.x.detach().requires_grad_()

    def step():
        ov, oa = fused_block(model.video_model.blocks[0], model.audio_model.blocks[0], v, a, vx, ax)
        torch.autograd.backward((ov, oa), (torch.ones_like(ov), torch.ones_like(oa)))

    step(); step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def bench_plain_block(n: int) -> dict:
    block = PlainBlock().cuda().to(torch.bfloat16)
    params = sum(p.numel() for p in block.parameters())
    flops = 2 * params * n + 4 * 3072 * n * n
    x = torch.randn(1, n, 3072, device="cuda", dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            block(x)

    def forward_backward():
        block(xg).backward(torch.ones_like(xg))

    fwd, fwd_bwd = cuda_time(forward), cuda_time(forward_backward)
    return {"tokens": n, "fwd_ms": fwd * 1e3, "fwd_tflops": flops / fwd / 1e12,
            "fwd_bwd_ms": fwd_bwd * 1e3, "fwd_bwd_tflops": 3 * flops / fwd_bwd / 1e12}


def bench_full_forward(grids) -> dict:
    torch.cuda.reset_peak_memory_stats()
    model = random_model(30)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    out = {"weights_gib": weights_gib}
    for name, grid in grids.items():
        video, audio, t, text = inputs(grid)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            seconds = cuda_time(lambda: model(video, audio, t, text, text, first_frame_clean=True), warmup=1, iters=3)
        out[name] = {"seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "tflops": 30 * fused_block_flops(video[0, 0].numel() // 4, AUDIO_TOKENS) / seconds / 1e12}
    del model
    torch.cuda.empty_cache()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ovi_forward.json")
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one compiled fwd+bwd")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    torch.backends.cuda.matmul.allow_tf32 = True
    grids = {name: GRIDS[name] for name in args.grids}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    model = random_model(1)
    first = next(iter(grids.values()))
    eager_out = fused_block_output(model, first)
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            layers.compile_elementwise_ops()
            diff = (fused_block_output(model, first) - eager_out).abs().max().item()
            results["compiled_vs_eager_max_abs"] = diff
            print(f"compiled vs eager fused block output: max |diff| {diff:.3e} (output max {eager_out.abs().max().item():.2f})")
        for name, grid in grids.items():
            t0 = time.time()
            row = {"mode": mode, "grid": name, **bench_fused_block(model, grid)}
            row["plain"] = bench_plain_block(row["video_tokens"])
            row["ratio_fwd_bwd"] = row["fwd_bwd_tflops"] / row["plain"]["fwd_bwd_tflops"]
            row["wall_s"] = time.time() - t0
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.profile:
        results["profile"] = profile_fused_block(model, first)
        print(results["profile"])
    del model
    torch.cuda.empty_cache()
    if not args.skip_full:
        results["full_forward"] = bench_full_forward(grids)
        print(json.dumps(results["full_forward"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))


def table(results) -> str:
    lines = ["| mode | grid | video tok | fused fwd ms (TFLOP/s) | fused fwd+bwd ms (TFLOP/s) | plain fwd ms (TFLOP/s) | plain fwd+bwd ms (TFLOP/s) | fwd+bwd vs plain |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        p = r["plain"]
        lines.append(f"| {r['mode']} | {r['grid']} | {r['video_tokens']} | {r['fwd_ms']:.1f} ({r['fwd_tflops']:.0f}) | "
                     f"{r['fwd_bwd_ms']:.1f} ({r['fwd_bwd_tflops']:.0f}) | {p['fwd_ms']:.1f} ({p['fwd_tflops']:.0f}) | "
                     f"{p['fwd_bwd_ms']:.1f} ({p['fwd_bwd_tflops']:.0f}) | {100 * r['ratio_fwd_bwd']:.0f}% |")
    full = results.get("full_forward")
    if full:
        lines.append("")
        lines.append(f"Full 30+30-block forward (bf16 weights {full['weights_gib']:.1f} GiB):")
        for name, r in full.items():
            if isinstance(r, dict):
                lines.append(f"- {name}: {r['seconds']:.3f} s, {r['tflops']:.0f} TFLOP/s, peak {r['peak_gib']:.1f} GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
