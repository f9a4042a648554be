"""Training checkpoints that are either complete or ignored.

    OUT/checkpoints/step-000100/
        generator/state/...     DeepSpeed ZeRO-3 files (fp32 master + Adam moments per rank)
        fake_score/state/...
        ema/rank-00000.pt       this rank's fp32 EMA shards
        trainer/rank-00000.pt   this rank's RNG states and data position
        trainer.json            step counters and the config (rank 0)
        COMPLETE                written by rank 0 after every rank has finished
        KEEP                    (optional) the evaluator's best checkpoint: never pruned
    OUT/checkpoints/latest      "step-000100", replaced atomically after COMPLETE

DeepSpeed's own `latest` is written by rank 0 before the other ranks are known to be done
(spec/deepspeed.md §4.3), so it is disabled and this protocol is used instead.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from precompute.fileio import atomic_write

ENGINE_TAG = "state"
KEEP_FILE = "KEEP"  # distill/evaluate.py marks the best checkpoint with it: prune never deletes it


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / "checkpoints" / f"step-{step:06d}"


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])


def save(root: Path, step: int, engines, trainer_state: dict, rank_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the step directory."""
    rank = dist.get_rank()
    path = step_dir(root, step)
    for name in ("generator", "fake_score"):
        engine = getattr(engines, name)
        if engine is not None:
            engine.save_checkpoint(str(path / name), tag=ENGINE_TAG, save_latest=False)
    (path / "trainer").mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, path / "trainer" / f"rank-{rank:05d}.pt")
    if engines.ema is not None:
        (path / "ema").mkdir(parents=True, exist_ok=True)
        torch.save(engines.ema.state_dict(), path / "ema" / f"rank-{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        atomic_write(path / "trainer.json", json.dumps(trainer_state, indent=1))
        atomic_write(path / "COMPLETE", "")
        atomic_write(Path(root) / "checkpoints" / "latest", path.name)
        prune(root, keep)
    dist.barrier()
    return path


def complete_steps(root: Path) -> list[Path]:
    ckpts = Path(root) / "checkpoints"
    return sorted(p for p in ckpts.glob("step-*") if (p / "COMPLETE").exists()) if ckpts.exists() else []


def prune(root: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (except one marked KEEP), and incomplete
    ones older than the newest complete."""
    complete = complete_steps(root)
    for old in complete[:-keep]:
        if not (old / KEEP_FILE).exists():
            shutil.rmtree(old, ignore_errors=True)
    if complete:
        for partial in (Path(root) / "checkpoints").glob("step-*"):
            if not (partial / "COMPLETE").exists() and partial.name < complete[-1].name:
                shutil.rmtree(partial, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The checkpoint to resume from: `latest` if it names a complete step, else the newest complete one."""
    pointer = Path(root) / "checkpoints" / "latest"
    if pointer.exists():
        candidate = pointer.parent / pointer.read_text().strip()
        if (candidate / "COMPLETE").exists():
            return candidate
    complete = complete_steps(root)
    return complete[-1] if complete else None


def load(path: Path, engines) -> tuple[dict, dict]:
    """Restore engines (weights + optimizer states), EMA shards; return (trainer_state, rank_state)."""
    rank = dist.get_rank()
    for name in ("generator", "fake_score"):
        engine = getattr(engines, name)
        if engine is not None:
            loaded, _ = engine.load_checkpoint(str(path / name), tag=ENGINE_TAG)
            if loaded is None:
                raise RuntimeError(f"{path / name}: DeepSpeed found no checkpoint with tag {ENGINE_TAG}")
    if engines.ema is not None:
        engines.ema.load_state_dict(torch.load(path / "ema" / f"rank-{rank:05d}.pt", weights_only=False))
    trainer_state = json.loads((path / "trainer.json").read_text())
    rank_file = path / "trainer" / f"rank-{rank:05d}.pt"
    if not rank_file.exists():
        raise RuntimeError(f"{rank_file} missing: the checkpoint was saved with another world size")
    return trainer_state, torch.load(rank_file, weights_only=False)
