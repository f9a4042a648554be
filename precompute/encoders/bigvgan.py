"""BigVGAN v1 vocoder, MMAudio's 16 kHz one: log10 mel [B, 80, T] -> waveform [B, 1, 256*T].

The last stage of Ovi's audio decode (latent -> AudioVAE.decode -> mel -> here). Facts from
spec/data.md §3.2 and golden/bigvgan_*.json: conv_pre (k7) -> six transposed-conv upsamplers
(x4, x4, x2, x2, x2, x2), each followed by the mean of three AMP residual blocks (kernels 3/7/11,
dilations 1/3/5) -> anti-aliased SnakeBeta -> conv_post (k7, 1 ch) -> tanh.

Official file: `ext_weights/best_netG.pt` = {'generator': state_dict} with legacy weight-norm names
(`<conv>.weight_g`, `<conv>.weight_v`); the newer parametrisation names
(`<conv>.parametrizations.weight.original0/1`) are accepted too. Every conv is weight-normed, so
loading folds g * v / ||v|| into a plain `<conv>.weight` once; inference never sees g and v.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from precompute.checkpoints import check_state_dict, read_torch_state_dict

SNAKE_EPS = 1e-9
ALIAS_FREE_RATIO = 2
ALIAS_FREE_TAPS = 12
LEGACY_G, LEGACY_V = ".weight_g", ".weight_v"
PARAM_G, PARAM_V = ".parametrizations.weight.original0", ".parametrizations.weight.original1"


@dataclass(frozen=True)
class VocoderConfig:
    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (8, 8, 4, 4, 4, 4)
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsample_rates)


TINY_VOCODER = VocoderConfig(upsample_initial_channel=64)


# ---------------------------------------------------------------------------------------------
# Anti-aliased SnakeBeta: upsample x2, activate, low-pass and downsample x2.

@functools.lru_cache(maxsize=None)
def kaiser_sinc_filter(cutoff: float, half_width: float, taps: int) -> Tensor:
    """[1, 1, taps] Kaiser-windowed sinc low-pass (Kaiser's formula picks beta from the ripple).

    Cached and always built on the CPU (218 identical copies per vocoder, also under a meta-device
    context); callers clone it.
    """
    half = taps // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(taps, beta=beta, periodic=False, device="cpu")
    # Even length: sample between the taps so the filter is symmetric about the centre.
    time = torch.arange(-half, half, device="cpu") + 0.5 if taps % 2 == 0 else torch.arange(taps, device="cpu") - half
    filt = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return (filt / filt.sum()).view(1, 1, taps)


class SnakeBeta(nn.Module):
    """x + sin^2(alpha x) / beta, per channel, with alpha and beta stored as logs."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha.exp()[None, :, None]
        beta = self.beta.exp()[None, :, None]
        return x + (1.0 / (beta + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class UpSample1d(nn.Module):
    def __init__(self, ratio: int = ALIAS_FREE_RATIO, taps: int = ALIAS_FREE_TAPS):
        super().__init__()
        self.ratio = ratio
        self.pad = taps // ratio - 1
        self.crop_left = self.pad * ratio + (taps - ratio) // 2
        self.crop_right = self.pad * ratio + (taps - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, taps).clone())

    def forward(self, x: Tensor) -> Tensor:
        # Replicate padding keeps the filter from ringing on a zero edge; the crop removes it again.
        # Zero-stuffing by `ratio` divides the signal's gain by `ratio`, hence the factor.
        channels = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = self.ratio * F.conv_transpose1d(x, self.filter.expand(channels, -1, -1), stride=self.ratio, groups=channels)
        return x[..., self.crop_left:-self.crop_right]


class LowPassFilter1d(nn.Module):
    def __init__(self, ratio: int = ALIAS_FREE_RATIO, taps: int = ALIAS_FREE_TAPS):
        super().__init__()
        self.stride = ratio
        self.pad_left = taps // 2 - (taps % 2 == 0)
        self.pad_right = taps // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, taps).clone())

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.expand(channels, -1, -1), stride=self.stride, groups=channels)


class DownSample1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.lowpass = LowPassFilter1d()

    def forward(self, x: Tensor) -> Tensor:
        return self.lowpass(x)


class Activation1d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = UpSample1d()
        self.downsample = DownSample1d()

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.act(self.upsample(x)))


# ---------------------------------------------------------------------------------------------
# The generator, with the official key names (after weight-norm folding).

def same_padding(kernel_size: int, dilation: int) -> int:
    return (kernel_size * dilation - dilation) // 2


class AMPBlock1(nn.Module):
    """Three (act, dilated conv, act, conv) residual units; activations alternate between them."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=same_padding(kernel_size, 1)) for _ in dilations
        )
        self.activations = nn.ModuleList(Activation1d(channels) for _ in range(2 * len(dilations)))

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations[::2], self.activations[1::2]):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class Vocoder(nn.Module):
    """BigVGAN v1 generator with plain (weight-norm folded) convs: mel [B, 80, T] -> [B, 1, 256 T]."""

    def __init__(self, cfg: VocoderConfig = VocoderConfig()):
        super().__init__()
        self.cfg = cfg
        width = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, width, 7, padding=3)
        # Each upsampler sits alone in a ModuleList: the checkpoint keys are `ups.{i}.0.*`.
        self.ups = nn.ModuleList(
            nn.ModuleList([nn.ConvTranspose1d(width >> i, width >> (i + 1), k, u, padding=(k - u) // 2)])
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            AMPBlock1(width >> (i + 1), k, tuple(d))
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        final = width >> len(cfg.upsample_rates)
        self.activation_post = Activation1d(final)
        self.conv_post = nn.Conv1d(final, 1, 7, padding=3)

    def forward(self, mel: Tensor) -> Tensor:
        if mel.ndim != 3 or mel.shape[1] != self.cfg.num_mels:
            raise ValueError(f"vocoder expects a mel [B, {self.cfg.num_mels}, T], got shape {tuple(mel.shape)}")
        x = self.conv_pre(mel.to(self.conv_pre.weight.dtype))
        n_kernels = len(self.cfg.resblock_kernel_sizes)
        for i, (up,) in enumerate(self.ups):
            x = up(x)
            blocks = self.resblocks[i * n_kernels:(i + 1) * n_kernels]
            x = sum(block(x) for block in blocks) / n_kernels
        return torch.tanh(self.conv_post(self.activation_post(x)))

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Tensor],
        cfg: VocoderConfig = VocoderConfig(),
        *,
        source: str = "<state dict>",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "Vocoder":
        """Strictly load a weight-normed (checkpoint-format) state dict, fold it in float32, cast."""
        naming = "parametrized" if any(PARAM_G in k or PARAM_V in k for k in state) else "legacy"
        check_state_dict(state, checkpoint_template(cfg, naming), source, what=f"the BigVGAN vocoder {cfg}")
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(fold_weight_norm(state), strict=True, assign=True)
        return model.eval().requires_grad_(False).to(device=device, dtype=dtype)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cfg: VocoderConfig = VocoderConfig(),
    ) -> "Vocoder":
        """Load the official `best_netG.pt` ({'generator': state_dict})."""
        state = read_torch_state_dict(path, what="BigVGAN checkpoint", nested_key="generator")
        return cls.from_state_dict(state, cfg, source=str(path), device=device, dtype=dtype)

    @classmethod
    def tiny(cls, seed: int = 0, cfg: VocoderConfig = TINY_VOCODER) -> "Vocoder":
        return cls.from_state_dict(random_checkpoint(cfg, seed), cfg, source=f"tiny(seed={seed})")


# ---------------------------------------------------------------------------------------------
# Weight norm: checkpoint naming <-> folded weights.

def _is_weight_normed(name: str) -> bool:
    # Every conv of the generator is weight-normed; no other entry is called `*.weight`.
    return name.endswith(".weight")


def checkpoint_template(cfg: VocoderConfig = VocoderConfig(), naming: str = "legacy") -> dict[str, Tensor]:
    """Meta tensors with the names/shapes/dtypes (and order) of a weight-normed checkpoint for `cfg`.

    naming='legacy' gives `weight_g`/`weight_v` (best_netG.pt); 'parametrized' gives torch's
    `parametrizations.weight.original0/1`. g has shape [dim0, 1, 1]: the output channel of a
    Conv1d, the INPUT channel of a ConvTranspose1d (torch's weight_norm default dim=0). Weight norm
    re-registers the weight after the bias, so each conv lists bias, g, v.
    """
    g_suffix, v_suffix = {"legacy": (LEGACY_G, LEGACY_V), "parametrized": (PARAM_G, PARAM_V)}[naming]
    with torch.device("meta"):
        folded = Vocoder(cfg).state_dict()
    template: dict[str, Tensor] = {}
    for name, ref in folded.items():
        if _is_weight_normed(name):
            continue
        template[name] = ref
        stem = name[: -len(".bias")] if name.endswith(".bias") else None
        if stem is not None and stem + ".weight" in folded:
            w = folded[stem + ".weight"]
            template[stem + g_suffix] = torch.empty(w.shape[0], *([1] * (w.ndim - 1)), dtype=w.dtype, device="meta")
            template[stem + v_suffix] = w
    return template


def fold_weight_norm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace each (g, v) pair, legacy or parametrized names, by `<conv>.weight` = g v / ||v||.

    Computed in float32; ||v|| runs over every dim but 0, as torch's weight_norm(dim=0) does.
    """
    folded: dict[str, Tensor] = {}
    for name, value in state.items():
        if name.endswith((LEGACY_V, PARAM_V)):
            continue  # consumed with its g
        if name.endswith((LEGACY_G, PARAM_G)):
            legacy = name.endswith(LEGACY_G)
            stem = name[: -len(LEGACY_G if legacy else PARAM_G)]
            v = state[stem + (LEGACY_V if legacy else PARAM_V)].to(torch.float32)
            norm = torch.linalg.vector_norm(v, dim=list(range(1, v.ndim)), keepdim=True)
            folded[stem + ".weight"] = (value.to(torch.float32) * v / norm).to(value.dtype)
        else:
            folded[name] = value.clone()  # the model must not alias the caller's tensors
    return folded


def random_checkpoint(cfg: VocoderConfig, seed: int) -> dict[str, Tensor]:
    """Weight-normed random weights (legacy naming), drawn as the golden fixture drew them.

    In checkpoint order: g ~ N(1, 0.1), v ~ N(0, 1), log alpha/beta ~ N(0, 0.1), biases ~ N(0, 0.02);
    then conv_post's g is redrawn ~ N(0.05, 0.005) so the tanh does not saturate. The anti-aliasing
    filters keep their computed values.
    """
    gen = torch.Generator().manual_seed(seed)
    lowpass = kaiser_sinc_filter(0.5 / ALIAS_FREE_RATIO, 0.6 / ALIAS_FREE_RATIO, ALIAS_FREE_TAPS)
    draws = {LEGACY_G: (1.0, 0.1), LEGACY_V: (0.0, 1.0), ".bias": (0.0, 0.02), ".alpha": (0.0, 0.1), ".beta": (0.0, 0.1)}
    state: dict[str, Tensor] = {}
    for name, ref in checkpoint_template(cfg, naming="legacy").items():
        if name.endswith(".filter"):
            state[name] = lowpass.clone()
            continue
        mean, std = next(v for suffix, v in draws.items() if name.endswith(suffix))
        state[name] = torch.empty(ref.shape).normal_(mean, std, generator=gen)
    state["conv_post" + LEGACY_G].normal_(0.05, 0.005, generator=gen)
    return state
