"""Run by tests/test_update.py on 2 CPU ranks: the trainer's update path without host reads.

Checks (results written per rank as JSON):
- a non-finite loss on rank 1 only (with finite gradients) skips the update on both ranks (flag false everywhere, fp32
  master weights and optimizer state untouched), and the next finite update lands exactly where a
  fresh engine's first update does (nothing of the skipped step is left behind);
- torch's fused AdamW (ds_configs/zero3_cpu.json) gives today's update (the foreach AdamW that
  `torch_adam` alone selects) within fp32 rounding over three steps;
- the exit index drawn on every rank agrees without a collective, and `share_exit_rng` realigns a
  generator that only rank 0 advanced (checkpoints from before this change).
"""
import argparse
import copy
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param

from distill import dmd
from distill.batch import Batch
from distill.config import load_config
from distill.engines import build_trained_engine, engine_configs
from distill.models import variant_config
from distill.train import share_exit_rng, update

parser = argparse.ArgumentParser()
parser.add_argument("--out")
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
cfg = load_config("distill/configs/tiny.yaml", [])
shapes = variant_config(cfg.model.variant, cfg.model.num_layers)
fused_config = json.loads(Path("ds_configs/zero3_cpu.json").read_text())
result = {"rank": rank}


def engine_with(ds_config):
    return build_trained_engine(cfg, engine_configs(ds_config, cfg)["generator"], cfg.generator_optim)


def batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed * 10 + rank)
    video = torch.randn(1, shapes.video.in_dim, 3, 4, 4, generator=g)
    text = lambda: torch.randn(1, 5, shapes.video.text_dim, generator=g)
    return Batch(video=video, audio=torch.randn(1, 8, shapes.audio.in_dim, generator=g), text=text(),
                 neg_text_video=text(), neg_text_audio=text(), image_latent=video[:, :, :1])


def loss_of(engine, seed: int) -> torch.Tensor:
    return dmd.flow_loss(engine, batch(seed), cfg.dmd, torch.Generator().manual_seed(seed))[0]


def master(engine) -> list[torch.Tensor]:
    return [safe_get_local_fp32_param(p).detach().clone() for p in engine.module.parameters()]


def optimizer_state(engine) -> list[torch.Tensor]:
    return [t.detach().clone() for s in engine.optimizer.optimizer.state.values() for t in s.values()
            if torch.is_tensor(t)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


# -- NaN on one rank: skipped everywhere, nothing left behind -------------------------------------
engine = engine_with(fused_config)
weights, state = master(engine), optimizer_state(engine)
loss = loss_of(engine, 1)
if rank == 1:  # the hard case: a non-finite term whose gradient is finite (an update would go through)
    loss = loss + float("nan")
result["nan_flag"] = bool(update(engine, loss))
result["nan_weights_change"] = max_diff(master(engine), weights)
result["nan_state_change"] = max_diff(optimizer_state(engine), state) if state else 0.0
result["nan_state_entries"] = len(state)
result["finite_flag"] = bool(update(engine, loss_of(engine, 2)))
after_skip = master(engine)
result["finite_weights_change"] = max_diff(after_skip, weights)
del engine

fresh = engine_with(fused_config)
assert bool(update(fresh, loss_of(fresh, 2)))
result["skip_then_update_vs_fresh_update"] = max_diff(after_skip, master(fresh))
del fresh

# -- fused AdamW against today's foreach AdamW -----------------------------------------------------
today_config = copy.deepcopy(fused_config)
today_config["optimizer"]["params"].pop("fused")
engines = {"fused": engine_with(fused_config), "today": engine_with(today_config)}
result["fused_flag_reached_torch"] = engines["fused"].optimizer.optimizer.defaults.get("fused")
result["today_fused"] = engines["today"].optimizer.optimizer.defaults.get("fused")
start = master(engines["today"])
for seed in (3, 4, 5):
    for e in engines.values():
        assert bool(update(e, loss_of(e, seed)))
fused_w, today_w = master(engines["fused"]), master(engines["today"])
result["fused_vs_today"] = max_diff(fused_w, today_w)
result["update_size"] = max_diff(today_w, start)
result["weight_scale"] = max(w.abs().max().item() for w in today_w)
del engines

# -- exit index: same draws on every rank, realigned after a rank-0-only history ------------------
same_seed = torch.Generator().manual_seed(7)
draws = [dmd.draw_exit_index(same_seed, 4) for _ in range(20)]
every = [None] * dist.get_world_size()
dist.all_gather_object(every, draws)
result["exit_draws_agree"] = all(d == every[0] for d in every)
old_style = torch.Generator().manual_seed(7)
if rank == 0:
    for _ in range(5):
        dmd.draw_exit_index(old_style, 4)
share_exit_rng(old_style)
after = [dmd.draw_exit_index(old_style, 4) for _ in range(20)]
dist.all_gather_object(every, after)
result["exit_draws_agree_after_share"] = all(d == every[0] for d in every)

(Path(args.out) / f"result.rank{rank}.json").write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
