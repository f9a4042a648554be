"""Wan2.2 48-channel video VAE (the TI2V-5B / Ovi VAE): load `Wan2.2_VAE.pth`, encode, decode.

Choice: our own module code (`wan_vae_modules.py`), not diffusers' `AutoencoderKLWan`.
  * Its attribute names are the official checkpoint keys, so `Wan2.2_VAE.pth` loads strictly with
    no key conversion and the full-size key manifest (golden/wan22_vae_full_keys.json) is checked
    directly against it.
  * It matches the official code on golden/wan22_vae_tiny (tests/test_wan_vae.py).
  * We own the decode path, which a later issue makes fast (bf16, channels-last, compile).
  * No diffusers dependency in precompute (diffusers' 2.2 config also needs patching, spec/data.md §1.5).

Contract (spec/data.md §1, golden/README §2): pixels in [-1, 1], `[B,3,F,H,W]` with F = 4k+1 and
H, W multiples of 16 -> latent `[B,48,1+k,H/16,W/16]`, normalised per channel as
`(mu - mean) * inv_std` with inv_std = float32(1/std) (bit-exact with the official wrapper).
The official code silently drops frames past 4k+1; we refuse such input instead.
Normalisation always runs in float32, whatever dtype the model runs in (Ovi runs the VAE in bf16).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from precompute.checkpoints import CheckpointError, check_state_dict, read_torch_state_dict  # noqa: F401 (re-export)
from precompute.encoders.wan_vae_modules import RGB_CHANNELS, WanVAEConfig, WanVAEModel

# Per-channel statistics of the raw posterior mean (Wan2_2_VAE.__init__; identical in Ovi).
LATENT_MEAN_48 = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENT_STD_48 = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
CHECKPOINT_NAME = "Wan2.2_VAE.pth"


def latent_constants(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, inv_std), float32 [48]. inv_std = 1/std computed in float32, as the official wrapper."""
    mean = torch.tensor(LATENT_MEAN_48, dtype=torch.float32, device=device)
    std = torch.tensor(LATENT_STD_48, dtype=torch.float32, device=device)
    return mean, 1.0 / std


def normalize_latent(mu: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    return (mu.float() - mean.view(1, -1, 1, 1, 1)) * inv_std.view(1, -1, 1, 1, 1)


def denormalize_latent(z: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    # divide by inv_std (not multiply by std) to stay bit-exact with the official decode
    return z.float() / inv_std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)


# ----------------------------------------------------------------------------- checkpoint

def build_on_meta(config: WanVAEConfig) -> WanVAEModel:
    with torch.device("meta"):
        return WanVAEModel(config)


# ----------------------------------------------------------------------------- input checks

def _check_video(video: torch.Tensor, temporal_stride: int, spatial_stride: int) -> None:
    if video.dim() != 5 or video.shape[1] != RGB_CHANNELS:
        raise ValueError(f"video must be [B,3,F,H,W], got {list(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a float tensor in [-1, 1], got {video.dtype}")
    frames, height, width = video.shape[2:]
    if (frames - 1) % temporal_stride:
        raise ValueError(f"video frame count must be {temporal_stride}k+1, got {frames} "
                         f"(the official VAE would silently drop the last {(frames - 1) % temporal_stride})")
    if height % spatial_stride or width % spatial_stride:
        raise ValueError(f"video H and W must be multiples of {spatial_stride}, got {height}x{width}")


@dataclass(frozen=True)
class DecodeOptions:
    """How `WanVideoVAE.decode` runs (speed and memory only; see wan_vae_modules' docstring).

    chunk: latent frames per decoder call (1 = the official frame-by-frame decode). On a GPU a
        larger chunk gives every conv `4 * chunk` frames of work instead of 4; memory grows
        ~linearly with it (at 704x704 in bf16 roughly 2-3 GiB per latent frame of chunk).
    first_alone: frame 0 in its own call, the rest `chunk` at a time (equal shapes).
    channels_last: NDHWC activations and weights (tensor-core friendly convs on GPU).
    conv_as_2d: each causal 3-D conv as one 2-D conv over its time taps stacked into channels
        (cuDNN's 2-D kernels are the most tuned; costs kt x the conv's input in memory).
    Fused element-wise kernels are global: `wan_vae_modules.compile_decoder_ops()`.
    """
    chunk: int = 1
    first_alone: bool = True
    channels_last: bool = False
    conv_as_2d: bool = False

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")


class WanVideoVAE:
    """The Wan2.2 VAE with Ovi's latent normalisation: what precompute encodes with and sampling decodes with."""

    def __init__(self, model: WanVAEModel):
        self.model = model.eval().requires_grad_(False)
        self._decoder_channels_last = False
        device = next(model.parameters()).device
        self.latent_mean, self.latent_inv_std = latent_constants(device)
        self.latent_std = torch.tensor(LATENT_STD_48, dtype=torch.float32, device=device)

    @property
    def config(self) -> WanVAEConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @classmethod
    def from_file(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  config: WanVAEConfig = WanVAEConfig()) -> WanVideoVAE:
        """Load the official `Wan2.2_VAE.pth` (plain float32 state dict) strictly; errors name file and keys."""
        path = Path(path)
        state = read_torch_state_dict(path, what="Wan2.2 VAE checkpoint")
        model = build_on_meta(config)
        check_state_dict(state, model.state_dict(), str(path), what="the Wan2.2 VAE for this config")
        model.load_state_dict(state, strict=True, assign=True)
        return cls(model.to(device=device, dtype=dtype))

    @classmethod
    def tiny(cls, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> WanVideoVAE:
        """Same code at the golden fixture's widths, with seeded N(0, 0.02) weights (as the fixture)."""
        gen = torch.Generator().manual_seed(seed)
        model = WanVAEModel(WanVAEConfig.tiny())
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.normal_(0.0, 0.02, generator=gen)
        return cls(model.to(device=device, dtype=dtype))

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B,3,4k+1,H,W] in [-1,1] -> normalised latent mean [B,48,1+k,H/16,W/16], float32."""
        _check_video(video, self.config.temporal_stride, self.config.spatial_stride)
        mu = self.model.encode(video.to(device=self.device, dtype=self.dtype))
        return normalize_latent(mu, self.latent_mean, self.latent_inv_std)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B,3,H,W] or [B,3,1,H,W] in [-1,1] -> normalised latent [B,48,1,H/16,W/16] (the i2v condition)."""
        if image.dim() == 4:
            image = image.unsqueeze(2)
        if image.dim() != 5 or image.shape[2] != 1:
            raise ValueError(f"image must be [B,3,H,W] or [B,3,1,H,W], got {list(image.shape)}")
        return self.encode(image)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, clamp: bool = True, options: DecodeOptions = DecodeOptions()) -> torch.Tensor:
        """Normalised latent [B,48,T,h,w] -> video [B,3,1+4(T-1),16h,16w] float32, clamped to [-1,1] unless clamp=False.

        `options` only changes speed and memory (chunking, layout); the numbers equal the default
        frame-by-frame decode up to floating-point summation order."""
        if latent.dim() != 5 or latent.shape[1] != self.config.z_dim:
            raise ValueError(f"latent must be [B,{self.config.z_dim},T,h,w], got {list(latent.shape)}")
        if options.channels_last != self._decoder_channels_last:
            self.model.decoder_memory_format(options.channels_last)
            self._decoder_channels_last = options.channels_last
        mu = denormalize_latent(latent.to(self.device), self.latent_mean, self.latent_inv_std)
        video = self.model.decode(mu.to(self.dtype), chunk=options.chunk, first_alone=options.first_alone,
                                  channels_last=options.channels_last, conv_as_2d=options.conv_as_2d).float()
        return video.clamp_(-1.0, 1.0) if clamp else video
