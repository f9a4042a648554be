"""One Wan-shaped tower of Ovi: embeddings in, blocks, head out. The fused forward that runs
both towers' blocks in lock-step lives in `ovi_fusion.py`; this module prepares each tower's
tokens, time modulation and text context, and runs its head."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import TowerConfig
from .layers import FusionBlock, Head, PatchEmbed3d, Rope, audio_stem
from .rope import rope_tables


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoid of t (any shape) -> [..., dim], float64, cos before sin (Ovi/Wan order)."""
    half = dim // 2
    freqs = torch.pow(10_000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = t.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


@dataclass
class TowerState:
    """Everything a tower's blocks need for one forward: tokens and their conditioning."""

    x: torch.Tensor            # [B, N, dim] residual stream
    e: torch.Tensor            # [B, S, dim] time embedding (head)
    e0: torch.Tensor           # [B, S, 6, dim] block modulation
    split: int | None          # see layers.modulate
    context: torch.Tensor      # [B, text_len, dim] embedded text
    rope: Rope
    grid: tuple[int, ...]      # (F, h, w) or (L,)


class WanTower(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        if cfg.is_video:
            self.patch_embedding = PatchEmbed3d(cfg.in_dim, dim, cfg.patch_size)
        else:
            self.patch_embedding = audio_stem(cfg.in_dim, dim)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(FusionBlock(dim, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers))
        self.head = Head(dim, math.prod(cfg.patch_size) * cfg.out_dim, cfg.eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embedding[0].weight.dtype

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if self.cfg.is_video:
            return self.patch_embedding(x), self.patch_embedding.grid(x.shape)  # tokens in (f, h, w) raster order
        return self.patch_embedding(x), (x.shape[1],)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, S] -> e [B, S, dim], e0 [B, S, 6, dim]."""
        e = self.time_embedding(timestep_embedding(t, self.cfg.freq_dim).to(self.dtype))
        return e, self.time_projection(e).unflatten(-1, (6, -1))

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Zero-pad to text_len rows *before* the MLP and attend to all of them, as Ovi does."""
        rows = context.shape[1]
        if rows > self.cfg.text_len:
            raise ValueError(f"text context has {rows} rows, more than text_len {self.cfg.text_len}")
        if rows < self.cfg.text_len:
            context = nn.functional.pad(context, (0, 0, 0, self.cfg.text_len - rows))
        return self.text_embedding(context.to(self.dtype))

    def prepare(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, first_frame_clean: bool) -> TowerState:
        x, grid = self.embed_tokens(x.to(self.dtype))
        t_segments, split = self.token_times(t, grid, first_frame_clean)
        e, e0 = self.embed_time(t_segments)
        kind = "video" if self.cfg.is_video else "audio"
        cos, sin = rope_tables(kind, self.cfg.head_dim, grid, x.device, self.cfg.temporal_rope_scaling_factor)
        return TowerState(x, e, e0, split, self.embed_text(context), Rope(cos, sin), grid)

    def token_times(self, t: torch.Tensor, grid: tuple[int, ...], first_frame_clean: bool):
        """Timesteps as segments [B, S] (see layers.modulate): image-to-video gives latent frame 0 t = 0."""
        n_tokens = math.prod(grid)
        if t.dim() == 2:                      # explicit per-token timesteps
            if t.shape[1] != n_tokens:
                raise ValueError(f"per-token t has {t.shape[1]} entries for {n_tokens} tokens")
            return t, None
        if first_frame_clean and self.cfg.is_video:
            return torch.stack([torch.zeros_like(t), t], dim=1), math.prod(grid[1:])
        return t[:, None], None

    def unpatchify(self, y: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        if not self.cfg.is_video:
            return y                                           # [B, L, out_dim], channel-last
        f, h, w = grid
        p = self.cfg.patch_size
        y = y.view(y.shape[0], f, h, w, *p, self.cfg.out_dim)
        y = torch.einsum("bfhwpqrc->bcfphqwr", y)
        return y.reshape(y.shape[0], self.cfg.out_dim, f * p[0], h * p[1], w * p[2])

    def finish(self, state: TowerState) -> torch.Tensor:
        return self.unpatchify(self.head(state.x, state.e, state.split), state.grid)
