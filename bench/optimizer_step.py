"""The optimizer update of one ZeRO-3 sub-group on one GPU: a flat fp32 parameter of
`--numel` elements (the ds config's `sub_group_size`) with its fp32 gradient, as DeepSpeed's
stage 3 hands it to the optimizer, one `step()` at a time.

    python bench/optimizer_step.py --numel 100000000 --out optimizer_step.json

Variants: torch's foreach AdamW (`"torch_adam": true`, the config before issue 19), torch's fused
AdamW (`"torch_adam": true, "fused": true`), DeepSpeed's FusedAdam (JIT-built on first use; set
TORCH_CUDA_ARCH_LIST to an arch its build accepts, e.g. 9.0 on Hopper: the image's 9.0a fails).
Floor: 28 bytes per element (read parameter, gradient, two moments; write parameter and moments).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

BYTES_PER_ELEMENT = 28
ADAM = {"lr": 1e-5, "betas": (0.0, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def optimizers(param):
    yield "torch_foreach_adamw", lambda: torch.optim.AdamW([param], foreach=True, **ADAM)
    yield "torch_fused_adamw", lambda: torch.optim.AdamW([param], fused=True, **ADAM)

    def deepspeed_fused():
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam([param], adam_w_mode=True, **ADAM)
    yield "deepspeed_fusedadam", deepspeed_fused


def median_ms(step, repeats: int = 20) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--out", default="optimizer_step.json")
    args = parser.parse_args()
    param = torch.nn.Parameter(torch.randn(args.numel, device="cuda") * 0.02)
    param.grad = torch.randn_like(param) * 1e-3
    rows = {"device": torch.cuda.get_device_name(), "numel": args.numel}
    for name, build in optimizers(param):
        try:
            opt = build()
            ms = median_ms(opt.step)
            rows[name] = {"ms": ms, "GBps_at_floor_bytes": BYTES_PER_ELEMENT * args.numel / ms / 1e6}
            del opt
        except Exception as err:  # noqa: BLE001 - a variant that does not build is a result too
            rows[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        print(json.dumps({name: rows[name]}), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
