"""How close a student checkpoint's samples are to the teacher's, in latent space: pure functions.

    checkpoint_metrics(student_video, student_audio, teacher_video, teacher_audio) -> {name: float}

videos [N, C, F, H, W], audios [N, L, A]; sample i of the student and sample i of the teacher come
from the same prompt and the same starting noise (distill/evaluate.py's reference, or any other
paired set, e.g. bench/toyworld.py's samplers). Nothing here reads files, loads models or logs:
every number is a function of the four tensors, computed in float64 on the CPU.

Features ("per-frame pooled"): a video frame becomes the mean of every channel over a 2x2 grid
of cells (coarse layout: where things are) plus every channel's standard deviation over the
frame (contrast and texture: what a blurred or over-sharpened frame changes); an audio latent row
is its A channels as they are. Each frame (row) of each sample is one observation.

Why diagonal Fréchet distances: a real evaluation has 8-16 samples, whose frames are strongly
correlated, for 5·48 = 240 video dimensions: a full covariance is singular there, and its matrix
square root turns estimation noise into distance. The diagonal Gaussian W2² (per dimension
(μ_s - μ_t)² + (σ_s - σ_t)²) needs only a mean and a standard deviation per dimension, is
defined for any N >= 2, and is exact for the marginals. Features are standardised by the
teacher's per-dimension mean and std first, so every dimension counts the same, the number is in
units of the teacher's own spread (0: same marginals; 1: e.g. every sample at the teacher's mean)
and video (240 dims) and audio (20) are comparable: the distance is averaged over dimensions.
What the diagonal misses (correlations between dimensions) is partly covered by the diversity
ratio, which is computed on whole samples.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

VIDEO_GRID = 2          # cells per side for the pooled channel means
STD_FLOOR = 1e-3        # of the mean teacher std: dims the teacher never moves stay finite
AV_SYNC_WEIGHT = 0.5    # in the score: the correlation gap lies in [0, 2] and is noisier than the rest
MIN_FRAMES = 3          # A/V alignment correlates F-1 >= 2 motion values per sample


def checkpoint_metrics(student_video: Tensor, student_audio: Tensor, teacher_video: Tensor,
                       teacher_audio: Tensor, groups: Sequence[int] | Tensor | None = None) -> dict[str, float]:
    """Metrics of the student's samples against the teacher's (see the module docstring).

    `groups` (optional, one label per sample, e.g. the prompt or class; every group needs >= 2
    samples): the Fréchet distances and diversities are then taken within each group and averaged,
    i.e. conditionally on the prompt, in the units of the whole teacher set. That sees what pooling
    across prompts hides: a student that drops modes within a prompt, or gives one prompt another
    prompt's content. Without groups every sample is one draw of one distribution.

    fd_video, fd_audio        diagonal Fréchet distance of per-frame pooled features, in units of
                              the teacher's spread, averaged over feature dimensions (0 = same)
    paired_video, paired_audio  mean squared distance of student sample i to teacher sample i (same
                              noise) over the mean squared distance between two teacher samples:
                              0 = the teacher's own sample, ~1 = as far as an unrelated one
    diversity_video, _audio   sample-to-sample spread (RMS pairwise distance of whole samples) over
                              the teacher's: < 1 collapse, > 1 noisier or over-saturated
    channel_std_ratio_*       geometric mean over latent channels of std_student / std_teacher:
                              > 1 over-saturated, < 1 washed out or collapsed
    channel_std_ratio_worst_* the channel's ratio farthest from 1 (a single channel blowing up)
    channel_mean_shift_*      mean over channels of |mean_s - mean_t| / std_t
    av_sync_student, _teacher mean over samples of the correlation, over time, between video motion
                              energy and audio change energy (the sound changes when the picture does)
    av_sync_gap               |av_sync_student - av_sync_teacher|
    score                     lower is better, 0 for a student equal to the teacher:
                              fd_video + fd_audio + |ln diversity_video| + |ln diversity_audio|
                              + 0.5 · av_sync_gap   (with groups: the per-group fd and diversity)

    The score ranks by closeness to the teacher's distribution. The Fréchet terms grow with any
    shift or spread change of the marginals: a student that over-saturates (larger std, shifted
    means) or collapses (std towards 0: a sample at the mean costs 1 per dimension) pays in both
    modalities. The |ln diversity| terms make collapse and saturation cost the same for the same
    factor (half the spread as much as twice). The paired distances are reported, not scored:
    they reward regression to the mean (on audio rows, a student that outputs the teacher's mean
    sample gets 0.5, one with the teacher's exact distribution but other noise-to-sample pairings
    ~1), and DMD matches distributions, not the teacher's noise-to-sample map.
    """
    _check_inputs(student_video, student_audio, teacher_video, teacher_audio)
    members = _group_members(groups, student_video.shape[0])
    sv, tv = student_video.detach().double().cpu(), teacher_video.detach().double().cpu()
    sa, ta = student_audio.detach().double().cpu(), teacher_audio.detach().double().cpu()
    s_vfeat, t_vfeat = video_frame_features(sv), video_frame_features(tv)     # [N, F, D]
    out: dict[str, float] = {}
    for name, s_feat, t_feat in (("video", s_vfeat, t_vfeat), ("audio", sa, ta)):
        scale = _teacher_scale(_rows(t_feat))
        out[f"fd_{name}"] = sum(frechet_distance_diagonal(_rows(s_feat[m]), _rows(t_feat[m]), scale)
                                for m in members) / len(members)
        out[f"paired_{name}"] = paired_distance(s_feat.flatten(1), t_feat.flatten(1))
        out[f"diversity_{name}"] = diversity_ratio(s_feat.flatten(1), t_feat.flatten(1), members)
    for name, s, t, channel_dim in (("video", sv, tv, 1), ("audio", sa, ta, 2)):
        stats = channel_statistics(s, t, channel_dim)
        out.update({f"{key}_{name}": value for key, value in stats.items()})
    out["av_sync_student"] = av_sync(sv, sa)
    out["av_sync_teacher"] = av_sync(tv, ta)
    out["av_sync_gap"] = abs(out["av_sync_student"] - out["av_sync_teacher"])
    out["score"] = score(out)
    return out


def score(metrics: dict[str, float]) -> float:
    """The rule in checkpoint_metrics' docstring, on its own numbers."""
    return (metrics["fd_video"] + metrics["fd_audio"] + abs(math.log(metrics["diversity_video"]))
            + abs(math.log(metrics["diversity_audio"])) + AV_SYNC_WEIGHT * metrics["av_sync_gap"])


# ------------------------------------------------------------------------------------- features

def video_frame_features(video: Tensor) -> Tensor:
    """[N, C, F, H, W] -> [N, F, C·g² + C]: channel means over a g x g grid, channel stds over the frame."""
    n, c, f, h, w = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)
    grid = torch.nn.functional.adaptive_avg_pool2d(frames, (min(VIDEO_GRID, h), min(VIDEO_GRID, w)))
    spread = frames.flatten(2).std(dim=2, unbiased=False)
    return torch.cat([grid.flatten(1), spread], dim=1).reshape(n, f, -1)


def _rows(features: Tensor) -> Tensor:
    """[N, T, D] -> [N·T, D]: every frame of every sample is one observation."""
    return features.reshape(-1, features.shape[-1])


# ------------------------------------------------------------------------------------- distances

def _teacher_scale(reference: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = reference.mean(dim=0), reference.std(dim=0, unbiased=False)
    return mean, std.clamp_min(STD_FLOOR * float(std.mean()) + 1e-12)


def frechet_distance_diagonal(features: Tensor, reference: Tensor, scale: tuple[Tensor, Tensor] | None = None) -> float:
    """W2² between diagonal Gaussian fits of rows [M, D] and [M', D], after standardising both by
    the reference's per-dimension mean and std (or `scale`: a larger set's), averaged over D (so
    the reference itself is at mean 0, std 1 and the distance is mean_d[μ_d² + (σ_d - 1)²] of the
    standardised rows)."""
    mean, std = scale if scale is not None else _teacher_scale(reference)
    z = (features - mean) / std
    z_ref = (reference - mean) / std
    mu, sigma = z.mean(dim=0), z.std(dim=0, unbiased=False)
    mu_ref, sigma_ref = z_ref.mean(dim=0), z_ref.std(dim=0, unbiased=False)
    return float(((mu - mu_ref) ** 2 + (sigma - sigma_ref) ** 2).mean())


def paired_distance(samples: Tensor, reference: Tensor) -> float:
    """mean_i ||x_i - r_i||² / mean_{i≠j} ||r_i - r_j||² on whole samples [N, D], standardised by
    the reference's per-dimension std. The denominator is 2·Σ_d var_d (an identity), so it costs
    O(N·D), not O(N²·D)."""
    _, std = _teacher_scale(reference)
    x, r = samples / std, reference / std
    between = 2.0 * float(r.var(dim=0, unbiased=True).sum())
    return float(((x - r) ** 2).sum(dim=1).mean()) / max(between, 1e-12)


def diversity_ratio(samples: Tensor, reference: Tensor, members: list[Tensor] | None = None) -> float:
    """RMS pairwise distance of the samples [N, D] over the reference's: sqrt(Σ var / Σ var_ref),
    by the same identity (within each group of `members`, summed, when given: seed-to-seed
    diversity per prompt); floored at 1e-6 so a fully collapsed student still has a finite log."""
    _, std = _teacher_scale(reference)
    members = members or [torch.arange(samples.shape[0])]

    def spread(x: Tensor) -> float:
        return sum(float((x[m] / std).var(dim=0, unbiased=True).sum()) for m in members)

    return max(math.sqrt(spread(samples) / max(spread(reference), 1e-12)), 1e-6)


def channel_statistics(latent: Tensor, reference: Tensor, channel_dim: int) -> dict[str, float]:
    """Per latent channel (all samples, frames and positions pooled): std ratio and mean shift."""
    def per_channel(x: Tensor) -> tuple[Tensor, Tensor]:
        rows = x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
        return rows.mean(dim=0), rows.std(dim=0, unbiased=False)

    mean, std = per_channel(latent)
    mean_ref, std_ref = _teacher_scale(reference.movedim(channel_dim, -1).reshape(-1, reference.shape[channel_dim]))
    log_ratio = torch.log(std.clamp_min(1e-12) / std_ref)
    worst = int(log_ratio.abs().argmax())
    return {"channel_std_ratio": float(log_ratio.mean().exp()),
            "channel_std_ratio_worst": float(log_ratio[worst].exp()),
            "channel_mean_shift": float(((mean - mean_ref).abs() / std_ref).mean())}


# ------------------------------------------------------------------------------------- A/V alignment

def video_motion_energy(video: Tensor) -> Tensor:
    """[N, C, F, H, W] -> [N, F-1]: mean squared change from each latent frame to the next."""
    return (video[:, :, 1:] - video[:, :, :-1]).pow(2).mean(dim=(1, 3, 4))


def audio_change_energy(audio: Tensor, frames: int) -> Tensor:
    """[N, L, A] -> [N, frames-1]: the audio latent rows averaged into `frames` equal time bins
    (the clip's video latent frames on the same timeline), then the mean squared change from each
    bin to the next: the same measure as video_motion_energy, on the audio."""
    binned = torch.nn.functional.adaptive_avg_pool1d(audio.transpose(1, 2), frames)   # [N, A, frames]
    return (binned[:, :, 1:] - binned[:, :, :-1]).pow(2).mean(dim=1)


def av_sync(video: Tensor, audio: Tensor) -> float:
    """Mean over samples of the Pearson correlation between video motion energy and audio change
    energy over time (a sample whose either curve is flat counts 0: nothing to align)."""
    v = video_motion_energy(video)
    a = audio_change_energy(audio, video.shape[2])
    v, a = v - v.mean(dim=1, keepdim=True), a - a.mean(dim=1, keepdim=True)
    norm = v.norm(dim=1) * a.norm(dim=1)
    corr = torch.where(norm > 1e-12, (v * a).sum(dim=1) / norm.clamp_min(1e-12), torch.zeros_like(norm))
    return float(corr.mean())


# ------------------------------------------------------------------------------------- checks

def _group_members(groups: Sequence[int] | Tensor | None, n: int) -> list[Tensor]:
    """Sample indices per group (one group of everything without labels)."""
    if groups is None:
        return [torch.arange(n)]
    labels = torch.as_tensor(groups).reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"groups has {labels.numel()} labels for {n} samples")
    members = [torch.nonzero(labels == value).reshape(-1) for value in torch.unique(labels)]
    small = [int(labels[m[0]]) for m in members if len(m) < 2]
    if small:
        raise ValueError(f"every group needs at least 2 samples; group(s) {small[:5]} have one")
    return members


def _check_inputs(student_video: Tensor, student_audio: Tensor, teacher_video: Tensor, teacher_audio: Tensor) -> None:
    for name, x, ndim in (("student_video", student_video, 5), ("teacher_video", teacher_video, 5),
                          ("student_audio", student_audio, 3), ("teacher_audio", teacher_audio, 3)):
        if not isinstance(x, Tensor) or x.ndim != ndim:
            raise ValueError(f"{name} must be a {ndim}-d tensor, got {getattr(x, 'shape', type(x))}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} has NaN or Inf values")
    if student_video.shape != teacher_video.shape or student_audio.shape != teacher_audio.shape:
        raise ValueError(f"student and teacher shapes differ: video {tuple(student_video.shape)} vs "
                         f"{tuple(teacher_video.shape)}, audio {tuple(student_audio.shape)} vs {tuple(teacher_audio.shape)}")
    if student_video.shape[0] != student_audio.shape[0]:
        raise ValueError(f"video and audio sample counts differ: {student_video.shape[0]} vs {student_audio.shape[0]}")
    if student_video.shape[0] < 2:
        raise ValueError("need at least 2 samples (diversity and spreads are undefined for one)")
    if student_video.shape[2] < MIN_FRAMES or student_audio.shape[1] < MIN_FRAMES:
        raise ValueError(f"need at least {MIN_FRAMES} video latent frames and audio latent rows, got "
                         f"{student_video.shape[2]} and {student_audio.shape[1]}")
