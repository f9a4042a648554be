"""DMD step speed and memory with the real trainer pieces: three DeepSpeed ZeRO-3 engines built
by distill/engines.py (full Ovi width, `--layers` fused blocks per tower, random weights, bf16),
generator and critic steps from distill/dmd.py on synthetic latents at 720² (15,004 video tokens)
and 704×1280 (27,280) + 157 audio tokens, batch 1 per GPU.

    torchrun --nproc_per_node 2 bench/dmd_step.py --layers 6 --out dmd_step.json
    torchrun --nproc_per_node 2 bench/dmd_step.py --smoke      # CPU, tiny width: checks the script

Exit index 0 makes the step's passes match the three-engine probe's (generator: 3 no-grad
forwards + one checkpointed fwd+bwd = 7 forward-equivalents; critic: 1 + 4 = 5), so achieved
TFLOP/s (hardware FLOPs incl. recompute, per GPU) compare directly. The mean over the random
exit index (1.5 extra no-grad student forwards) is reported too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed
import torch
import torch.distributed as dist

from distill import dmd
from distill.batch import Batch
from distill.config import load_config
from distill.engines import build_engines

GRIDS = {"720x720": (31, 44, 44), "704x1280": (31, 44, 80)}
AUDIO, TEXT = 157, 512


def fused_block_flops(n_v, n_a, d=3072, d_ff=14336, l_t=TEXT):
    def branch(n_x, n_o):
        return 2 * n_x * (6 * d * d + 2 * d * d_ff) + 4 * d * d * (l_t + n_o) + 4 * d * n_x * (n_x + l_t + n_o)
    return branch(n_v, n_a) + branch(n_a, n_v)


def synthetic_batch(grid, text_len, text_dim, device, dtype) -> Batch:
    f, h, w = grid
    g = torch.Generator(device=device).manual_seed(dist.get_rank())
    video = torch.randn(1, 48, f, h, w, generator=g, device=device, dtype=dtype)
    text = lambda: torch.randn(1, text_len, text_dim, generator=g, device=device, dtype=dtype)
    return Batch(video=video, audio=torch.randn(1, AUDIO, 20, generator=g, device=device, dtype=dtype),
                 text=text(), neg_text_video=text(), neg_text_audio=text(), image_latent=video[:, :, :1])


def timed(fn, iters):
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="dmd_step.json")
    parser.add_argument("--smoke", action="store_true", help="tiny width on CPU, to check the script")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    variant = "tiny" if args.smoke else "960x960_5s"
    grids = {"smoke": (3, 4, 4)} if args.smoke else {k: GRIDS[k] for k in args.grids}
    cfg = load_config(None, [f"model.variant={variant}", "model.random_init=true", f"model.num_layers={args.layers}",
                             "ema.enabled=true", "dmd.slg_block=1", "log.wandb_mode=disabled"])
    ds_config = json.loads((Path(__file__).resolve().parents[1] / "ds_configs/zero3.json").read_text())
    engines = build_engines(cfg, ds_config)
    params = sum(p.ds_numel for p in engines.generator.module.parameters())
    text_len, text_dim = engines.generator.module.cfg.video.text_len, engines.generator.module.cfg.video.text_dim
    rng = torch.Generator(device=device).manual_seed(rank)
    results = {"world": world, "layers": args.layers, "params_per_model": params,
               "device": torch.cuda.get_device_name() if cuda else "cpu", "rows": []}
    for name, grid in grids.items():
        batch = synthetic_batch(grid, text_len, text_dim, device, torch.bfloat16)
        n_v, n_a = grid[0] * grid[1] * grid[2] // 4, AUDIO
        forward = args.layers * fused_block_flops(n_v, n_a) if not args.smoke else 1.0

        def generator_step(exit_index):
            loss, _ = dmd.generator_loss(engines.generator, engines.fake_score, engines.teacher, batch, exit_index, cfg.dmd, rng)
            engines.generator.backward(loss)
            engines.generator.step()
            engines.ema.update(10**9)

        def critic_step(exit_index):
            loss, _ = dmd.critic_loss(engines.generator, engines.fake_score, batch, exit_index, cfg.dmd, rng)
            engines.fake_score.backward(loss)
            engines.fake_score.step()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for k in range(4):  # warm-up every exit index: compiled kernels, trace caches, allocator
            generator_step(k)
            critic_step(k)
        gen = timed(lambda: generator_step(0), args.iters)
        critic = timed(lambda: critic_step(0), args.iters)
        gen_mean = sum(timed(lambda: generator_step(k), 1) for k in range(4)) / 4     # exit index ~ U{0..3}
        critic_mean = sum(timed(lambda: critic_step(k), 1) for k in range(4)) / 4
        row = {"grid": name, "video_tokens": n_v, "generator_s": gen, "critic_s": critic,
               "generator_tflops_per_gpu": 7 * forward / gen / 1e12, "critic_tflops_per_gpu": 5 * forward / critic / 1e12,
               "generator_s_random_exit": gen_mean, "critic_s_random_exit": critic_mean,
               "cycle_s": gen_mean + 5 * critic_mean,  # 1 generator + 5 critic updates
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}
        results["rows"].append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
