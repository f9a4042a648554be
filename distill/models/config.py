"""Typed configs for Ovi's two towers, built from Ovi's own JSON dicts (video.json / audio.json)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from precompute.variants import get_variant

# Keys of Ovi's/Wan's WanModel config that we accept but that do not change the architecture
# Ovi ships (global attention, qk-norm and cross-attn-norm always on).
_ACCEPTED_FIXED = {"window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True}


@dataclass(frozen=True)
class TowerConfig:
    """One WanModel tower. Field names follow Ovi's config JSON so its dicts load unchanged."""

    model_type: str            # "ti2v" (video) or "t2a" (audio)
    patch_size: tuple[int, ...]
    in_dim: int
    out_dim: int
    dim: int = 3072
    ffn_dim: int = 14336
    freq_dim: int = 256
    num_heads: int = 24
    num_layers: int = 30
    text_len: int = 512
    text_dim: int = 4096
    eps: float = 1e-6
    temporal_rope_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.model_type not in ("ti2v", "t2a"):
            raise ValueError(f"model_type {self.model_type!r}: Ovi's checkpoints use 'ti2v' (video) and 't2a' (audio)")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError("head_dim must be even for RoPE")

    @property
    def is_video(self) -> bool:
        return self.model_type == "ti2v"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_ovi_dict(cls, cfg: dict) -> "TowerConfig":
        cfg = dict(cfg)
        for key, fixed in _ACCEPTED_FIXED.items():
            value = cfg.pop(key, fixed)
            if (list(value) if isinstance(value, (list, tuple)) else value) != fixed:
                raise ValueError(f"config field {key}={value!r} is not supported (Ovi uses {fixed!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(f"unknown Ovi config field(s): {unknown}")
        cfg["patch_size"] = tuple(cfg["patch_size"])
        return cls(**cfg)


@dataclass(frozen=True)
class OviConfig:
    video: TowerConfig
    audio: TowerConfig

    def __post_init__(self):
        v, a = self.video, self.audio
        if not v.is_video or a.is_video:
            raise ValueError("OviConfig needs a 'ti2v' video tower and a 't2a' audio tower")
        if (v.dim, v.num_heads, v.num_layers) != (a.dim, a.num_heads, a.num_layers):
            raise ValueError("fusion needs equal dim, num_heads and num_layers in both towers")
        if v.patch_size != (1, 2, 2) or a.patch_size != (1,):
            raise ValueError(f"patch sizes {v.patch_size}/{a.patch_size}: Ovi uses (1,2,2) and (1,)")


def ovi_config(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, text_len=512, text_dim=4096) -> OviConfig:
    common = dict(dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers,
                  text_len=text_len, text_dim=text_dim)
    return OviConfig(
        video=TowerConfig("ti2v", (1, 2, 2), 48, 48, **common),
        audio=TowerConfig("t2a", (1,), 20, 20, temporal_rope_scaling_factor=0.19676, **common),
    )


# The tiny DiT consumes the tiny umT5 (width 32) of precompute's tiny variant.
TINY_TEXT_DIM = 32


def variant_config(name: str, num_layers: int | None = None) -> OviConfig:
    """All three released checkpoints share one architecture (spec/ovi.md §1.1); `num_layers`
    shrinks the depth (benchmarks)."""
    variant = get_variant(name)
    if name == "tiny":
        return ovi_config(dim=64, ffn_dim=160, num_heads=2, num_layers=num_layers or 3,
                          text_len=variant.text_len, text_dim=TINY_TEXT_DIM)
    return ovi_config(num_layers=num_layers or 30, text_len=variant.text_len)
