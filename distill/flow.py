"""The flow-matching convention shared by the teacher, the student and the DMD losses.

    x_t = (1 - σ)·x0 + σ·ε        v = ε - x0        x0 = x_t - σ·v        t = 1000·σ
    shift:  σ' = s·σ / (1 + (s - 1)·σ)

σ is a per-sample noise level: a Python float (same for the whole batch) or a tensor [B].
Conversions run in float64, as Self-Forcing does, so that bf16 activations never lose the
x0 ⇄ velocity identity; results come back in the inputs' dtype.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0
STUDENT_STEPS = (1000, 750, 500, 250)

Sigma = float | Tensor


def shift_sigma(sigma: Sigma, shift: float) -> Sigma:
    """σ' = sσ / (1 + (s-1)σ): bends a uniform grid towards high noise (s > 1)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def timestep_from_sigma(sigma: Sigma) -> Sigma:
    return NUM_TRAIN_TIMESTEPS * sigma


def sigma_from_timestep(t: Sigma) -> Sigma:
    return t / NUM_TRAIN_TIMESTEPS


def warp_steps(steps: tuple[int, ...] = STUDENT_STEPS, shift: float = DEFAULT_SHIFT) -> tuple[float, ...]:
    """The student's σ list: each unshifted timestep d maps to shift(d/1000) (dmd.md §1.4)."""
    if len(steps) == 0:
        raise ValueError("steps must not be empty")
    for t in steps:
        if not 0 < t <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"every step must lie in (0, {NUM_TRAIN_TIMESTEPS}], got {t} in {steps}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must be strictly decreasing, got {steps}")
    return tuple(float(shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift)) for t in steps)


STUDENT_SIGMAS: tuple[float, ...] = warp_steps()  # (1.0, 0.9375, 0.8333..., 0.625)


def _per_sample_sigma(sigma: Sigma, like: Tensor) -> Sigma:
    """A float stays a float; a tensor [B] becomes float64 [B, 1, ..., 1] on like's device."""
    if not isinstance(sigma, Tensor):
        sigma = float(sigma)
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"sigma must lie in [0, 1], got {sigma}")
        return sigma
    if sigma.ndim == 0:
        return sigma.to(device=like.device, dtype=torch.float64)
    if sigma.ndim != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(
            f"sigma must be a float, a 0-dim tensor or a tensor [B] with B = {like.shape[0]}, "
            f"got shape {tuple(sigma.shape)} for a sample of shape {tuple(like.shape)}"
        )
    return sigma.to(device=like.device, dtype=torch.float64).view(-1, *([1] * (like.ndim - 1)))


def _check_same_shape(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def add_noise(x0: Tensor, noise: Tensor, sigma: Sigma) -> Tensor:
    """x_t = (1 - σ)·x0 + σ·ε."""
    _check_same_shape(x0, noise, "x0 and noise")
    s = _per_sample_sigma(sigma, x0)
    out = (1 - s) * x0.double() + s * noise.double()
    return out.to(torch.result_type(x0, noise))


def x0_from_velocity(x_t: Tensor, v: Tensor, sigma: Sigma) -> Tensor:
    """x0 = x_t - σ·v."""
    _check_same_shape(x_t, v, "x_t and v")
    s = _per_sample_sigma(sigma, x_t)
    return (x_t.double() - s * v.double()).to(torch.result_type(x_t, v))


RENOISE_MODES = ("fresh", "implied")  # how a few-step student re-noises x0 between its steps


def implied_noise(x_t: Tensor, x0: Tensor, sigma: Sigma) -> Tensor:
    """ε = (x_t - (1 - σ)·x0)/σ: the noise that took x0 to x_t. Re-noising the next x0 with it
    instead of fresh noise makes the student's sampler deterministic (DDIM-like, the "ode" student
    sampler of FastGen); undefined at σ = 0."""
    _check_same_shape(x_t, x0, "x_t and x0")
    s = _per_sample_sigma(sigma, x_t)
    if not isinstance(s, Tensor) and s == 0.0:
        raise ValueError("implied_noise is undefined at sigma = 0")
    return ((x_t.double() - (1 - s) * x0.double()) / s).to(torch.result_type(x_t, x0))


def next_student_input(x_t: Tensor, x0: Tensor, sigma: Sigma, next_sigma: Sigma, mode: str,
                       fresh: Callable[[Tensor], Tensor]) -> Tensor:
    """A few-step student's next input: its x0 noised to next_sigma with fresh noise `fresh(x0)`
    (mode "fresh", Self-Forcing's SDE sampler) or with the noise that took x0 to x_t ("implied")."""
    noise = implied_noise(x_t, x0, sigma) if mode == "implied" else fresh(x0)
    return add_noise(x0, noise, next_sigma)


def velocity_from_x0(x_t: Tensor, x0: Tensor, sigma: Sigma) -> Tensor:
    """v = (x_t - x0)/σ; undefined at σ = 0, where x_t carries no noise to point at."""
    _check_same_shape(x_t, x0, "x_t and x0")
    s = _per_sample_sigma(sigma, x_t)
    if not isinstance(s, Tensor) and s == 0.0:
        raise ValueError("velocity_from_x0 is undefined at sigma = 0")
    return ((x_t.double() - x0.double()) / s).to(torch.result_type(x_t, x0))


def sample_score_sigma(
    batch: int,
    generator: torch.Generator | None,
    shift: float = DEFAULT_SHIFT,
    t_min: float = 20,
    t_max: float = 980,
    device: torch.device | str | None = None,
) -> Tensor:
    """σ [B] (float64) for the DMD / critic noise: t_raw ~ U{0..999}, shift, clamp to [t_min, t_max].

    One σ per sample (dmd.md §2.2); drawn on the generator's device, then moved to `device`.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0 <= t_min <= t_max <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"need 0 <= t_min <= t_max <= {NUM_TRAIN_TIMESTEPS}, got t_min={t_min}, t_max={t_max}")
    draw_device = generator.device if generator is not None else device
    t_raw = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator, device=draw_device)
    u = t_raw.to(torch.float64) / NUM_TRAIN_TIMESTEPS
    t = (NUM_TRAIN_TIMESTEPS * shift_sigma(u, shift)).clamp(t_min, t_max)
    sigma = t / NUM_TRAIN_TIMESTEPS
    return sigma if device is None else sigma.to(device)
