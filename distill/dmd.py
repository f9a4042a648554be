"""DMD2 for Ovi: backward-simulation rollout, generator (DMD, + optional regression on teacher pairs) loss,
fake-score (critic) loss, and the plain flow-matching loss, as pure functions of the models
(spec/dmd.md §2, §3, §5, §10, §11).

The models are arguments: G (generator, trained), F (fake score, trained), R (teacher, frozen). Each is
called as `model(video, audio, t, text_video, text_audio, first_frame_clean=, skip_block=) -> (v_video,
v_audio)`, the OviFusion / DeepSpeed-engine contract. Nothing here does I/O, logging or collectives:
the exit index of the rollout comes in as an argument (the trainer draws it on rank 0 and broadcasts
it, because every ZeRO-3 rank must run the same sequence of forwards), and every random draw comes from
the `torch.Generator` passed in, so a resumed run that restores that generator is bit-identical.

Precision: the models compute in their own dtype (bf16 in training); velocities become x0 in float32
(flow.x0_from_velocity works in float64), and the DMD gradient, normaliser and losses run in float64.

Image-to-video (batch.image_latent set): frame 0 of every video input is the clean image latent and
its tokens get t = 0 (`first_frame_clean=True`), frame 0 of every x0 is pinned to the image latent,
and frame 0 is left out of every mean (normaliser and losses): it carries no signal to learn from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from distill.batch import Batch
from distill.flow import (
    DEFAULT_SHIFT,
    NUM_TRAIN_TIMESTEPS,
    RENOISE_MODES,
    STUDENT_SIGMAS,
    Sigma,
    add_noise,
    next_student_input,
    sample_score_sigma,
    timestep_from_sigma,
    x0_from_velocity,
)
from distill.sampling import FusionModel, classifier_free_guidance, pin_first_frame

GUIDANCE_MODES = ("score", "samples")
PAIR_GUIDANCE = ("cfg_video", "cfg_audio", "slg_block")  # the DMDConfig fields that name a teacher pair's guidance
LATENT_DTYPE = torch.float32  # noise, x_t and x0 between model calls
LOSS_DTYPE = torch.float64  # DMD gradient, normaliser and loss arithmetic (as Self-Forcing)


@dataclass(frozen=True)
class DMDConfig:
    student_sigmas: tuple[float, ...] = STUDENT_SIGMAS  # the student's σ list, from 1 (pure noise) down
    shift: float = DEFAULT_SHIFT  # of the DMD / critic σ sampler
    t_min: float = 20  # clamp of the DMD / critic timestep (0..1000 scale)
    t_max: float = 980
    cfg_video: float = 4.0  # teacher CFG, standard form u + w(c - u)
    cfg_audio: float = 3.0
    slg_block: int | None = 11  # block skipped in the teacher's negative pass; None: no SLG
    video_weight: float = 1.0
    audio_weight: float = 1.0
    norm_eps: float = 1e-6  # added to the DMD normaliser
    critic_ratio: int = 5  # critic updates per generator update
    flow_shift: float | None = None  # σ sampler shift for flow_loss; None: `shift`; 1.0: uniform
    renoise: str = "fresh"  # between student steps: fresh noise (SDE, Self-Forcing) or the implied one (ODE)
    # Teacher-pair regression beside the DMD loss (DMD v1's regression term; CausVid's ODE loss): the
    # student's x0 from a pair's noise is pulled towards the guided teacher's 50-step sample from that
    # noise. Needs renoise="implied" (a deterministic student, whose every step aims at that sample).
    regression_weight: float = 0.0
    stack_teacher_passes: bool = True  # the teacher's conditional and negative passes as one forward at 2B
    # Where the guidance lives. "score": DMD's real score is the teacher's CFG+SLG combination (DMD2,
    # Self-Forcing); it has no distribution for a fixed point and the student drifts past the guided
    # teacher (bench/RESULTS.md, "Guided DMD"). "samples": the teacher was fine-tuned on its own
    # CFG+SLG samples (distill/pairs.py, then objective flow with data.pairs) and is queried as is, one
    # pass: the score of the guided samples' distribution. cfg_* / slg_block then name the guidance of
    # those samples (the pairs' check), not a DMD-time combination.
    guidance: str = "score"

    def __post_init__(self) -> None:
        sigmas = tuple(float(s) for s in self.student_sigmas)
        object.__setattr__(self, "student_sigmas", sigmas)
        if not sigmas:
            raise ValueError("student_sigmas must not be empty")
        if sigmas[0] != 1.0:
            raise ValueError(f"student_sigmas must start at 1.0 (the rollout starts from pure noise), got {sigmas}")
        if not all(0 < s <= 1 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"student_sigmas must be strictly decreasing values in (0, 1], got {sigmas}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0 <= self.t_min <= self.t_max <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"t_min and t_max need 0 <= t_min <= t_max <= {NUM_TRAIN_TIMESTEPS}, "
                f"got t_min={self.t_min}, t_max={self.t_max}"
            )
        for name in ("cfg_video", "cfg_audio", "video_weight", "audio_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.video_weight == 0 and self.audio_weight == 0:
            raise ValueError("video_weight and audio_weight are both 0: nothing would be trained")
        if self.slg_block is not None and (isinstance(self.slg_block, bool) or not isinstance(self.slg_block, int)
                                           or self.slg_block < 0):
            raise ValueError(f"slg_block must be None or an int >= 0, got {self.slg_block!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if isinstance(self.critic_ratio, bool) or not isinstance(self.critic_ratio, int) or self.critic_ratio < 1:
            raise ValueError(f"critic_ratio must be an int >= 1, got {self.critic_ratio!r}")
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be None or > 0, got {self.flow_shift}")
        if self.renoise not in RENOISE_MODES:
            raise ValueError(f"renoise must be one of {RENOISE_MODES}, got {self.renoise!r}")
        if not (math.isfinite(self.regression_weight) and self.regression_weight >= 0):
            raise ValueError(f"regression_weight must be a finite number >= 0, got {self.regression_weight}")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")
        if self.regression_weight > 0 and self.renoise != "implied":
            raise ValueError("regression_weight > 0 needs renoise='implied': with fresh noise between steps the "
                             "student's sample from a pair's noise is random, and the pair's target is not its aim")

    @property
    def n_steps(self) -> int:
        return len(self.student_sigmas)


def pair_guidance(cfg: DMDConfig) -> dict:
    """The guidance teacher pairs are made with (distill/pairs.py) and checked against (the trainer)."""
    return {name: getattr(cfg, name) for name in PAIR_GUIDANCE}


# ---------------------------------------------------------------------------------------------
# Schedule helpers for the trainer


def is_generator_step(step: int, cfg: DMDConfig) -> bool:
    """The generator updates on every critic_ratio-th step, before that step's critic update (1:5)."""
    return step % cfg.critic_ratio == 0


def draw_exit_index(generator: torch.Generator, n_steps: int) -> int:
    """Exit index k ~ U{0..n_steps-1}; drawn on rank 0 only, then broadcast by the trainer."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return int(torch.randint(0, n_steps, (1,), generator=generator, device=generator.device).item())


# ---------------------------------------------------------------------------------------------
# One model call, in x0 space


def _noise_like(x: Tensor, rng: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=rng, device=rng.device, dtype=LATENT_DTYPE).to(x.device)


def predict(
    model: FusionModel,
    x_video: Tensor,
    x_audio: Tensor,
    sigma: Sigma,
    text_video: Tensor,
    text_audio: Tensor,
    image_latent: Tensor | None,
    skip_block: int | None = None,
    skip_samples: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x0_video, x0_audio, v_video, v_audio) at noise level σ (float or [B]); one shared σ for both
    towers. In i2v, frame 0 of the input is the clean image latent and frame 0 of x0 is pinned."""
    i2v = image_latent is not None
    x_video = pin_first_frame(x_video, image_latent)
    batch = x_video.shape[0]
    t = _timesteps(sigma, batch, x_video.device)
    extra = {} if skip_samples is None else {"skip_samples": skip_samples}  # only the stacked teacher pass needs it
    v_video, v_audio = model(x_video, x_audio, t, text_video, text_audio, first_frame_clean=i2v, skip_block=skip_block,
                             **extra)
    x0_video = pin_first_frame(x0_from_velocity(x_video, v_video, sigma).to(LATENT_DTYPE), image_latent)
    x0_audio = x0_from_velocity(x_audio, v_audio, sigma).to(LATENT_DTYPE)
    return x0_video, x0_audio, v_video, v_audio


def _timesteps(sigma: Sigma, batch: int, device: torch.device) -> Tensor:
    """t [B] float32 on the device. A float σ becomes a fill kernel: `torch.as_tensor(float,
    device=cuda)` would copy from the host and wait for the GPU's queue to drain."""
    t = timestep_from_sigma(sigma)
    if isinstance(t, Tensor):
        return t.to(device=device, dtype=torch.float32).expand(batch)
    return torch.full((batch,), t, dtype=torch.float32, device=device)


def _counted(video: Tensor, i2v: bool) -> Tensor:
    """The video elements a loss or normaliser sees: all but the pinned frame 0 in i2v."""
    return video[:, :, 1:] if i2v else video


# ---------------------------------------------------------------------------------------------
# Rollout (backward simulation, dmd.md §2.1)


def rollout(
    generator_model: FusionModel,
    batch: Batch,
    exit_index: int,
    cfg: DMDConfig,
    rng: torch.Generator,
    with_grad: bool,
) -> tuple[Tensor, Tensor]:
    """The student's x0 prediction at step `exit_index`, starting from pure noise at σ = 1.

    Steps before the exit run without grad and re-noise their x0 to the next σ (cfg.renoise: fresh
    noise, or the noise implied by the step's input); the exit step is the only one differentiated
    (truncated backprop), and only if with_grad."""
    if isinstance(exit_index, bool) or not isinstance(exit_index, int) or not 0 <= exit_index < cfg.n_steps:
        raise ValueError(f"exit_index must be an int in [0, {cfg.n_steps}), got {exit_index!r}")
    text, image, sigmas = batch.text, batch.image_latent, cfg.student_sigmas
    if batch.noise_video is not None:  # a teacher pair: start where the teacher's sample started
        x_video, x_audio = batch.noise_video.to(LATENT_DTYPE), batch.noise_audio.to(LATENT_DTYPE)
    else:
        x_video, x_audio = _noise_like(batch.video, rng), _noise_like(batch.audio, rng)
    fresh = lambda x: _noise_like(x, rng)
    with torch.no_grad():
        for i in range(exit_index):
            x0_video, x0_audio, _, _ = predict(generator_model, x_video, x_audio, sigmas[i], text, text, image)
            x_video = next_student_input(x_video, x0_video, sigmas[i], sigmas[i + 1], cfg.renoise, fresh)
            x_audio = next_student_input(x_audio, x0_audio, sigmas[i], sigmas[i + 1], cfg.renoise, fresh)
    with torch.set_grad_enabled(with_grad):
        x0_video, x0_audio, _, _ = predict(generator_model, x_video, x_audio, sigmas[exit_index], text, text, image)
    return x0_video, x0_audio


# ---------------------------------------------------------------------------------------------
# The math (dmd.md §2.6, §2.7, §3)


def dmd_gradient(x0: Tensor, x0_fake: Tensor, x0_real: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """DMD in x0 space: g = (x0_fake − x0_real) / (mean|x̂0 − x0_real| + eps), normaliser per sample.

    Descending on x̂0 along −g moves it from where the critic says the student is towards where the
    teacher says the data is. Returns (g, normaliser [B]).

    No nan_to_num (Self-Forcing has one): the denominator is >= eps, so g is NaN/Inf only when a
    model's prediction is, and zeroing it would hide that from the trainer's non-finite guard
    (issue 18: a NaN fake-score prediction became a zero gradient and a "finite" generator step)."""
    x0, x0_fake, x0_real = x0.to(LOSS_DTYPE), x0_fake.to(LOSS_DTYPE), x0_real.to(LOSS_DTYPE)
    normaliser = (x0 - x0_real).abs().flatten(1).mean(dim=1)
    grad = (x0_fake - x0_real) / (normaliser.view(-1, *([1] * (x0.ndim - 1))) + eps)
    return grad, normaliser


def dmd_loss(x0: Tensor, grad: Tensor) -> Tensor:
    """½·mean((x̂0 − sg(x̂0 − g))²): d/dx̂0 = g/numel, so backprop injects exactly the DMD gradient."""
    x0 = x0.to(LOSS_DTYPE)
    target = (x0 - grad).detach()
    return 0.5 * (x0 - target).pow(2).mean()


def regression_loss(x0: Tensor, target: Tensor) -> Tensor:
    """mean((x̂0 − x0_teacher)²): the student's sample against the teacher's from the same noise."""
    return (x0.to(LOSS_DTYPE) - target.to(LOSS_DTYPE)).pow(2).mean()


def flow_matching_loss(v_pred: Tensor, noise: Tensor, x0: Tensor) -> Tensor:
    """mean((v − (ε − x0))²): plain velocity regression, uniform over σ."""
    target = noise.to(LOSS_DTYPE) - x0.to(LOSS_DTYPE)
    return (v_pred.to(LOSS_DTYPE) - target).pow(2).mean()


def _weighted(cfg: DMDConfig, loss_video: Tensor, loss_audio: Tensor) -> Tensor:
    return cfg.video_weight * loss_video + cfg.audio_weight * loss_audio


def _score_sigma(batch: Batch, cfg: DMDConfig, rng: torch.Generator, shift: float | None = None) -> Tensor:
    return sample_score_sigma(batch.size, rng, cfg.shift if shift is None else shift, cfg.t_min, cfg.t_max,
                              device=batch.video.device)


# ---------------------------------------------------------------------------------------------
# Generator step, critic step, flow objective


def teacher_predictions(teacher: FusionModel, xt_video: Tensor, xt_audio: Tensor, sigma: Tensor, batch: Batch,
                        cfg: DMDConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The teacher's x0 on the prompt and on the negative prompts with SLG: ((video, audio), (video, audio)).

    Stacked, both run as one forward at twice the batch (the SLG block skipped for the negative
    half only): half the teacher's parameter fetches under ZeRO-3, and the same module order in
    every call, so DeepSpeed's prefetch trace stays valid."""
    image = batch.image_latent
    if not cfg.stack_teacher_passes:
        cond = predict(teacher, xt_video, xt_audio, sigma, batch.text, batch.text, image)
        uncond = predict(teacher, xt_video, xt_audio, sigma, batch.neg_text_video, batch.neg_text_audio, image,
                         skip_block=cfg.slg_block)
        return cond[:2], uncond[:2]
    two = lambda x: torch.cat([x, x])
    n = batch.size
    skip = torch.arange(2 * n, device=xt_video.device) >= n
    x0_video, x0_audio, _, _ = predict(
        teacher, two(xt_video), two(xt_audio), two(sigma), torch.cat([batch.text, batch.neg_text_video]),
        torch.cat([batch.text, batch.neg_text_audio]), None if image is None else two(image),
        skip_block=cfg.slg_block, skip_samples=None if cfg.slg_block is None else skip)
    return (x0_video[:n], x0_audio[:n]), (x0_video[n:], x0_audio[n:])


def real_score(teacher: FusionModel, xt_video: Tensor, xt_audio: Tensor, sigma: Tensor, batch: Batch,
               cfg: DMDConfig) -> tuple[Tensor, Tensor]:
    """The teacher's x0 that DMD pulls towards (float64): CFG+SLG-combined (guidance "score"), or the
    fine-tuned teacher's own prediction on the prompt (guidance "samples", one pass)."""
    if cfg.guidance == "samples":
        video, audio, _, _ = predict(teacher, xt_video, xt_audio, sigma, batch.text, batch.text, batch.image_latent)
        return video.to(LOSS_DTYPE), audio.to(LOSS_DTYPE)
    (cond_video, cond_audio), (uncond_video, uncond_audio) = teacher_predictions(teacher, xt_video, xt_audio, sigma,
                                                                                 batch, cfg)
    return (classifier_free_guidance(cond_video.to(LOSS_DTYPE), uncond_video.to(LOSS_DTYPE), cfg.cfg_video),
            classifier_free_guidance(cond_audio.to(LOSS_DTYPE), uncond_audio.to(LOSS_DTYPE), cfg.cfg_audio))


def generator_loss(
    generator_model: FusionModel,
    fake_score: FusionModel,
    teacher: FusionModel,
    batch: Batch,
    exit_index: int,
    cfg: DMDConfig,
    rng: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DMD loss of the student: 1 differentiated G forward (+ exit_index no-grad ones), 1 F forward and
    2 R forwards (conditional; negative prompts per tower with SLG; 1 with guidance "samples"), all
    F/R under no_grad. On a teacher-pair batch the rollout starts from the pair's noise and, with
    cfg.regression_weight, the loss adds the weighted squared distance of the student's x0 to the
    teacher's sample: against the CFG-combined score (guidance "score") DMD has no fixed point at
    the guided teacher's samples (its CFG part never vanishes) and the regression slows the drift;
    guidance "samples" removes the cause (bench/RESULTS.md, "Guided DMD")."""
    i2v, image = batch.i2v, batch.image_latent
    x0_video, x0_audio = rollout(generator_model, batch, exit_index, cfg, rng, with_grad=True)
    with torch.no_grad():
        sigma = _score_sigma(batch, cfg, rng)  # one σ per sample, shared by both modalities
        xt_video = add_noise(x0_video.detach(), _noise_like(x0_video, rng), sigma)
        xt_audio = add_noise(x0_audio.detach(), _noise_like(x0_audio, rng), sigma)
        fake_video, fake_audio, _, _ = predict(fake_score, xt_video, xt_audio, sigma, batch.text, batch.text, image)
        real_video, real_audio = real_score(teacher, xt_video, xt_audio, sigma, batch, cfg)
        grad_video, norm_video = dmd_gradient(_counted(x0_video.detach(), i2v), _counted(fake_video, i2v),
                                              _counted(real_video, i2v), cfg.norm_eps)
        grad_audio, norm_audio = dmd_gradient(x0_audio.detach(), fake_audio, real_audio, cfg.norm_eps)
    loss_video = dmd_loss(_counted(x0_video, i2v), grad_video)
    loss_audio = dmd_loss(x0_audio, grad_audio)
    loss = _weighted(cfg, loss_video, loss_audio)
    metrics = {}
    if cfg.regression_weight > 0 and batch.has_pair:
        reg_video = regression_loss(_counted(x0_video, i2v), _counted(batch.target_video, i2v))
        reg_audio = regression_loss(x0_audio, batch.target_audio)
        loss = loss + cfg.regression_weight * _weighted(cfg, reg_video, reg_audio)
        metrics = {"regression_video": reg_video.detach(), "regression_audio": reg_audio.detach()}
    metrics.update({
        "loss_video": loss_video.detach(),
        "loss_audio": loss_audio.detach(),
        "normaliser_video": norm_video.mean(),
        "normaliser_audio": norm_audio.mean(),
        "grad_norm_video": grad_video.norm(),
        "grad_norm_audio": grad_audio.norm(),
        "sigma": sigma.mean(),
    })
    return loss, metrics


def critic_loss(
    generator_model: FusionModel,
    fake_score: FusionModel,
    batch: Batch,
    exit_index: int,
    cfg: DMDConfig,
    rng: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow matching of the fake score on a fresh student sample (exit_index + 1 no-grad G forwards)
    noised at its own σ with its own noise; the one F forward is differentiated."""
    with torch.no_grad():
        x0_video, x0_audio = rollout(generator_model, batch, exit_index, cfg, rng, with_grad=False)
    return _flow_loss_on(fake_score, x0_video, x0_audio, batch, cfg, rng, cfg.shift)


def flow_loss(
    model: FusionModel, batch: Batch, cfg: DMDConfig, rng: torch.Generator
) -> tuple[Tensor, dict[str, Tensor]]:
    """`objective: flow`: flow-matching fine-tuning of one model on the batch's data latents (the
    critic's loss applied to real data); σ shifted by flow_shift (1.0: uniform), clamped to [t_min, t_max]."""
    x0_video = pin_first_frame(batch.video.to(LATENT_DTYPE), batch.image_latent)
    x0_audio = batch.audio.to(LATENT_DTYPE)
    return _flow_loss_on(model, x0_video, x0_audio, batch, cfg, rng, cfg.flow_shift)


def _flow_loss_on(
    model: FusionModel,
    x0_video: Tensor,
    x0_audio: Tensor,
    batch: Batch,
    cfg: DMDConfig,
    rng: torch.Generator,
    shift: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Velocity MSE per modality at one σ per sample (shared by both towers), fresh noise."""
    i2v = batch.i2v
    sigma = _score_sigma(batch, cfg, rng, shift)
    noise_video, noise_audio = _noise_like(x0_video, rng), _noise_like(x0_audio, rng)
    xt_video = add_noise(x0_video, noise_video, sigma)
    xt_audio = add_noise(x0_audio, noise_audio, sigma)
    _, _, v_video, v_audio = predict(model, xt_video, xt_audio, sigma, batch.text, batch.text, batch.image_latent)
    loss_video = flow_matching_loss(_counted(v_video, i2v), _counted(noise_video, i2v), _counted(x0_video, i2v))
    loss_audio = flow_matching_loss(v_audio, noise_audio, x0_audio)
    metrics = {"loss_video": loss_video.detach(), "loss_audio": loss_audio.detach(), "sigma": sigma.mean()}
    return _weighted(cfg, loss_video, loss_audio), metrics
