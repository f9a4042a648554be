"""Run by tests/test_zero3_loading.py on 2 CPU ranks: strict official-checkpoint loading into a
ZeRO-3 partitioned OviFusion, and the partitioned engine's forward against a plain model."""
import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist

from distill.models import CheckpointError, OviFusion, load_ovi_checkpoint, load_ovi_checkpoint_zero3

parser = argparse.ArgumentParser()
parser.add_argument("--good")
parser.add_argument("--bad", nargs="+")
parser.add_argument("--out")
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
result = {"rank": rank}

with deepspeed.zero.Init(config_dict_or_path=config):
    model = OviFusion.from_variant("tiny", seed=123)  # random values, overwritten by the load
result["partitioned"] = all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters() if p.ds_numel > 8)
load_ovi_checkpoint_zero3(model, args.good)

with torch.device("meta"):
    reference = OviFusion(model.cfg)
load_ovi_checkpoint(reference, args.good)
max_diff = 0.0
for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
    with deepspeed.zero.GatheredParameters([p]):
        max_diff = max(max_diff, (p.data - q.data).abs().max().item())
result["max_param_diff"] = max_diff

engine, *_ = deepspeed.initialize(model=model, config=config)
engine.eval()
g = torch.Generator().manual_seed(0)
video, audio = torch.randn(1, 48, 3, 4, 4, generator=g), torch.randn(1, 12, 20, generator=g)
text = torch.randn(1, 8, model.cfg.video.text_dim, generator=g)
with torch.no_grad():
    ev, ea = engine(video, audio, torch.tensor([700.0]), text, text, first_frame_clean=True)
    rv, ra = reference.eval()(video, audio, torch.tensor([700.0]), text, text, first_frame_clean=True)
result["forward_diff"] = max((ev - rv).abs().max().item(), (ea - ra).abs().max().item())

result["bad"] = {}
for path in args.bad:
    with deepspeed.zero.Init(config_dict_or_path=config):
        other = OviFusion(model.cfg)
    try:
        load_ovi_checkpoint_zero3(other, path)
        result["bad"][path] = None
    except CheckpointError as err:
        result["bad"][path] = str(err)

with open(f"{args.out}.rank{rank}.json", "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
