"""Building blocks of MMAudio's 1-D audio VAE: EDM2 magnitude-preserving convolutions and layers.

Attribute names (conv1, nin_shortcut, qkv, proj_out, down.{i}.block, mid.block_1, up.{i}.upsample,
learnable_gain ...) mirror the official module tree because they are the checkpoint keys
(golden/mmaudio_vae_full_keys.json). The layout is fixed by the official VAE: ch_mult (1, 2, 4),
2 res blocks per level (3 in the decoder), attention only in the mid blocks, one 2x time
down/upsample after level 0 / before level 0, activations clamped to +-256.

"Magnitude preserving" (Karras et al., EDM2): weights are normalised per output channel so unit-
variance inputs stay unit-variance; silu is rescaled by 1/0.596 and residual sums by
1/sqrt((1-t)^2 + t^2) for the same reason.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MP_EPS = 1e-4
MP_SILU_SCALE = 0.596
RESIDUAL_BLEND = 0.3
CLIP_ACT = 256.0
CH_MULT = (1, 2, 4)
NUM_RES_BLOCKS = 2
DOWN_LEVELS = (0,)  # the encoder halves time after level 0; the decoder doubles it after level 1


def mp_normalize(x: Tensor, dim: Sequence[int] | int, eps: float = MP_EPS) -> Tensor:
    """x / (eps + ||x|| / sqrt(n)), the norm over `dim` of n elements (an RMS norm with eps outside)."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    return F.silu(x) / MP_SILU_SCALE


def mp_sum(a: Tensor, b: Tensor, t: float) -> Tensor:
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def bake_mp_weight(weight: Tensor) -> Tensor:
    """The official remove_weight_norm(): w / (||w[o]|| + eps * sqrt(in * k)), computed in float32.

    A checkpoint stores raw weights; the forward pass uses these normalised ones.
    """
    w = weight.to(torch.float32)
    fan_in = w[0].numel()
    w = mp_normalize(w, dim=list(range(1, w.ndim))) / math.sqrt(fan_in)
    return w.to(weight.dtype)


class MPConv1D(nn.Module):
    """Bias-free 'same' conv whose weight must already be baked (see `bake_mp_weight`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size))

    def forward(self, x: Tensor, gain: Tensor | None = None) -> Tensor:
        w = self.weight if gain is None else self.weight * gain
        return F.conv1d(x, w, padding=w.shape[-1] // 2)


class ResnetBlock1D(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = MPConv1D(in_dim, out_dim, kernel_size)
        self.conv2 = MPConv1D(out_dim, out_dim, kernel_size)
        self.nin_shortcut = MPConv1D(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: Tensor) -> Tensor:
        x = mp_normalize(x, dim=1)  # pixel norm: the skip path is normalised too
        h = self.conv2(mp_silu(self.conv1(mp_silu(x))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return mp_sum(x, h, RESIDUAL_BLEND)


class AttnBlock1D(nn.Module):
    """Single-head self-attention over time with cosine-normalised q, k, v."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = MPConv1D(channels, channels * 3, 1)
        self.proj_out = MPConv1D(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, length = x.shape
        # qkv channels are interleaved per feature: index c*3 + {0: q, 1: k, 2: v}.
        y = self.qkv(x).reshape(b, self.num_heads, -1, 3, length)
        q, k, v = mp_normalize(y, dim=2).unbind(3)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = h.transpose(-1, -2).reshape(b, -1, length)
        return mp_sum(x, self.proj_out(h), RESIDUAL_BLEND)


class Downsample1D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = MPConv1D(channels, channels, 1)
        self.conv2 = MPConv1D(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.avg_pool1d(self.conv1(x), kernel_size=2, stride=2))  # floors odd lengths


class Upsample1D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = MPConv1D(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock1D(channels, channels)
        self.attn_1 = AttnBlock1D(channels)
        self.block_2 = ResnetBlock1D(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x))).clamp(-CLIP_ACT, CLIP_ACT)


class Level(nn.Module):
    """One resolution: res blocks (clamped after each), then an optional time resampler.

    The official checkpoint names the resampler `downsample` (encoder) or `upsample` (decoder); it
    also has an always-empty `attn` list (attention levels never match), which owns no keys.
    """

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int):
        super().__init__()
        dims = [in_dim] + [out_dim] * num_blocks
        self.block = nn.ModuleList(ResnetBlock1D(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x).clamp(-CLIP_ACT, CLIP_ACT)
        for name in ("downsample", "upsample"):
            resample = getattr(self, name, None)
            if resample is not None:
                x = resample(x)
        return x


class Encoder1D(nn.Module):
    """mel [B, in_dim, T] -> moments [B, 2*embed_dim, T//2] (mean then logvar)."""

    def __init__(self, dim: int, in_dim: int, embed_dim: int, kernel_size: int = 3):
        super().__init__()
        self.learnable_gain = nn.Parameter(torch.zeros([]))
        self.conv_in = MPConv1D(in_dim, dim, kernel_size)
        in_mult = (1,) + CH_MULT
        self.down = nn.ModuleList()
        for i, mult in enumerate(CH_MULT):
            level = Level(dim * in_mult[i], dim * mult, NUM_RES_BLOCKS)
            if i in DOWN_LEVELS:
                level.downsample = Downsample1D(dim * mult)
            self.down.append(level)
        self.mid = MidBlock(dim * CH_MULT[-1])
        self.conv_out = MPConv1D(dim * CH_MULT[-1], 2 * embed_dim, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = mp_silu(self.mid(h))
        return self.conv_out(h, gain=self.learnable_gain + 1)


class Decoder1D(nn.Module):
    """latent [B, embed_dim, L] -> normalised mel [B, out_dim, 2L]."""

    def __init__(self, dim: int, embed_dim: int, out_dim: int, kernel_size: int = 3):
        super().__init__()
        self.learnable_gain = nn.Parameter(torch.zeros([]))
        top = dim * CH_MULT[-1]
        self.conv_in = MPConv1D(embed_dim, top, kernel_size)
        self.mid = MidBlock(top)
        # Built top-down (level 2 first) but indexed bottom-up, as the checkpoint numbers them.
        levels: list[Level] = []
        block_in = top
        for i in reversed(range(len(CH_MULT))):
            level = Level(block_in, dim * CH_MULT[i], NUM_RES_BLOCKS + 1)
            block_in = dim * CH_MULT[i]
            if i - 1 in DOWN_LEVELS:
                level.upsample = Upsample1D(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.conv_out = MPConv1D(dim * CH_MULT[0], out_dim, kernel_size)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(mp_silu(h), gain=self.learnable_gain + 1)
