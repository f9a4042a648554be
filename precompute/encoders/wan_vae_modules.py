"""The Wan2.2 48-channel video VAE as nn.Modules (our own code, written from golden/README §2,
golden/wan22_vae_tiny.json and spec/data.md §1).

Attribute names are the official ones because the checkpoint keys are made of them
(`encoder.downsamples.0.downsamples.0.residual.0.gamma`, ...): `Wan2.2_VAE.pth` then loads with
`strict=True` and no key conversion. Sequential indices (`residual.2`, `resample.1`, `head.2`) are
part of those keys, so parameter-free layers keep their slots.

Causality. Every temporal kernel sees only the past. The model is run on chunks of time (the
encoder on frame 0 and then 4-frame chunks, the decoder one latent frame at a time); a
`CausalCache` carries, per layer, the frames that layer needs from earlier chunks. Missing history
is zeros, which is exactly the official left zero-padding, so the chunked result equals the
official chunked result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 2                    # pixel patchify 2x2 before the encoder / after the decoder
RGB_CHANNELS = 3
PATCHED_CHANNELS = RGB_CHANNELS * PATCH * PATCH

# Per-layer memory of earlier chunks, keyed by the layer itself. One dict per encode/decode call.
CausalCache = dict[nn.Module, torch.Tensor]


@dataclass(frozen=True)
class WanVAEConfig:
    dim: int = 160                       # encoder base width (official `dim` / wrapper `c_dim`)
    dec_dim: int = 256                   # decoder base width (official default; Wan never passes it)
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @classmethod
    def real(cls) -> WanVAEConfig:
        return cls()

    @classmethod
    def tiny(cls) -> WanVAEConfig:
        """The golden fixture's shrunk widths; depth, z_dim and strides as the real model."""
        return cls(dim=4, dec_dim=6)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return PATCH * 2 ** (len(self.dim_mult) - 1)


# ----------------------------------------------------------------------------- pixel patchify

def patchify(video: torch.Tensor) -> torch.Tensor:
    """[B,C,F,H,W] -> [B,C*4,F,H/2,W/2]; channel = c*4 + r*2 + q (r: W offset, q: H offset)."""
    b, c, f, h, w = video.shape
    x = video.view(b, c, f, h // PATCH, PATCH, w // PATCH, PATCH)       # b c f h q w r
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, f, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, cp, f, h, w = x.shape
    c = cp // (PATCH * PATCH)
    x = x.view(b, c, PATCH, PATCH, f, h, w)                              # b c r q f h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c, f, h * PATCH, w * PATCH)


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D (NCHW) op to every frame of a [B,C,T,H,W] tensor."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


# ----------------------------------------------------------------------------- layers

class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding is all on the past side, fed from a `CausalCache` when chunked."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.past_frames = 2 * pad_t
        self.spatial_padding = (pad_w, pad_w, pad_h, pad_h)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.past_frames:
            past = None if cache is None else cache.get(self)
            if past is None:
                b, c, _, h, w = x.shape
                past = x.new_zeros(b, c, self.past_frames, h, w)
            x = torch.cat([past, x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -self.past_frames:].clone()
        return super().forward(F.pad(x, self.spatial_padding))


class RMSNorm(nn.Module):
    """Channel RMS norm: F.normalize over channels * sqrt(C) * gamma (official `RMS_norm`, no bias)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(),
            nn.Identity(),  # slot of the official Dropout(0.0): keeps `residual.6` as the second conv
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        skip = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.squeeze(1).permute(0, 2, 1).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(self._attend, x) + x


class Resample(nn.Module):
    """Spatial x2 down/up sampling, optionally with a causal temporal x2 (`time_conv`)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown Resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _double_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache).view(b, 2, c, t, h, w)
        # the two halves of the channels are frames 2t and 2t+1
        return torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c, 2 * t, h, w)

    def _halve_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        past = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if past is None:   # first chunk: a single frame passes through, as in the official encoder
            return x
        return self.time_conv(torch.cat([past, x], dim=2))

    def forward(self, x: torch.Tensor, cache: CausalCache, first_chunk: bool = False) -> torch.Tensor:
        if self.mode == "upsample3d" and not first_chunk:
            x = self._double_frames(x, cache)
        x = per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x


class AvgDown3D(nn.Module):
    """Parameter-free shortcut: fold time/space into channels, then average channel groups."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.group = in_dim * factor_t * factor_s * factor_s // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut: repeat channels, then unfold them into time/space."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        # the first latent frame stands for one pixel frame, not factor_t of them
        return x[:, :, ft - 1:] if first_chunk else x


class DownResidualBlock(nn.Module):
    """Encoder stage: residual blocks (+ Resample), plus the AvgDown3D shortcut over the stage."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if spatial else 1)
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim)
                                   for i in range(num_blocks)]
        if spatial:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        skip = self.avg_shortcut(x)
        for layer in self.downsamples:
            x = layer(x, cache)
        return x + skip


class UpResidualBlock(nn.Module):
    """Decoder stage: residual blocks (+ Resample), plus the DupUp3D shortcut when it upsamples."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.avg_shortcut = (DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if spatial else None)
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim)
                                   for i in range(num_blocks)]
        if spatial:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: CausalCache, first_chunk: bool) -> torch.Tensor:
        y = x
        for layer in self.upsamples:
            y = layer(y, cache, first_chunk) if isinstance(layer, Resample) else layer(y, cache)
        return y if self.avg_shortcut is None else y + self.avg_shortcut(x, first_chunk)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))


def _run_middle(middle: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    for layer in middle:
        x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
    return x


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    for layer in head:
        x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
    return x


class Encoder3d(nn.Module):
    """Patchified pixels [B,12,T,H/2,W/2] -> [B, 2*z_dim, T', H/16, W/16] (mu and log-variance)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(PATCHED_CHANNELS, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownResidualBlock(dims[i], dims[i + 1], cfg.num_res_blocks,
                              temporal=i < len(cfg.temporal_downsample) and cfg.temporal_downsample[i],
                              spatial=i != last)
            for i in range(len(cfg.dim_mult))))
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], cfg.z_dim * 2)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache)
        return _run_head(self.head, _run_middle(self.middle, x, cache), cache)


class Decoder3d(nn.Module):
    """Latent [B, z_dim, T, h, w] -> patchified pixels [B, 12, T', 8h, 8w]."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mults = cfg.dim_mult[::-1]
        dims = [cfg.dec_dim * m for m in (mults[0], *mults)]
        temporal_upsample = cfg.temporal_downsample[::-1]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        self.upsamples = nn.Sequential(*(
            UpResidualBlock(dims[i], dims[i + 1], cfg.num_res_blocks + 1,
                            temporal=i < len(temporal_upsample) and temporal_upsample[i],
                            spatial=i != last)
            for i in range(len(cfg.dim_mult))))
        self.head = _head(dims[-1], PATCHED_CHANNELS)

    def forward(self, x: torch.Tensor, cache: CausalCache, first_chunk: bool) -> torch.Tensor:
        x = _run_middle(self.middle, self.conv1(x, cache), cache)
        for stage in self.upsamples:
            x = stage(x, cache, first_chunk)
        return _run_head(self.head, x, cache)


class WanVAEModel(nn.Module):
    """Raw (un-normalised) Wan2.2 VAE: `encode` returns the posterior mean, `decode` inverts it.

    State-dict keys equal the official `WanVAE_` keys (`encoder.*`, `conv1.*`, `conv2.*`, `decoder.*`).
    """

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B,3,1+4k,H,W] -> posterior mean [B,z,1+k,H/16,W/16]; frame 0 alone, then 4-frame chunks."""
        x = patchify(video)
        stride = self.config.temporal_stride
        chunks = [x[:, :, :1]] + [x[:, :, i:i + stride] for i in range(1, x.shape[2], stride)]
        cache: CausalCache = {}
        # conv1 is pointwise in time; applying it per chunk makes latent frame 0 bitwise the same
        # whether the first frame is encoded alone (i2v image) or as the head of a clip
        out = torch.cat([self.conv1(self.encoder(chunk, cache)) for chunk in chunks], dim=2)
        mu, _log_var = out.chunk(2, dim=1)
        return mu

    def decode(self, mu: torch.Tensor) -> torch.Tensor:
        """Posterior mean [B,z,T,h,w] -> unclamped pixels [B,3,1+4(T-1),16h,16w], one latent frame per call."""
        x = self.conv2(mu)
        cache: CausalCache = {}
        frames = [self.decoder(x[:, :, i:i + 1], cache, first_chunk=i == 0) for i in range(x.shape[2])]
        return unpatchify(torch.cat(frames, dim=2))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
