"""GPU-hours of a DMD run of the full Ovi (30 fused layers, 11.66B parameters per model) at 720x720,
one sample per GPU, projected from the one-GPU measurements in bench/results/ (3 layers, H100).

    python bench/dmd_cost.py [--steps 3000] [--gpus 8 16 64]

A trainer step is one critic update plus a generator update every `dmd.critic_ratio` steps (the
recipe's, distill/configs/ovi_720_5s.yaml); the exit index is uniform over 4 student steps (1.5
extra no-grad student forwards on average).

Measured (one H100, world size 1, 3 fused layers: the most one 80 GB card holds): the plain blocks'
forward and checkpointed forward+backward (`--reference`), the DMD steps and their optimizer steps
and EMA (`--breakdown`; the first of two runs, the second was 8-18% slower), the peak memory.
Projected: depth (block compute scales with layers; DeepSpeed's remaining overhead either stays
per step, 'low', or grows with the hooked modules per forward, 35 + 10 per layer, 'high'), the optimizer (scales with parameters per GPU), and communication, which was not
measured on H100 (multi-GPU machines were not lent): ZeRO-3 moves about 6.2 bf16 model copies per
trainer step per GPU; 'low' assumes it is hidden behind compute, 'high' adds it at 350 GB/s inside
a node (8 GPUs) and 50 GB/s per GPU across nodes (16, 64 GPUs).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = Path(__file__).resolve().parents[1] / "distill" / "configs" / "ovi_720_5s.yaml"
FULL_PARAMS, FULL_LAYERS = 11.66e9, 30
BYTES_PER_PARAM = 38  # generator and fake score 16 each (bf16 param + grad, fp32 master + 2 moments), teacher 2, EMA 4
MEAN_EXTRA_FORWARDS = 1.5  # exit index ~ U{0..3}
CRITIC_RATIO = yaml.safe_load(RECIPE.read_text())["dmd"]["critic_ratio"]
# ZeRO-3 traffic per trainer step in bf16 model copies: critic step 2.5 student forwards + the fake
# score's forward, backward re-gather and gradient reduce-scatter (5.5); generator step 1.5 + the
# student's forward, re-gather and reduce-scatter + fake score + stacked teacher (6.5), every
# CRITIC_RATIO-th step
MODEL_COPIES_MOVED = 5.5 + 6.5 / CRITIC_RATIO
GiB = 2**30


def hooked_modules(layers: int) -> int:
    """DeepSpeed-hooked module calls per forward of the trained engines (counted on CPU: 35 outside
    the blocks, 10 per fused block pair)."""
    return 35 + 10 * layers


def measured(results: Path = RESULTS) -> dict:
    run = json.loads((results / "dmd_step_1xh100_s20_L3.json").read_text())
    row = next(r for r in run["rows"] if r["grid"] == "720x720" and r["batch_per_gpu"] == 1)
    ref = {(r["plain_reference"], r["batch_per_gpu"]): r
           for r in map(json.loads, (results / "dmd_step_1xh100_s20_reference.jsonl").read_text().splitlines())}
    b1, b2 = ref["720x720", 1], ref["720x720", 2]
    phases = row["breakdown_s"]
    return {"layers": run["layers"], "params": run["params_per_model"], "device": run["device"],
            "forward": b1["forward_s"], "forward_backward": b1["forward_backward_ckpt_s"], "forward_2b": b2["forward_s"],
            "generator_s": row["generator_s"], "critic_s": row["critic_s"], "peak_gib": row["peak_gib"],
            "g_opt": phases["G optimizer step"], "f_opt": phases["F optimizer step"], "ema": phases["EMA update"],
            "g_fwd_no_grad": phases["G fwd (no grad)"]}


def plain_step_s(m: dict, scale: float, extra: float) -> tuple[float, float]:
    """Plain compute of (generator step, critic step) with `extra` no-grad student forwards."""
    f, fb, f2 = m["forward"] * scale, m["forward_backward"] * scale, m["forward_2b"] * scale
    return extra * f + fb + f + f2, (1 + extra) * f + fb


def project(m: dict, gpus: int, steps: int, high: bool) -> dict:
    scale = FULL_LAYERS / m["layers"]
    gen_plain0, critic_plain0 = plain_step_s(m, 1.0, 0)
    # DeepSpeed's overhead at the measured depth, less the optimizer and EMA (projected apart)
    gen_over = m["generator_s"] - gen_plain0 - m["g_opt"] - m["ema"]
    critic_over = m["critic_s"] - critic_plain0 - m["f_opt"]
    extra_over = MEAN_EXTRA_FORWARDS * (m["g_fwd_no_grad"] - m["forward"])
    growth = hooked_modules(FULL_LAYERS) / hooked_modules(m["layers"]) if high else 1.0
    gen_plain, critic_plain = plain_step_s(m, scale, MEAN_EXTRA_FORWARDS)
    per_gpu = FULL_PARAMS / gpus / m["params"]
    gen = gen_plain + (gen_over + extra_over) * growth + (m["g_opt"] + m["ema"]) * per_gpu
    critic = critic_plain + (critic_over + extra_over) * growth + m["f_opt"] * per_gpu
    comm = 0.0
    if high:
        bandwidth = 350e9 if gpus <= 8 else 50e9
        comm = MODEL_COPIES_MOVED * 2 * FULL_PARAMS * (gpus - 1) / gpus / bandwidth
    step = critic + gen / CRITIC_RATIO + comm
    hours = steps * step / 3600
    states = BYTES_PER_PARAM * FULL_PARAMS / gpus / GiB
    working = m["peak_gib"] - BYTES_PER_PARAM * m["params"] / GiB
    return {"gpus": gpus, "step_s": step, "wall_h": hours, "gpu_hours": hours * gpus, "plain_step_s": critic_plain + gen_plain / CRITIC_RATIO,
            "memory_gib": states + working + 0.09 * (FULL_LAYERS - m["layers"]) + (2.0 if gpus > 1 else 0.0)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64])
    args = parser.parse_args()
    m = measured()
    print(f"measured on {m['device']}, {m['layers']} layers, world size 1; projected to {FULL_LAYERS} layers; "
          f"a generator update every {CRITIC_RATIO} trainer steps\n")
    print("| GPUs | memory per GPU GiB (projected) | trainer step s (low – high) | wall-clock h | GPU-hours (low – high) |")
    print("|---:|---:|---:|---:|---:|")
    for gpus in args.gpus:
        low, high = project(m, gpus, args.steps, False), project(m, gpus, args.steps, True)
        print(f"| {gpus} | {low['memory_gib']:.0f} | {low['step_s']:.2f} – {high['step_s']:.2f} "
              f"| {low['wall_h']:.1f} – {high['wall_h']:.1f} | {low['gpu_hours']:.0f} – {high['gpu_hours']:.0f} |")
    print(f"\nplain compute alone (the same blocks without DeepSpeed): {low['plain_step_s']:.2f} s per trainer step")


if __name__ == "__main__":
    main()
