"""Rotary position embedding as Ovi applies it: adjacent (2j, 2j+1) pairs of each head rotate
together; video splits the pairs into (frame, row, column) groups, audio rotates only the first
group with frequencies scaled by 0.19676 so audio token p sits at video latent frame ~0.19676·p.

Ovi recomputes the rotation in float64 complex arithmetic in every attention call. Here the
angles are built once per grid in float64 and cached as float32 cos/sin tables laid out per
real element; applying them is a few fused-friendly multiplies in float32.
"""
from __future__ import annotations

import functools

import torch

MAX_POSITIONS = 1024
THETA = 10_000.0


def pair_groups(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per (time, height, width) group: 22/21/21 for head_dim 128."""
    pairs = head_dim // 2
    spatial = pairs // 3
    return pairs - 2 * spatial, spatial, spatial


def group_frequencies(n_pairs: int, scale: float = 1.0) -> torch.Tensor:
    """f_j = scale / theta^(2j / (2·n_pairs)), float64 — each group uses its own width in the exponent."""
    width = 2 * n_pairs
    return scale / THETA ** (torch.arange(0, width, 2, dtype=torch.float64) / width)


def video_angles(head_dim: int, frames: int, height: int, width: int) -> torch.Tensor:
    """[frames·height·width, head_dim/2] float64 angles, tokens in (f, h, w) raster order."""
    nt, nh, nw = pair_groups(head_dim)
    f, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    pos = lambda grid: grid.reshape(-1, 1).to(torch.float64)
    return torch.cat([
        pos(f) * group_frequencies(nt),
        pos(h) * group_frequencies(nh),
        pos(w) * group_frequencies(nw),
    ], dim=1)


def audio_angles(head_dim: int, length: int, scale: float) -> torch.Tensor:
    """[length, head_dim/2] float64 angles; pairs past the temporal group stay unrotated (angle 0)."""
    nt, _, _ = pair_groups(head_dim)
    angles = torch.zeros(length, head_dim // 2, dtype=torch.float64)
    angles[:, :nt] = torch.arange(length, dtype=torch.float64)[:, None] * group_frequencies(nt, scale)
    return angles


@functools.lru_cache(maxsize=64)
def _tables(kind: str, head_dim: int, grid: tuple[int, ...], scale: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    if any(g > MAX_POSITIONS for g in grid):
        raise ValueError(f"RoPE grid {grid} exceeds Ovi's {MAX_POSITIONS} positions")
    angles = video_angles(head_dim, *grid) if kind == "video" else audio_angles(head_dim, grid[0], scale)
    cos, sin = angles.cos().float(), angles.sin().float()
    return cos[:, None, :].to(device), sin[:, None, :].to(device)  # [N, 1, head_dim/2]: broadcast over heads


def rope_tables(kind: str, head_dim: int, grid: tuple[int, ...], device, scale: float = 1.0):
    """Cached (cos, sin) float32 tables of shape [N, 1, head_dim/2] for tokens [B, N, heads, head_dim]."""
    return _tables(kind, head_dim, tuple(int(g) for g in grid), float(scale), str(torch.device(device)))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x0 + i·x1)·e^{iθ} for every adjacent pair, in float32, returned in x's dtype."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
