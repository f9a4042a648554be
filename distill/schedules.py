"""Learning-rate schedules: a multiplier of each optimizer's peak lr as a pure function of the
training step, so that a resumed run is at exactly the same point of its schedule with nothing
to save (the step is in the checkpoint).

    factor(step) = (step + 1) / warmup_steps                             during warmup
                 = min_ratio + (1 - min_ratio) · shape(progress)         after it
    shape: constant 1 · linear 1 - p · cosine (1 + cos πp) / 2,   p = (step - warmup) / decay_steps, clipped to 1

The step is the trainer's step (one critic update each), for both optimizers: the generator,
which updates every dmd.critic_ratio-th step, reads the same clock. decay_steps None decays over
the run (max_steps - warmup_steps); after decay_steps the factor stays at min_ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_SHAPES = ("constant", "linear", "cosine")
SCHEDULER_IN_DS_CONFIG = (
    "the DeepSpeed config has a 'scheduler' section, which this trainer does not use: its two optimizers "
    "each follow their own schedule from the recipe (generator_optim.schedule, critic_optim.schedule: "
    "warmup_steps, decay = constant | linear | cosine, decay_steps, min_ratio). Remove the section and set those")


@dataclass(frozen=True)
class LRSchedule:
    warmup_steps: int = 0
    decay: str = "constant"          # constant | linear | cosine
    decay_steps: int | None = None   # after warmup; None: the rest of the run
    min_ratio: float = 0.0           # the floor, as a fraction of the peak lr

    def __post_init__(self) -> None:
        if self.decay not in DECAY_SHAPES:
            raise ValueError(f"decay must be one of {DECAY_SHAPES}, got {self.decay!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.decay_steps is not None and (not isinstance(self.decay_steps, int) or self.decay_steps < 1):
            raise ValueError(f"decay_steps must be None or an int >= 1, got {self.decay_steps!r}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")


def lr_factor(schedule: LRSchedule, step: int, max_steps: int) -> float:
    """The multiplier of the peak lr for the update taken at `step` (0-based)."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return 1.0
    span = schedule.decay_steps or max(max_steps - schedule.warmup_steps, 1)
    progress = min((step - schedule.warmup_steps) / span, 1.0)
    shape = 1.0 - progress if schedule.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return schedule.min_ratio + (1.0 - schedule.min_ratio) * shape
