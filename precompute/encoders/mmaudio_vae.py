"""MMAudio's 16 kHz audio VAE as Ovi uses it: waveform -> log-mel -> latent mean [B, L, 20].

Ovi (spec/ovi.md §4.2, spec/data.md §3.3) encodes with the posterior *mean* (no sampling, no latent
scaling) and its DiT consumes audio channel-last, [L, 20]; `AudioVAE.encode` returns exactly that.
L = floor(floor(N / 256) / 2): 512 samples per latent, so 80,384 samples -> 157 latents.

Official file: `ext_weights/v1-16.pth`, a plain state dict of raw (not yet normalised) MPConv1D
weights plus the `data_mean`/`data_std` mel statistics [1, 80, 1]. Loading is strict, then every
conv weight is baked once (`bake_mp_weight`, the official `remove_weight_norm()`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
from torch import Tensor, nn

from precompute.checkpoints import CheckpointError, check_state_dict, read_torch_state_dict  # noqa: F401 (re-export)
from precompute.encoders.mel import LogMel, MelConfig, num_mel_frames
from precompute.encoders.mmaudio_modules import Decoder1D, Encoder1D, MPConv1D, bake_mp_weight

LOGVAR_RANGE = (-30.0, 20.0)
TIME_DOWNSAMPLE = 2  # latent frames per mel frame: one avg-pool in the encoder
TINY_INIT_STD = 0.02


@dataclass(frozen=True)
class VAEConfig:
    data_dim: int = 80     # mel bins (the 16 kHz mode)
    embed_dim: int = 20    # latent channels, the width of Ovi's audio tokens
    hidden_dim: int = 384  # level-0 width; levels 1, 2 are x2, x4


TINY_VAE = VAEConfig(hidden_dim=12)


def num_latent_frames(num_samples: int, mel_cfg: MelConfig = MelConfig()) -> int:
    """floor(floor(N / 256) / 2): 80,384 samples -> 157; the odd mel frame is dropped."""
    return num_mel_frames(num_samples, mel_cfg) // TIME_DOWNSAMPLE


# ---------------------------------------------------------------------------------------------
# Checkpoint reading and checking (shared with bigvgan.py).

# ---------------------------------------------------------------------------------------------
# The network, with the official key names.

class MMAudioVAE(nn.Module):
    """Official `VAE(data_dim, embed_dim, hidden_dim)`: normalised mel <-> latent moments."""

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        # Real values come from the checkpoint; identity statistics until then.
        self.register_buffer("data_mean", torch.zeros(1, cfg.data_dim, 1))
        self.register_buffer("data_std", torch.ones(1, cfg.data_dim, 1))
        self.encoder = Encoder1D(cfg.hidden_dim, cfg.data_dim, cfg.embed_dim)
        self.decoder = Decoder1D(cfg.hidden_dim, cfg.embed_dim, cfg.data_dim)
        self.weights_baked = False

    def encode_moments(self, mel: Tensor) -> Tensor:
        """log-mel [B, 80, T] -> [B, 2*embed_dim, T//2]: posterior mean then (unclamped) logvar."""
        return self.encoder((mel - self.data_mean) / self.data_std)

    def decode_mel(self, z: Tensor) -> Tensor:
        """latent [B, embed_dim, L] (channels first) -> log-mel [B, 80, 2L], un-normalised."""
        return self.decoder(z) * self.data_std + self.data_mean

    def bake_weights(self) -> None:
        """Official remove_weight_norm(), on raw checkpoint weights; baking twice would rescale again."""
        if self.weights_baked:
            raise RuntimeError("MMAudioVAE weights are already baked")
        self.weights_baked = True
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, MPConv1D):
                    module.weight.copy_(bake_mp_weight(module.weight))


def checkpoint_template(cfg: VAEConfig = VAEConfig()) -> dict[str, Tensor]:
    """Meta tensors with the names, shapes and dtypes a checkpoint for `cfg` must hold."""
    with torch.device("meta"):
        return dict(MMAudioVAE(cfg).state_dict())


class Posterior(NamedTuple):
    """Diagonal Gaussian posterior, channel-last [B, L, embed_dim]; logvar clamped to [-30, 20]."""
    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)


# ---------------------------------------------------------------------------------------------
# Public wrapper.

class AudioVAE(nn.Module):
    """waveform [B, N] 16 kHz mono -> latent [B, L, 20] (Ovi's layout) and back to log-mel."""

    def __init__(self, vae: MMAudioVAE, mel_cfg: MelConfig = MelConfig()):
        super().__init__()
        if mel_cfg.n_mels != vae.cfg.data_dim:
            raise ValueError(f"mel has {mel_cfg.n_mels} bins but the VAE expects {vae.cfg.data_dim}")
        self.mel = LogMel(mel_cfg)
        self.vae = vae.eval().requires_grad_(False)

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Tensor],
        cfg: VAEConfig = VAEConfig(),
        *,
        source: str = "<state dict>",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "AudioVAE":
        """Strictly load raw (checkpoint-format) weights, bake them in float32, then cast."""
        check_state_dict(state, checkpoint_template(cfg), source, what=f"the MMAudio VAE {cfg}")
        with torch.device("meta"):
            vae = MMAudioVAE(cfg)
        vae.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
        vae.bake_weights()
        return cls(vae).to(device=device, dtype=dtype)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cfg: VAEConfig = VAEConfig(),
    ) -> "AudioVAE":
        """Load the official `v1-16.pth` (a plain state dict)."""
        return cls.from_state_dict(read_torch_state_dict(path, what="MMAudio VAE checkpoint"), cfg, source=str(path), device=device, dtype=dtype)

    @classmethod
    def tiny(cls, seed: int = 0, cfg: VAEConfig = TINY_VAE) -> "AudioVAE":
        """Random raw weights, N(0, 0.02) drawn in state-dict order (the golden fixture's recipe)."""
        return cls.from_state_dict(random_checkpoint(cfg, seed), cfg, source=f"tiny(seed={seed})")

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.data_mean.dtype

    def posterior(self, waveform: Tensor) -> Posterior:
        mel = self.mel(waveform).to(self.dtype)
        if mel.shape[-1] < 2:
            raise ValueError(f"waveform of {waveform.shape[-1]} samples is too short for one latent (needs 512)")
        mean, logvar = self.vae.encode_moments(mel).chunk(2, dim=1)
        channel_last = lambda x: x.transpose(1, 2).contiguous()
        return Posterior(channel_last(mean), channel_last(logvar.clamp(*LOGVAR_RANGE)))

    def encode(self, waveform: Tensor) -> Tensor:
        """waveform [B, N] in [-1, 1] -> posterior mean [B, floor(floor(N/256)/2), embed_dim]."""
        return self.posterior(waveform).mean

    def decode(self, latent: Tensor) -> Tensor:
        """latent [B, L, embed_dim] channel-last -> log10 mel [B, 80, 2L] (ready for the vocoder)."""
        if latent.ndim != 3 or latent.shape[-1] != self.vae.cfg.embed_dim:
            raise ValueError(
                f"decode expects a latent [B, L, {self.vae.cfg.embed_dim}], got shape {tuple(latent.shape)}"
            )
        return self.vae.decode_mel(latent.to(self.dtype).transpose(1, 2))


def random_checkpoint(cfg: VAEConfig, seed: int) -> dict[str, Tensor]:
    """A checkpoint-format state dict with N(0, 0.02) parameters and identity mel statistics."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, ref in checkpoint_template(cfg).items():
        if name == "data_mean":
            state[name] = torch.zeros(ref.shape)
        elif name == "data_std":
            state[name] = torch.ones(ref.shape)
        else:
            state[name] = torch.empty(ref.shape).normal_(0.0, TINY_INIT_STD, generator=gen)
    return state
