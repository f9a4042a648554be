"""Fault injection at named points, for tests/test_faults.py (both stages use it, so it lives
beside the other shared helpers; precompute never imports distill).

    OVI_DMD_FAULT="kill:backward:3:1"     action:point:step[:rank], several joined by ","

`kill` sends SIGKILL to this process when rank `rank` (any rank if left out) reaches `point` at
`step`: no handler runs, no buffer is flushed, as when the OOM killer or a lost node ends a job.
`pause` instead creates OVI_DMD_FAULT_GATE + "-STEP.waiting" and waits until
OVI_DMD_FAULT_GATE + "-STEP.go" exists, so a test can change files under a running job at a
known step. `nan` makes the hook at `point` return NaN activations (a corrupted computation),
for the points whose hook can change a value (`forward`).

Points: step_start (top of a training step), forward / backward / optimizer (the critic's
update, distill/fault_hooks.py), save (a checkpoint save, after the generator's files),
sample_written (precompute, the n-th sample a rank wrote, from 1).

The environment is read once; unset, `reach` is one comparison, and the hooks of
`distill.fault_hooks` are never installed. Nothing here touches the math.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ENV, GATE_ENV = "OVI_DMD_FAULT", "OVI_DMD_FAULT_GATE"
ACTIONS = ("kill", "pause", "nan")
KILL_MARK = "fault: SIGKILL at"


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    step: int
    rank: int | None

    @classmethod
    def parse(cls, text: str) -> Fault:
        parts = text.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ACTIONS:
            raise FaultSpecError(f"{ENV}={text!r}: expected action:point:step[:rank] with action in {ACTIONS}")
        try:
            step, rank = int(parts[2]), (int(parts[3]) if len(parts) == 4 else None)
        except ValueError:
            raise FaultSpecError(f"{ENV}={text!r}: step and rank must be integers") from None
        return cls(parts[0], parts[1], step, rank)


def _from_env() -> tuple[Fault, ...]:
    text = os.environ.get(ENV, "").strip()
    return tuple(Fault.parse(part.strip()) for part in text.split(",")) if text else ()


ACTIVE: tuple[Fault, ...] = _from_env()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _mine(fault: Fault, point: str) -> bool:
    return fault.point == point and fault.rank in (None, _rank())


def armed(point: str) -> bool:
    """Whether a fault is set for `point` on this rank (at some step)."""
    return any(_mine(fault, point) for fault in ACTIVE)


def corrupts(point: str, step: int) -> bool:
    """Whether the hook at `point` must make its value NaN now."""
    return any(f.action == "nan" and f.step == step and _mine(f, point) for f in ACTIVE)


def reach(point: str, step: int) -> None:
    """Called where `point` happens, with the current step (or count)."""
    for fault in ACTIVE:
        if fault.action == "nan" or fault.step != step or not _mine(fault, point):
            continue
        if fault.action == "kill":
            # Said first, because which death the launcher reports is a race: a peer blocked in a
            # collective with this rank can fail (exit 1) before the launcher sees this one's -9.
            print(f"{KILL_MARK} {point} step {step} rank {_rank()}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        gate = os.environ[GATE_ENV]
        Path(f"{gate}-{step}.waiting").touch()
        while not Path(f"{gate}-{step}.go").exists():
            time.sleep(0.05)
