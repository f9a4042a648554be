"""MMAudio's 16 kHz log-mel front-end (the input of the audio VAE, the output its decoder imitates).

Facts from spec/data.md §3.1 and golden/mmaudio_vae_tiny.json["mel_parameters"]: reflect-pad
(n_fft - hop)/2 then an uncentred STFT, so a clip of N samples gives floor(N / hop) frames; the
magnitude carries a 1e-9 floor inside the square root; the mel is log10 clamped at 1e-5 (silence
reads -5). The filterbank is librosa's Slaney one, built here in float64 and rounded once to
float32: that matches the stored basis to ~2e-9, whereas torchaudio's `melscale_fbanks` (which
works in float32) is off by ~1e-7.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 16_000
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8_000.0
    magnitude_eps: float = 1e-9
    log_floor: float = 1e-5

    @property
    def pad(self) -> int:
        return (self.n_fft - self.hop_length) // 2


# Slaney's auditory scale: linear below 1 kHz, logarithmic above (librosa's htk=False).
_SLANEY_F_SP = 200.0 / 3.0
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def hz_to_slaney_mel(hz: Tensor) -> Tensor:
    # The clamp keeps log() finite on the entries torch.where then takes from the linear branch.
    log_part = _SLANEY_MIN_LOG_MEL + torch.log(hz.clamp(min=_SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
    return torch.where(hz >= _SLANEY_MIN_LOG_HZ, log_part, hz / _SLANEY_F_SP)


def slaney_mel_to_hz(mel: Tensor) -> Tensor:
    log_part = _SLANEY_MIN_LOG_HZ * torch.exp(_SLANEY_LOGSTEP * (mel - _SLANEY_MIN_LOG_MEL))
    return torch.where(mel >= _SLANEY_MIN_LOG_MEL, log_part, _SLANEY_F_SP * mel)


def slaney_mel_filterbank(cfg: MelConfig) -> Tensor:
    """[n_mels, n_fft//2 + 1] float32 triangular filters with Slaney area normalisation."""
    f64 = torch.float64
    fft_hz = torch.linspace(0.0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1, dtype=f64)
    mel_lo, mel_hi = hz_to_slaney_mel(torch.tensor([cfg.f_min, cfg.f_max], dtype=f64)).tolist()
    edges_hz = slaney_mel_to_hz(torch.linspace(mel_lo, mel_hi, cfg.n_mels + 2, dtype=f64))
    widths = edges_hz.diff()
    ramps = edges_hz[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    triangles = torch.minimum(rising, falling).clamp(min=0.0)
    area_norm = 2.0 / (edges_hz[2:] - edges_hz[:-2])
    return (triangles * area_norm[:, None]).to(torch.float32)


def num_mel_frames(num_samples: int, cfg: MelConfig = MelConfig()) -> int:
    return (num_samples + 2 * cfg.pad - cfg.n_fft) // cfg.hop_length + 1


@functools.lru_cache(maxsize=8)
def mel_constants(cfg: MelConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """(mel filterbank, periodic Hann window), float32 on `device`, built once per config/device."""
    basis = slaney_mel_filterbank(cfg).to(device)
    window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float32, device=device)
    return basis, window


class LogMel(nn.Module):
    """waveform [B, N] (mono, nominally in [-1, 1]) -> log10 mel [B, n_mels, floor(N / hop)], float32.

    Holds no buffers: the constants live in a float32 cache, so casting a model that contains this
    module to bf16 cannot round the filterbank; callers cast the result to their model's dtype.
    """

    def __init__(self, cfg: MelConfig = MelConfig()):
        super().__init__()
        self.cfg = cfg

    def forward(self, waveform: Tensor) -> Tensor:
        if waveform.ndim != 2:
            raise ValueError(f"LogMel expects a waveform [B, N], got shape {tuple(waveform.shape)}")
        cfg = self.cfg
        if waveform.shape[-1] <= cfg.pad:
            raise ValueError(f"waveform has {waveform.shape[-1]} samples; reflect padding needs more than {cfg.pad}")
        mel_basis, window = mel_constants(cfg, waveform.device)
        x = waveform.float().clamp(-1.0, 1.0)
        x = F.pad(x.unsqueeze(1), (cfg.pad, cfg.pad), mode="reflect").squeeze(1)
        spec = torch.stft(
            x, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=window,
            center=False, normalized=False, onesided=True, return_complex=True,
        )
        magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + cfg.magnitude_eps)
        return torch.log10(torch.matmul(mel_basis, magnitude).clamp(min=cfg.log_floor))
