"""Run by tests/test_zero3_fetch.py on 1 CPU rank (ZeRO-3's single-rank fetch path): the trainer's
engines fetch through distill/zero3_fetch.py's wait, and that wait gives exactly DeepSpeed's own
gradients and update. Writes result.json."""
import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero import partition_parameters as pp
from deepspeed.utils import safe_get_full_grad, safe_get_local_fp32_param

from distill import dmd, zero3_fetch
from distill.batch import Batch
from distill.config import load_config
from distill.engines import build_engines
from distill.models import variant_config

parser = argparse.ArgumentParser()
parser.add_argument("--out")
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config("distill/configs/tiny.yaml", ["objective=flow", "ema.enabled=false"])
ds_config = json.loads(Path("ds_configs/zero3_cpu.json").read_text())
shapes = variant_config(cfg.model.variant, cfg.model.num_layers)
g = torch.Generator().manual_seed(0)
video = torch.randn(1, shapes.video.in_dim, 3, 4, 4, generator=g)
text = torch.randn(1, 5, shapes.video.text_dim, generator=g)
batch = Batch(video=video, audio=torch.randn(1, 8, shapes.audio.in_dim, generator=g), text=text,
              neg_text_video=text, neg_text_audio=text, image_latent=video[:, :, :1])

fast_fetches = []
mark_available = zero3_fetch._mark_available
zero3_fetch._mark_available = lambda handle: (fast_fetches.append(1), mark_available(handle))[1]


def one_update(deepspeeds_wait: bool) -> dict:
    """Build the trainer's engine (which installs the wait), take one flow update with that wait
    or with DeepSpeed's own; gradients and new fp32 weights by name."""
    engine = build_engines(cfg, ds_config).generator
    if deepspeeds_wait:
        zero3_fetch.restore_single_rank_fetch_sync()
    loss, _ = dmd.flow_loss(engine, batch, cfg.dmd, torch.Generator().manual_seed(1))
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    engine.step()
    weights = {n: safe_get_local_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "weights": weights}


result = {}
patched = one_update(deepspeeds_wait=False)
result["installed"] = pp.NoGatherHandle.wait is zero3_fetch._wait_without_host_sync
result["fetches_without_wait"] = len(fast_fetches)
own = one_update(deepspeeds_wait=True)
result["restored"] = pp.NoGatherHandle.wait is not zero3_fetch._wait_without_host_sync
result["loss_diff"] = abs(patched["loss"] - own["loss"])
result["grad_max_diff"] = max((patched["grads"][k] - own["grads"][k]).abs().max().item() for k in own["grads"])
result["weight_max_diff"] = max((patched["weights"][k] - own["weights"][k]).abs().max().item() for k in own["weights"])


class Partition:  # what the check reads of a parameter: where its partition lives
    def __init__(self, device):
        self.ds_tensor = torch.empty(1, device=device)


result["on_device"] = zero3_fetch.partitions_on_device([Partition("cpu")])
result["elsewhere"] = zero3_fetch.partitions_on_device([Partition("cpu"), Partition("meta")])
Path(args.out, "result.json").write_text(json.dumps(result))
dist.destroy_process_group()
