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

Fast decode (issue 5). The decoder may also take several latent frames per call
(`WanVAEModel.decode(chunk=...)`): every layer is causal in time or per-frame, so a call on frames
[i, j) with the cache of frames [0, i) computes the same numbers as j - i one-frame calls (up to
the summation order the conv algorithms pick). The first-frame special case (frame 0 expands to
one pixel frame, and the frame after it sees zeros, not frame 0, in the temporal upsamplers) is
kept inside a multi-frame first chunk. Other levers: channels-last activations and weights
(`decoder_memory_format`), each 3-D conv as a 2-D conv over its stacked time taps
(`decode(conv_as_2d=True)`), and fused element-wise kernels (`compile_decoder_ops`: RMSNorm + SiLU
as one torch.compile kernel). The defaults (one frame per call, contiguous, eager) are the
official computation.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 2                    # pixel patchify 2x2 before the encoder / after the decoder
RGB_CHANNELS = 3
PATCHED_CHANNELS = RGB_CHANNELS * PATCH * PATCH

# Per-layer memory of earlier chunks, keyed by the layer itself. One dict per encode/decode call.
CausalCache = dict[nn.Module, torch.Tensor]


def _rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    return F.normalize(x, dim=1) * scale * gamma


def _rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    return F.silu(F.normalize(x, dim=1) * scale * gamma)


# The element-wise steps, swappable for torch.compile'd versions (`compile_decoder_ops`). Eager, they
# are exactly the op sequence of RMSNorm followed by nn.SiLU.
OPS = SimpleNamespace(rms_norm=_rms_norm, rms_norm_silu=_rms_norm_silu)
_EAGER_OPS = dict(vars(OPS))


def compile_decoder_ops(enabled: bool = True) -> None:
    """Fuse each RMSNorm (+ SiLU) into one kernel with torch.compile (GPU; encoder and decoder).

    Only these pure functions are compiled: the convolutions stay cuDNN calls and the causal cache
    stays in Python. Shapes change with the chunk and the stage, so the graphs are compiled with
    dynamic shapes (one per memory layout and one-frame-or-more: a handful). The compiled version
    multiplies by (gamma * scale) once, so it equals the eager one up to rounding."""
    if not enabled:
        for name, fn in _EAGER_OPS.items():
            setattr(OPS, name, fn)
        return
    if not _COMPILED_OPS:   # built once: turning it off and on again reuses the compiled graphs
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        norm = torch.compile(lambda x, g: F.normalize(x, dim=1) * g, dynamic=True)
        norm_silu = torch.compile(lambda x, g: F.silu(F.normalize(x, dim=1) * g), dynamic=True)
        # gamma * scale outside the graph: a float argument would be specialised (one graph per width)
        _COMPILED_OPS.update(rms_norm=lambda x, gamma, scale: norm(x, gamma * scale),
                             rms_norm_silu=lambda x, gamma, scale: norm_silu(x, gamma * scale))
    for name, fn in _COMPILED_OPS.items():
        setattr(OPS, name, fn)


_COMPILED_OPS: dict = {}


# On while a decode runs with conv_as_2d=True (CausalConv3d then uses `_as_conv2d`).
_CONV_AS_2D = {"on": False}


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when x is laid out NDHWC (and not trivially also NCDHW), else contiguous."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


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


# cuDNN convs (per sample) and some CUDA kernels (NHWC nearest upsampling) index with 32 bits: larger
# calls are cut into pieces along time/frames (same numbers; only happens for big decode chunks).
MAX_ELEMENTS = 2**31 - 1
PER_FRAME_GROWTH = 4   # the largest output/input size ratio of a per-frame op (x2 spatial upsampling)


def per_frame(fn, x: torch.Tensor, growth: int | None = PER_FRAME_GROWTH) -> torch.Tensor:
    """Apply a 2-D (NCHW) op to every frame of a [B,C,T,H,W] tensor (in pieces of frames whose
    input times `growth` fits MAX_ELEMENTS; growth=None: one call, for ops that split themselves)."""
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    step = b * t if growth is None else max(1, MAX_ELEMENTS // (growth * c * h * w))
    if step >= b * t:
        y = fn(frames)
    else:
        y = torch.cat([fn(frames[i:i + step]) for i in range(0, b * t, step)], dim=0)
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


# ----------------------------------------------------------------------------- layers

class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding is all on the past side, fed from a `CausalCache` when chunked."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        # spatial zero padding inside the conv (no padded copy of the input); time padding is causal
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, pad_h, pad_w))
        self.past_frames = 2 * pad_t

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.past_frames:
            past = None if cache is None else cache.get(self)
            if past is None:
                b, c, _, h, w = x.shape
                past = torch.empty((b, c, self.past_frames, h, w), dtype=x.dtype, device=x.device,
                                   memory_format=_memory_format(x)).zero_()
            x = torch.cat([past, x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -self.past_frames:].clone()
        if _CONV_AS_2D["on"] and self.stride[0] == 1:
            return self._as_conv2d(x)
        return self._conv3d(x)

    def _conv3d(self, x: torch.Tensor) -> torch.Tensor:
        """The 3-D conv, cut along output time when one sample is too large for cuDNN's 32-bit indexing."""
        kt, st = self.kernel_size[0], self.stride[0]
        c, t, h, w = x.shape[1:]
        frames_out = (t - kt) // st + 1
        per_frame_elems = max(c, self.out_channels) * h * w
        step = (MAX_ELEMENTS // per_frame_elems - kt) // st + 1   # output frames whose input fits
        if st != 1 or step >= frames_out or step < 1:
            return super().forward(x)
        return torch.cat([super(CausalConv3d, self).forward(x[:, :, i:i + step + kt - 1])
                          for i in range(0, frames_out, step)], dim=2)

    def _as_conv2d(self, x: torch.Tensor) -> torch.Tensor:
        """The same sums as the 3-D conv, as one 2-D conv per output frame: the kt temporal taps
        stacked into channels (tap-major) against the weight [out, kt*in, kh, kw]."""
        kt = self.kernel_size[0]
        frames = x.shape[2] - kt + 1
        taps = x if kt == 1 else torch.cat([x[:, :, i:i + frames] for i in range(kt)], dim=1)
        fmt = torch.channels_last if _memory_format(taps) == torch.channels_last_3d else torch.contiguous_format
        key = (self.weight.data_ptr(), self.weight._version, fmt)
        if getattr(self, "_weight_2d", (None,))[0] != key:
            weight = self.weight.transpose(1, 2).reshape(self.out_channels, kt * self.in_channels, *self.kernel_size[1:])
            self._weight_2d = (key, weight.contiguous(memory_format=fmt))
        weight = self._weight_2d[1]
        # F.conv2d cuts its batch (the frames) for cuDNN's 32-bit indexing itself
        return per_frame(lambda f: F.conv2d(f, weight, self.bias, self.stride[1:], self.padding[1:]), taps,
                         growth=None)


class RMSNorm(nn.Module):
    """Channel RMS norm: F.normalize over channels * sqrt(C) * gamma (official `RMS_norm`, no bias)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OPS.rms_norm(x, self.gamma, self.scale)


def _norm_silu(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return OPS.rms_norm_silu(x, norm.gamma, norm.scale)


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
        norm1, _, conv1, norm2, _, _, conv2 = self.residual   # SiLU and the dropout slot are fused/skipped
        x = conv1(_norm_silu(norm1, x), cache)
        x = conv2(_norm_silu(norm2, x), cache)
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
        y = self.time_conv(x, cache)
        # the two halves of the channels are frames 2t and 2t+1 (written in y's own memory layout)
        out = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=_memory_format(y))
        out[:, :, 0::2] = y[:, :c]
        out[:, :, 1::2] = y[:, c:]
        return out

    def _halve_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        past = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if past is None:   # first chunk: a single frame passes through, as in the official encoder
            return x
        return self.time_conv(torch.cat([past, x], dim=2))

    def forward(self, x: torch.Tensor, cache: CausalCache, first_chunk: bool = False) -> torch.Tensor:
        if self.mode == "upsample3d":
            if not first_chunk:
                x = self._double_frames(x, cache)
            elif x.shape[2] > 1:
                # frame 0 passes through undoubled; the frames after it start the temporal cache
                # from zeros (the official "Rep" marker), exactly as when they come one per call
                x = torch.cat([x[:, :, :1], self._double_frames(x[:, :, 1:], cache)], dim=2)
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
    norm, _, conv = head
    return conv(_norm_silu(norm, x), cache)


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
        fmt = _memory_format(x)   # keep a channels-last decode channels-last through the reshuffles
        x = _run_middle(self.middle, self.conv1(x, cache), cache)
        for stage in self.upsamples:
            x = stage(x, cache, first_chunk).contiguous(memory_format=fmt)
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

    def decode(self, mu: torch.Tensor, chunk: int = 1, first_alone: bool = True,
               channels_last: bool = False, conv_as_2d: bool = False) -> torch.Tensor:
        """Posterior mean [B,z,T,h,w] -> unclamped pixels [B,3,1+4(T-1),16h,16w].

        chunk: latent frames per decoder call (1: the official frame-by-frame decode; more keeps a
        GPU busier, same numbers up to summation order). first_alone: frame 0 gets its own call
        and the rest go `chunk` at a time (31 latent frames = 1 + 5 calls of 6: equal shapes for
        cuDNN autotuning and compile); False: the first call takes frames 0..chunk-1.
        channels_last: run the decoder on NDHWC activations (pair with `decoder_memory_format`).
        conv_as_2d: every temporal conv as a 2-D conv over its time taps stacked into channels
        (`CausalConv3d._as_conv2d`: one big tensor-core GEMM per conv, kt x its input in memory).
        """
        x = self.conv2(mu)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        cache: CausalCache = {}
        before, _CONV_AS_2D["on"] = _CONV_AS_2D["on"], conv_as_2d
        try:
            frames = [self.decoder(x[:, :, start:stop], cache, first_chunk=start == 0)
                      for start, stop in decode_chunks(x.shape[2], chunk, first_alone)]
        finally:
            _CONV_AS_2D["on"] = before
        return unpatchify(torch.cat(frames, dim=2))

    def decoder_memory_format(self, channels_last: bool = True) -> WanVAEModel:
        """Lay the decoder's conv weights out channels-last (NDHWC / NHWC), or back (in place)."""
        for module in (self.conv2, self.decoder):
            for sub in module.modules():
                if isinstance(sub, (nn.Conv3d, nn.Conv2d)):
                    fmt = ((torch.channels_last_3d if isinstance(sub, nn.Conv3d) else torch.channels_last)
                           if channels_last else torch.contiguous_format)
                    sub.weight.data = sub.weight.data.contiguous(memory_format=fmt)
        return self


def decode_chunks(num_frames: int, chunk: int = 1, first_alone: bool = True) -> list[tuple[int, int]]:
    """[start, stop) latent-frame ranges of the decoder calls."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    start = 1 if first_alone and num_frames > 0 else 0
    bounds = [(0, 1)] if start else []
    bounds += [(i, min(i + chunk, num_frames)) for i in range(start, num_frames, chunk)]
    return bounds


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
