"""The building blocks of one Ovi tower. Attribute names are the checkpoint's key names.

Every parameter is owned by the module whose forward uses it, so DeepSpeed ZeRO-3 gathers it
in that module's pre-forward hook (a parameter read from another module's forward would be an
empty placeholder under ZeRO-3).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .rope import apply_rope

# cuDNN attention measured ~1.3x faster than the flash backend on H200 at Ovi's shapes
# (spec/perf_eval.md §3.4); OVI_DMD_SDPA=default leaves PyTorch's own choice. "flash" failed in a
# DMD generator backward on 2 H200 (the checkpoint recompute chose another backend than the forward;
# bench/RESULTS.md, DeepCompile): use it to time forward passes, not to train.
_SDPA_PRIORITY = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, N, heads, d] in and out; softmax scale 1/sqrt(d), no mask (Ovi attends to every row)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    priority = _SDPA_PRIORITY.get(os.environ.get("OVI_DMD_SDPA", "cudnn"))
    if q.is_cuda and priority:
        with sdpa_kernel(priority, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, split: int | None) -> torch.Tensor:
    """x·(1+scale)+shift with modulation [B, S, dim] over tokens [B, N, dim].

    split None: S == 1 (one timestep for all tokens) or S == N (per token), plain broadcast.
    split k: S == 2, image-to-video: the first k tokens (latent frame 0, t = 0) use segment 0,
    the rest segment 1. Ovi materialises [B, N, 6, dim] per block; two segments cost a small
    slice write instead.
    """
    if split is None:
        return x * (1 + scale) + shift
    out = x * (1 + scale[:, 1:]) + shift[:, 1:]
    out[:, :split] = x[:, :split] * (1 + scale[:, :1]) + shift[:, :1]
    return out


def gate(y: torch.Tensor, g: torch.Tensor, split: int | None) -> torch.Tensor:
    """y·gate with the same segment convention as `modulate`."""
    if split is None:
        return y * g
    out = y * g[:, 1:]
    out[:, :split] = y[:, :split] * g[:, :1]
    return out


def norm_modulate(x: torch.Tensor, shift, scale, split: int | None, eps: float) -> torch.Tensor:
    """adaLN: non-affine LayerNorm, then modulate."""
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale, split)


def gated_residual(x: torch.Tensor, y: torch.Tensor, g, split: int | None) -> torch.Tensor:
    return x + gate(y, g, split)


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int,
                   cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """q/k RMSNorm over the full width (before the head split, as Ovi does), split, rotate."""
    x = F.rms_norm(x, x.shape[-1:], weight, eps).unflatten(-1, (num_heads, -1))
    return x if cos is None else apply_rope(x, cos, sin)


# The element-wise steps between the matmuls, looked up at call time so that
# `compile_elementwise_ops()` can swap in fused (torch.compile) versions on GPU.
OPS = SimpleNamespace(norm_modulate=norm_modulate, gated_residual=gated_residual,
                      rms_norm_heads=rms_norm_heads, rope=apply_rope)
_EAGER = dict(vars(OPS))


def compile_elementwise_ops(enabled: bool = True) -> None:
    """Fuse each element-wise step (RoPE, q/k norm, adaLN modulate, gated residual) into single
    kernels with torch.compile. Only these pure functions are compiled, so DeepSpeed ZeRO-3's
    module hooks stay outside the graphs."""
    # Static shapes give the best kernels; a run sees few shapes (one bucket: video, audio, text).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for name, fn in _EAGER.items():
        setattr(OPS, name, torch.compile(fn, dynamic=False) if enabled else fn)


class Rope:
    """(cos, sin) tables [N, 1, head_dim/2] for one modality's tokens."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return OPS.rope(x, self.cos, self.sin)


class HeadNorm(nn.Module):
    """RMSNorm over the full width with a learned `weight` (checkpoint key `norm_q.weight` etc.),
    fused with the split into heads and the optional rotation."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        cos, sin = (rope.cos, rope.sin) if rope is not None else (None, None)
        return OPS.rms_norm_heads(x, self.weight, self.eps, self.num_heads, cos, sin)


class PatchEmbed3d(nn.Conv3d):
    """Non-overlapping 3-D patches -> tokens [B, N, dim] in (f, h, w) raster order: Ovi's
    Conv3d(kernel = stride = patch) with its parameters and checkpoint keys (`weight`
    [dim, C, pt, ph, pw], `bias`), computed as one matmul over the unfolded patches.

    Why not the convolution: oneDNN's bf16 Conv3d on CPU returns values it never wrote (NaN,
    1e37, or plain wrong numbers that change from call to call) when the output is one patch
    wide and has more than a few rows (e.g. [48, 5, 6, 2] -> 5x3x1 tokens, the 96x32 bucket of
    the tiny variant; issue 18). A patchify is only a reshape and a GEMM, so this form gives the
    same numbers on every backend and for every shape, with no kernel choice left to go wrong.
    """

    def __init__(self, in_dim: int, dim: int, patch: tuple[int, int, int]):
        super().__init__(in_dim, dim, kernel_size=patch, stride=patch)

    def grid(self, shape: torch.Size) -> tuple[int, int, int]:
        """Token grid (F/pt, H/ph, W/pw) of an input [B, C, F, H, W]; sizes must divide (the
        convolution would drop the remainder without a word)."""
        *_, f, h, w = shape
        pt, ph, pw = self.kernel_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"video latent {tuple(shape)}: (F, H, W) must be multiples of the patch {self.kernel_size}")
        return f // pt, h // ph, w // pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        nf, nh, nw = self.grid(x.shape)
        pt, ph, pw = self.kernel_size
        patches = (x.reshape(b, c, nf, pt, nh, ph, nw, pw)
                   .permute(0, 2, 4, 6, 1, 3, 5, 7)               # [B, f, h, w, C, pt, ph, pw]
                   .reshape(b, nf * nh * nw, c * pt * ph * pw))
        return F.linear(patches, self.weight.flatten(1), self.bias)


class ChannelLastConv1d(nn.Conv1d):
    """Conv1d (stride 1) over [B, L, C] tokens (Ovi keeps audio latents channel-last), computed as one
    matmul over the unfolded windows, with nn.Conv1d's parameters and checkpoint keys. Why not the
    convolution: at Ovi's width (3072 -> 8192, kernel 7) cuDNN's bf16 path spent 19 ms of a 720x720
    DMD step in NCHW/NHWC layout transposes beside its 23 ms of convolution (session 20's profile),
    and the stem's forward + backward runs 5-6x faster as a matmul (bench/audio_stem.py, one H100,
    bench/RESULTS.md); the windows cost 7x the stem's activations, a few MB."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if (self.stride, self.dilation, self.groups, self.padding_mode) != ((1,), (1,), 1, "zeros") or isinstance(self.padding, str):
            raise ValueError(f"ChannelLastConv1d computes stride 1, dilation 1, one group, numeric zero padding: {self}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (pad,), (kernel,) = self.padding, self.kernel_size
        windows = F.pad(x, (0, 0, pad, pad)).unfold(1, kernel, 1)          # [B, L', C, kernel]
        return F.linear(windows.flatten(2), self.weight.flatten(1), self.bias)


class ConvMLP(nn.Module):
    """Gated conv MLP of the audio stem: w2(silu(w1 x) · w3 x), kernel 7, no biases, channel-last."""

    def __init__(self, dim: int, hidden: int, kernel: int = 7):
        super().__init__()
        pad = kernel // 2
        self.w1 = ChannelLastConv1d(dim, hidden, kernel, padding=pad, bias=False)
        self.w2 = ChannelLastConv1d(hidden, dim, kernel, padding=pad, bias=False)
        self.w3 = ChannelLastConv1d(dim, hidden, kernel, padding=pad, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def conv_mlp_hidden(dim: int) -> int:
    """Ovi: int(2·4·dim/3) rounded up to a multiple of 256 (8192 for dim 3072)."""
    hidden = int(2 * 4 * dim / 3)
    return 256 * ((hidden + 255) // 256)


def audio_stem(in_dim: int, dim: int) -> nn.Sequential:
    """The audio tower's patch embedding: kernel-7 conv in_dim -> dim, SiLU, gated ConvMLP (Ovi's keys
    patch_embedding.0 / .2.w1-3)."""
    return nn.Sequential(ChannelLastConv1d(in_dim, dim, kernel_size=7, padding=3), nn.SiLU(),
                         ConvMLP(dim, conv_mlp_hidden(dim)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = HeadNorm(dim, num_heads, eps), HeadNorm(dim, num_heads, eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        q, k = self.norm_q(self.q(x), rope), self.norm_k(self.k(x), rope)
        return self.o(attention(q, k, self.heads(self.v(x))).flatten(2))


class FusedCrossAttention(nn.Module):
    """Text cross-attention plus Ovi's cross-modal attention to the other tower.

    The query and output projection are shared: the text attention uses q as is, the fusion
    attention rotates q with this tower's positions and the other tower's keys with theirs;
    the two results are summed per head before `o`.
    """

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = HeadNorm(dim, num_heads, eps), HeadNorm(dim, num_heads, eps)
        self.k_fusion, self.v_fusion = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.pre_attn_norm_fusion = nn.LayerNorm(dim, eps=eps)
        self.norm_k_fusion = HeadNorm(dim, num_heads, eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, other: torch.Tensor | None = None,
                rope: Rope | None = None, other_rope: Rope | None = None) -> torch.Tensor:
        q = self.norm_q(self.q(x))
        out = attention(q, self.norm_k(self.k(context)), self.heads(self.v(context)))
        if other is not None:
            other = self.pre_attn_norm_fusion(other)
            k = self.norm_k_fusion(self.k_fusion(other), other_rope)
            out = out + attention(rope(q), k, self.heads(self.v_fusion(other)))
        return self.o(out.flatten(2))


class Modulation(nn.Module):
    """Holds the block's learned [1, 6, dim] modulation offset (checkpoint key `modulation.modulation`)."""

    def __init__(self, dim: int, n: int = 6):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, n, dim))

    def forward(self, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """e0 [B, S, 6, dim] -> six tensors [B, S, dim]: shift/scale/gate for attention, then FFN."""
        return (self.modulation.unsqueeze(1) + e0).unbind(2)


class FusionBlock(nn.Module):
    """One tower's half of a fused block. The fused order lives in `ovi_fusion.fused_block`."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = FusedCrossAttention(dim, num_heads, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = Modulation(dim)

    def attend_self(self, x, mod, rope: Rope, split: int | None) -> torch.Tensor:
        shift, scale, g = mod[0], mod[1], mod[2]
        y = self.self_attn(OPS.norm_modulate(x, shift, scale, split, self.eps), rope)
        return OPS.gated_residual(x, y, g, split)

    def attend_cross_and_ffn(self, x, mod, context, split: int | None, other=None, rope=None, other_rope=None) -> torch.Tensor:
        x = x + self.cross_attn(self.norm3(x), context, other, rope, other_rope)
        shift, scale, g = mod[3], mod[4], mod[5]
        y = self.ffn(OPS.norm_modulate(x, shift, scale, split, self.eps))
        return OPS.gated_residual(x, y, g, split)


class Head(nn.Module):
    """Final adaLN (shift/scale from the time embedding e, not e0) and projection."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, split: int | None) -> torch.Tensor:
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).unbind(2)
        return self.head(OPS.norm_modulate(x, shift, scale, split, self.eps))
