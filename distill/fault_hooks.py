"""Puts precompute.faults' points inside DeepSpeed's work on the fake-score (critic) engine, which
updates at every step: `forward` (half-way through its differentiated forward; the `nan` action
makes that block's output NaN there), `backward`
(when the gradient reaches that same block) and `optimizer` (after the first parameter group's
Adam update, before the others and before the parameters are re-partitioned).

Installed by the trainer only when OVI_DMD_FAULT names one of these points: plain module and
optimizer hooks from the outside, so no test-only branch sits in the model or the losses.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from precompute import faults

POINTS = ("forward", "backward", "optimizer")


def install(engines, current_step: Callable[[], int]) -> None:
    if not any(faults.armed(point) for point in POINTS):
        return
    engine = engines.fake_score if engines.fake_score is not None else engines.generator
    blocks = engine.module.audio_model.blocks
    probe = blocks[len(blocks) // 2].self_attn

    def on_forward(module, inputs, output):
        if not torch.is_grad_enabled():  # the student's rollout; the differentiated pass is the one to hit
            return
        faults.reach("forward", current_step())
        if faults.armed("backward") and output.requires_grad:
            output.register_hook(lambda grad: faults.reach("backward", current_step()))
        if faults.corrupts("forward", current_step()):
            return output * float("nan")

    probe.register_forward_hook(on_forward)
    # DeepSpeed ZeRO-3 steps the wrapped torch optimizer once per parameter sub-group.
    engine.optimizer.optimizer.register_step_post_hook(lambda *_: faults.reach("optimizer", current_step()))
