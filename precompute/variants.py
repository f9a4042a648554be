"""The Ovi model variants as data: what a clip must look like for each checkpoint.

Shared by both stages (precompute decides how to cut and encode clips; distill builds the DiT
that consumes them). Facts from Ovi's engine (spec/ovi.md §4-5): 24 fps, 16 kHz audio, latent
frames 1 + (F-1)/4, audio latents at 31.25 Hz, area buckets rounded to multiples of 32.
"""
from __future__ import annotations

from dataclasses import dataclass

FPS = 24
AUDIO_SAMPLE_RATE = 16_000
AUDIO_SAMPLES_PER_LATENT = 512  # MMAudio 16k: hop 256 x one 2x temporal downsample
VAE_STRIDE_T, VAE_STRIDE_S = 4, 16
DIT_PATCH_S = 2


@dataclass(frozen=True)
class Variant:
    name: str
    area: int            # target pixel area; H, W are snapped to it (multiples of 32)
    frames: int          # pixel frames at 24 fps, 4k+1
    audio_latents: int   # MMAudio latent frames (31.25 Hz)
    prompt_style: str    # "audcap" (<AUDCAP>..<ENDAUDCAP>, Ovi 1.0) or "audio_colon" (Audio: ..., Ovi 1.1)
    text_len: int = 512  # umT5 context rows the DiT zero-pads to
    checkpoint: str = "" # official file name of the DiT weights
    default_hw: tuple[int, int] = (720, 720)

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // VAE_STRIDE_T

    @property
    def audio_samples(self) -> int:
        return self.audio_latents * AUDIO_SAMPLES_PER_LATENT

    @property
    def duration_s(self) -> float:
        return self.frames / FPS


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("720x720_5s", 720 * 720, 121, 157, "audcap", checkpoint="model.safetensors"),
        Variant("960x960_5s", 960 * 960, 121, 157, "audio_colon", checkpoint="model_960x960.safetensors",
                default_hw=(704, 1280)),
        Variant("960x960_10s", 960 * 960, 241, 314, "audio_colon", checkpoint="model_960x960_10s.safetensors",
                default_hw=(704, 1280)),
        # Same code, small numbers: 17 frames (5 latent frames) of 64x64 and 22 audio latents
        # (11,264 samples = 0.704 s, inside the 0.708 s video window).
        Variant("tiny", 64 * 64, 17, 22, "audcap", text_len=32, default_hw=(64, 64)),
    )
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}") from None


def snap_to_area(height: int, width: int, area: int, multiple: int = 32) -> tuple[int, int]:
    """Ovi's resolution rule: rescale (h, w) to the target area keeping the aspect ratio, then
    round each side (Python's round, i.e. banker's rounding) to a multiple of 32."""
    if height <= 0 or width <= 0:
        raise ValueError(f"bad frame size {height}x{width}")
    scale = (area / (height * width)) ** 0.5
    h = max(multiple, round(height * scale / multiple) * multiple)
    w = max(multiple, round(width * scale / multiple) * multiple)
    return int(h), int(w)
