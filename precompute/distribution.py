"""The ranks of a launched job (deepspeed, torchrun) or one process alone: who am I, gather, barrier.
Kept apart from the encoders so a job that only needs its ranks (distill/pairs.py) imports no
media or text stack."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

# Ranks wait at the end for the slowest one; a crashed rank is killed by the launcher, so a long
# timeout never hides a hang.
DIST_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def gather(self, obj: Any) -> list[Any]:
        if not dist_initialized():
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if dist_initialized():
            torch.distributed.barrier()


def dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(use_cuda: bool) -> Dist:
    """torch.distributed only when a launcher set RANK/WORLD_SIZE (deepspeed, torchrun)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    import deepspeed  # only launched runs pay for the import

    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", timeout=DIST_TIMEOUT, verbose=False)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)
