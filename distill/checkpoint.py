"""Training checkpoints that are either complete or ignored.

    OUT/checkpoints/step-000100/
        generator/state/...     DeepSpeed ZeRO-3 files (fp32 master + Adam moments per rank)
        fake_score/state/...
        ema/rank-00000.pt       this rank's fp32 EMA shards
        trainer/rank-00000.pt   this rank's RNG states and data position
        trainer.json            step counters and the config (rank 0)
        COMPLETE                written by rank 0 after every rank has finished: every file's size
        KEEP                    (optional) the evaluator's best checkpoint: never pruned
    OUT/checkpoints/latest      "step-000100", replaced atomically after COMPLETE

DeepSpeed's own `latest` is written by rank 0 before the other ranks are known to be done
(spec/deepspeed.md §4.3), so it is disabled and this protocol is used instead.

Resuming (`plan_resume`) checks the checkpoint `latest` names against COMPLETE's file list (a
missing or truncated file is named) and either stops or, with fallback, takes the newest intact
one. Sizes, not hashes: hashing hundreds of GB at every save would stall rank 0, and the damage
a crash or a full disk leaves is a missing or short file.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from precompute import faults
from precompute.fileio import atomic_write

ENGINE_TAG = "state"
KEEP_FILE = "KEEP"  # distill/evaluate.py marks the best checkpoint with it: prune never deletes it
COMPLETE = "COMPLETE"
DAMAGED_PREFIX = "damaged-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file."""


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
    if rank == 0 and path.exists():  # left by a crash, or a damaged one a fallback resume stepped back from
        shutil.rmtree(path)
    dist.barrier()
    for name in ("generator", "fake_score"):
        engine = getattr(engines, name)
        if engine is not None:
            engine.save_checkpoint(str(path / name), tag=ENGINE_TAG, save_latest=False)
            faults.reach("save", step)
    (path / "trainer").mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, path / "trainer" / f"rank-{rank:05d}.pt")
    if engines.ema is not None:
        (path / "ema").mkdir(parents=True, exist_ok=True)
        torch.save(engines.ema.state_dict(), path / "ema" / f"rank-{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        atomic_write(path / "trainer.json", json.dumps(trainer_state, indent=1))
        atomic_write(path / COMPLETE, json.dumps({"files": file_sizes(path)}, indent=0))
        atomic_write(Path(root) / "checkpoints" / "latest", path.name)
        prune(root, keep)
    dist.barrier()
    return path


def file_sizes(path: Path) -> dict[str, int]:
    """Every file under a step directory (but COMPLETE) -> its size in bytes."""
    return {p.relative_to(path).as_posix(): p.stat().st_size
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != COMPLETE}


def verify(path: Path) -> None:
    """Raise CheckpointError naming the first file that is missing or not the size COMPLETE recorded."""
    marker = path / COMPLETE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not marker.exists():
        raise CheckpointError(f"{marker}: missing (the save never finished)")
    text = marker.read_text().strip()
    if not text:  # written before COMPLETE listed the files: nothing to compare
        return
    try:
        recorded = json.loads(text)["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{marker}: unreadable file list") from None
    for rel, size in recorded.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, the checkpoint recorded {size} (truncated or rewritten)")


def complete_steps(root: Path) -> list[Path]:
    ckpts = Path(root) / "checkpoints"
    return sorted(p for p in ckpts.glob("step-*") if (p / COMPLETE).exists()) if ckpts.exists() else []


def prune(root: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (except one marked KEEP), and incomplete
    ones older than the newest complete."""
    complete = complete_steps(root)
    for old in complete[:-keep]:
        if not (old / KEEP_FILE).exists():
            shutil.rmtree(old, ignore_errors=True)
    if complete:
        for partial in (Path(root) / "checkpoints").glob("step-*"):
            if not (partial / COMPLETE).exists() and partial.name < complete[-1].name:
                shutil.rmtree(partial, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The checkpoint to resume from: `latest` if it names a complete step, else the newest complete one."""
    pointer = Path(root) / "checkpoints" / "latest"
    if pointer.exists():
        candidate = pointer.parent / pointer.read_text().strip()
        if (candidate / COMPLETE).exists():
            return candidate
    complete = complete_steps(root)
    return complete[-1] if complete else None


@dataclass(frozen=True)
class ResumePlan:
    path: Path | None                            # None: nothing saved yet, start at step 0
    damaged: tuple[tuple[Path, str], ...] = ()   # newer checkpoints passed over, and why
    incomplete: tuple[Path, ...] = ()            # step directories without COMPLETE (a save cut short)


def plan_resume(root: Path, fallback: bool) -> ResumePlan:
    """Where --resume continues. The checkpoint `latest` names must be intact; if it is not, raise
    CheckpointError naming the file, or with `fallback` take the newest intact complete checkpoint."""
    ckpts = Path(root) / "checkpoints"
    incomplete = tuple(sorted(p for p in ckpts.glob("step-*") if p.is_dir() and not (p / COMPLETE).exists()))
    pointer = ckpts / "latest"
    complete = complete_steps(root)
    if pointer.exists():
        named = ckpts / pointer.read_text().strip()
    elif complete:
        named = complete[-1]
    else:
        return ResumePlan(None, incomplete=incomplete)
    try:
        if not named.is_dir():
            raise CheckpointError(f"{pointer} names {named.name}, which does not exist")
        verify(named)
        return ResumePlan(named, incomplete=incomplete)
    except CheckpointError as err:
        if not fallback:
            raise CheckpointError(f"{err}; --resume-fallback resumes from the newest intact checkpoint instead") from None
        damaged = [(named, str(err))]
    for candidate in reversed(complete):
        if candidate == named:
            continue
        try:
            verify(candidate)
        except CheckpointError as err:
            damaged.append((candidate, str(err)))
            continue
        newer = tuple(d for d in damaged if d[0].name > candidate.name)
        return ResumePlan(candidate, newer, incomplete)
    raise CheckpointError("no intact checkpoint to fall back to: " + "; ".join(why for _, why in damaged))


def apply_resume_plan(root: Path, plan: ResumePlan) -> list[str]:
    """Rank 0, before any save: delete cut-short step directories, move damaged newer checkpoints
    aside (kept for a post-mortem as checkpoints/damaged-step-N) and point `latest` at the one
    used. Returns what was done, for the log."""
    notes = []
    for path in plan.incomplete:
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {path}: a save that never finished (no {COMPLETE})")
    for path, why in plan.damaged:
        if path.exists():
            aside = path.with_name(DAMAGED_PREFIX + path.name)
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            notes.append(f"moved {path} to {aside}: {why}")
        else:
            notes.append(f"skipped {path.name}: {why}")
    if plan.path is not None and plan.damaged:
        atomic_write(Path(root) / "checkpoints" / "latest", plan.path.name)
        notes.append(f"latest now names {plan.path.name}")
    return notes


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
