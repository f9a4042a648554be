"""Samplers: the teacher as Ovi runs it (UniPC flow + per-modality CFG + SLG) and the 4-step student.

The solvers reproduce Ovi's engine configuration number for number (golden/unipc_flow.json):
every scalar coefficient is a float32 0-dim tensor, exactly as the reference builds it, and only
its product with a sample-sized tensor runs in the sample's dtype. That is why the arithmetic
below is spelled out term by term instead of simplified.

Model contract (distill/models, DESIGN.md):
    model(video [B,48,F,H,W], audio [B,L,20], t [B] float, text_video, text_audio,
          first_frame_clean=bool, skip_block=int|None) -> (v_video, v_audio)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from distill.flow import (
    DEFAULT_SHIFT,
    NUM_TRAIN_TIMESTEPS,
    RENOISE_MODES,
    STUDENT_SIGMAS,
    next_student_input,
    timestep_from_sigma,
    x0_from_velocity,
)

FusionModel = Callable[..., tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True)
class SolverSchedule:
    timesteps: Tensor  # [N]: what the DiT is given (int64 for UniPC, float32 for Euler)
    sigmas: Tensor  # [N+1] float32, the last one 0: what the solver integrates over


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def unipc_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> SolverSchedule:
    """FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift), as Ovi builds it."""
    _check_steps(steps)
    # sigma_max is the float32 training sigma 0.999 read back as a Python float (0.9990000128746033)
    sigma_max = float(np.float32(1 - 1 / NUM_TRAIN_TIMESTEPS))
    s = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = torch.from_numpy(s * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # truncation, on purpose
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return SolverSchedule(timesteps=timesteps, sigmas=sigmas)


def euler_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> SolverSchedule:
    """diffusers FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps).

    Quirk kept on purpose: the training grid is already shifted, and set_timesteps shifts the
    interpolated grid again, so the last sigma is shift(shift(0.001)) ≈ 0.0244, not shift(0.001).
    """
    _check_steps(steps)
    train_sigmas = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    train_sigmas = shift * train_sigmas / (1 + (shift - 1) * train_sigmas)
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    t = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)
    s = t / NUM_TRAIN_TIMESTEPS
    s = shift * s / (1 + (shift - 1) * s)
    sigmas = torch.from_numpy(s).to(torch.float32)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    return SolverSchedule(timesteps=timesteps, sigmas=torch.cat([sigmas, torch.zeros(1)]))


def dpmpp_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> SolverSchedule:
    """Ovi's dpm++ option: get_sampling_sigmas(steps, shift), starting at exactly σ = 1 (t = 1000)."""
    _check_steps(steps)
    s = np.linspace(1, 0, steps + 1)[:steps]
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = torch.from_numpy(s * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return SolverSchedule(timesteps=timesteps, sigmas=sigmas)


# ---------------------------------------------------------------------------------------------
# Solvers: one instance per latent; step() is called once per timestep, in order.


class Solver(Protocol):
    schedule: SolverSchedule

    def step(self, velocity: Tensor, sample: Tensor) -> Tensor: ...


def _log_snr(sigma: Tensor) -> Tensor:
    """λ(σ) = log(α/σ) with α = 1 - σ; +inf at σ = 0."""
    return torch.log(1 - sigma) - torch.log(sigma)


class _StepCounter:
    schedule: SolverSchedule

    def __init__(self, schedule: SolverSchedule) -> None:
        self.schedule = schedule
        self.step_index = 0

    @property
    def num_steps(self) -> int:
        return len(self.schedule.timesteps)

    def _next_index(self, velocity: Tensor, sample: Tensor) -> int:
        if velocity.shape != sample.shape:
            raise ValueError(
                f"velocity and sample must have the same shape, got {tuple(velocity.shape)} and {tuple(sample.shape)}"
            )
        if self.step_index >= self.num_steps:
            raise RuntimeError(f"{type(self).__name__} already took all {self.num_steps} steps")
        i = self.step_index
        self.step_index += 1
        return i


class UniPCSolver(_StepCounter):
    """UniPC (bh2, order 2, x0-predicting, lower order at the first and last step) on flow sigmas.

    Each step: UniC corrects the previous prediction with the new x0 estimate (the model is not
    re-run at the corrected point), then UniP predicts the next sample from the corrected one.
    """

    def __init__(self, steps: int, shift: float = DEFAULT_SHIFT) -> None:
        super().__init__(unipc_schedule(steps, shift))
        self._x0_history: list[Tensor] = []  # m_{i-1}, m_{i-2}: newest last
        self._last_start: Tensor | None = None  # the (corrected) sample the last predictor started from
        self._last_order = 0
        # Exposed for inspection and tests.
        self.x0_pred: Tensor | None = None
        self.corrected_sample: Tensor | None = None

    def step(self, velocity: Tensor, sample: Tensor) -> Tensor:
        i = self._next_index(velocity, sample)
        sigmas = self.schedule.sigmas
        x0 = sample - sigmas[i] * velocity
        if i > 0:
            sample = self._correct(i, x0)
        order = min(2, self.num_steps - i, i + 1)
        prev_x0 = self._x0_history[-1] if order == 2 else None
        next_sample = self._predict(i, order, x0, prev_x0, sample)

        self._x0_history = (self._x0_history + [x0])[-2:]
        self._last_start, self._last_order = sample, order
        self.x0_pred, self.corrected_sample = x0, sample
        return next_sample

    def _predict(self, i: int, order: int, x0: Tensor, prev_x0: Tensor | None, sample: Tensor) -> Tensor:
        sigmas = self.schedule.sigmas
        s_now, s_next = sigmas[i], sigmas[i + 1]
        h = _log_snr(s_next) - _log_snr(s_now)
        hh = -h
        phi = torch.expm1(hh)
        b_h = phi  # bh2: B(h) = e^{-h} - 1
        out = (s_next / s_now) * sample - ((1 - s_next) * phi) * x0
        if order == 2:
            rk = (_log_snr(sigmas[i - 1]) - _log_snr(s_now)) / h
            d1 = (prev_x0 - x0) / rk
            out = out - ((1 - s_next) * b_h) * (0.5 * d1)
        return out.to(sample.dtype)

    def _correct(self, i: int, x0: Tensor) -> Tensor:
        """UniC for step i-1: revisit its prediction now that x0 at step i is known."""
        sigmas = self.schedule.sigmas
        start, order = self._last_start, self._last_order
        prev_x0 = self._x0_history[-1]
        s_now, s_prev = sigmas[i], sigmas[i - 1]
        h = _log_snr(s_now) - _log_snr(s_prev)
        hh = -h
        phi = torch.expm1(hh)
        b_h = phi
        base = (s_now / s_prev) * start - ((1 - s_now) * phi) * prev_x0
        d1_now = x0 - prev_x0
        if order == 1:
            correction = 0.5 * d1_now
        else:
            rk = (_log_snr(sigmas[i - 2]) - _log_snr(s_prev)) / h
            d1 = (self._x0_history[-2] - prev_x0) / rk
            hk1 = phi / hh - 1
            hk2 = hk1 / hh - 0.5
            # order-2 UniC weights: solve [[1, 1], [rk, 1]]·rho = [hk1, 2·hk2]/B(h) in float32
            lhs = torch.tensor([[1.0, 1.0], [rk.item(), 1.0]], dtype=torch.float32)
            rhs = torch.stack([hk1 / b_h, hk2 * 2 / b_h])
            rho = torch.linalg.solve(lhs, rhs).to(start.dtype)
            correction = rho[0] * d1 + rho[1] * d1_now
        return (base - ((1 - s_now) * b_h) * correction).to(start.dtype)


class EulerSolver(_StepCounter):
    """Flow Euler: x ← x + (σ_{i+1} - σ_i)·v, with diffusers' float32 round trip of the sample."""

    def __init__(self, steps: int, shift: float = DEFAULT_SHIFT) -> None:
        super().__init__(euler_schedule(steps, shift))

    def step(self, velocity: Tensor, sample: Tensor) -> Tensor:
        i = self._next_index(velocity, sample)
        dt = self.schedule.sigmas[i + 1] - self.schedule.sigmas[i]
        return (sample.to(torch.float32) + dt * velocity).to(velocity.dtype)


class DPMPPSolver(_StepCounter):
    """DPM-Solver++ (2M, midpoint) on flow sigmas; first order at the first and the last step.

    As in the reference, the sample itself is rounded to float32 before the update.
    """

    def __init__(self, steps: int, shift: float = DEFAULT_SHIFT) -> None:
        super().__init__(dpmpp_schedule(steps, shift))
        self._prev_x0: Tensor | None = None
        self.x0_pred: Tensor | None = None

    def step(self, velocity: Tensor, sample: Tensor) -> Tensor:
        i = self._next_index(velocity, sample)
        sigmas = self.schedule.sigmas
        s_now, s_next = sigmas[i], sigmas[i + 1]
        x0 = sample - s_now * velocity
        sample32 = sample.to(torch.float32)
        h = _log_snr(s_next) - _log_snr(s_now)
        decay = (1 - s_next) * (torch.exp(-h) - 1.0)
        out = (s_next / s_now) * sample32 - decay * x0
        if 0 < i < self.num_steps - 1:
            r0 = (_log_snr(s_now) - _log_snr(sigmas[i - 1])) / h
            d1 = (1.0 / r0) * (x0 - self._prev_x0)
            out = out - (0.5 * decay) * d1
        self._prev_x0 = self.x0_pred = x0
        return out.to(x0.dtype)


SOLVERS: dict[str, type] = {"unipc": UniPCSolver, "euler": EulerSolver, "dpm++": DPMPPSolver}


def make_solver(name: str, steps: int, shift: float = DEFAULT_SHIFT) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name](steps, shift)


# ---------------------------------------------------------------------------------------------
# Conditioning helpers shared by the samplers (and the DMD losses)


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Standard form u + w·(c - u): w = 1 is the conditional prediction alone."""
    return uncond + scale * (cond - uncond)


def pin_first_frame(video: Tensor, image_latent: Tensor | None) -> Tensor:
    """Replace latent frame 0 of video [B,C,F,H,W] with image_latent [B,C,1,H,W] (i2v); out of place."""
    if image_latent is None:
        return video
    expected = (video.shape[0], video.shape[1], 1, *video.shape[3:])
    if tuple(image_latent.shape) != expected:
        raise ValueError(
            f"image_latent must have shape {expected} to pin frame 0 of a video of shape "
            f"{tuple(video.shape)}, got {tuple(image_latent.shape)}"
        )
    return torch.cat([image_latent.to(device=video.device, dtype=video.dtype), video[:, :, 1:]], dim=2)


def _model_t(t: float, batch: int, device: torch.device) -> Tensor:
    return torch.full((batch,), float(t), dtype=torch.float32, device=device)


def _check_pair(noise_video: Tensor, noise_audio: Tensor) -> None:
    if noise_video.ndim != 5:
        raise ValueError(f"noise_video must be [B,C,F,H,W], got shape {tuple(noise_video.shape)}")
    if noise_audio.ndim != 3:
        raise ValueError(f"noise_audio must be [B,L,C], got shape {tuple(noise_audio.shape)}")
    if noise_video.shape[0] != noise_audio.shape[0]:
        raise ValueError(
            f"video and audio batch sizes differ: {noise_video.shape[0]} vs {noise_audio.shape[0]}"
        )


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc)


# ---------------------------------------------------------------------------------------------
# Teacher: Ovi's own inference loop (spec/ovi.md §5.3)


@dataclass(frozen=True)
class TeacherSamplerConfig:
    steps: int = 50
    shift: float = DEFAULT_SHIFT
    solver: str = "unipc"
    cfg_video: float = 4.0  # Ovi's inference yaml; generate()'s own defaults are 5.0 / 4.0 / 9
    cfg_audio: float = 3.0
    slg_block: int | None = 11  # fusion block skipped in the negative pass; None or <= 0: off

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {sorted(SOLVERS)}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    @property
    def skip_block(self) -> int | None:
        return self.slg_block if self.slg_block is not None and self.slg_block > 0 else None


@torch.no_grad()
def sample_teacher(
    model: FusionModel,
    noise_video: Tensor,
    noise_audio: Tensor,
    text: Tensor,
    neg_text_video: Tensor,
    neg_text_audio: Tensor,
    cfg: TeacherSamplerConfig = TeacherSamplerConfig(),
    image_latent: Tensor | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Two forwards per step: positive (text to both towers) and negative (each tower its own
    negative prompt, with the SLG block skipped); CFG per modality; one solver per modality. With
    both scales at 1 the guided prediction is the positive one: one forward per step (how a guided
    fine-tune and an unguided teacher are sampled)."""
    _check_pair(noise_video, noise_audio)
    i2v = image_latent is not None
    guided = cfg.cfg_video != 1.0 or cfg.cfg_audio != 1.0
    video_solver = make_solver(cfg.solver, cfg.steps, cfg.shift)
    audio_solver = make_solver(cfg.solver, cfg.steps, cfg.shift)
    video, audio = noise_video, noise_audio
    batch, device = video.shape[0], video.device
    for timestep in _progress(video_solver.schedule.timesteps.tolist(), progress, "teacher"):
        video = pin_first_frame(video, image_latent)
        t = _model_t(timestep, batch, device)
        v_video, v_audio = model(video, audio, t, text, text, first_frame_clean=i2v, skip_block=None)
        if guided:
            uncond_v, uncond_a = model(
                video, audio, t, neg_text_video, neg_text_audio, first_frame_clean=i2v, skip_block=cfg.skip_block
            )
            v_video = classifier_free_guidance(v_video, uncond_v, cfg.cfg_video)
            v_audio = classifier_free_guidance(v_audio, uncond_a, cfg.cfg_audio)
        video = video_solver.step(v_video, video)
        audio = audio_solver.step(v_audio, audio)
    return pin_first_frame(video, image_latent), audio


# ---------------------------------------------------------------------------------------------
# Student: 4 warped steps, x0 prediction, fresh re-noising (spec/dmd.md §6)


def _check_sigmas(sigmas: tuple[float, ...]) -> None:
    if len(sigmas) == 0:
        raise ValueError("sigmas must not be empty")
    if not all(0 < s <= 1 for s in sigmas):
        raise ValueError(f"every sigma must lie in (0, 1], got {sigmas}")
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {sigmas}")


@torch.no_grad()
def sample_student(
    model: FusionModel,
    noise_video: Tensor,
    noise_audio: Tensor,
    text: Tensor,
    sigmas: tuple[float, ...] = STUDENT_SIGMAS,
    image_latent: Tensor | None = None,
    generator: torch.Generator | None = None,
    renoise: str = "fresh",
) -> tuple[Tensor, Tensor]:
    """One conditional forward per σ (CFG is distilled in); returns the last step's x0.

    Between steps, x0 is re-noised to the next σ as in training: with fresh Gaussian noise
    (renoise="fresh") or with the noise implied by the step's input ("implied": deterministic).
    """
    _check_pair(noise_video, noise_audio)
    _check_sigmas(tuple(sigmas))
    if renoise not in RENOISE_MODES:
        raise ValueError(f"renoise must be one of {RENOISE_MODES}, got {renoise!r}")
    i2v = image_latent is not None
    video, audio = noise_video, noise_audio
    batch, device = video.shape[0], video.device
    for k, sigma in enumerate(sigmas):
        video = pin_first_frame(video, image_latent)
        t = _model_t(timestep_from_sigma(sigma), batch, device)
        v_video, v_audio = model(video, audio, t, text, text, first_frame_clean=i2v, skip_block=None)
        x0_video = pin_first_frame(x0_from_velocity(video, v_video, sigma), image_latent)
        x0_audio = x0_from_velocity(audio, v_audio, sigma)
        if k + 1 < len(sigmas):
            next_sigma = sigmas[k + 1]
            fresh = lambda x: _fresh_noise(x, generator)
            video = next_student_input(video, x0_video, sigma, next_sigma, renoise, fresh)
            audio = next_student_input(audio, x0_audio, sigma, next_sigma, renoise, fresh)
    return x0_video, x0_audio


def _fresh_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
