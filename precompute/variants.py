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


# Longest side / shortest side of a source that precompute takes (32:9 is 3.56). It bounds the
# bucket table: without it, a 1:100 strip would make buckets (and token grids) nobody planned for.
MAX_ASPECT = 4.0
BUCKET_MULTIPLE = 32


def aspect_ok(height: int, width: int) -> bool:
    return max(height, width) <= MAX_ASPECT * min(height, width)


def buckets(variant: Variant) -> tuple[tuple[int, int], ...]:
    """The bucket table: every (h, w) that `snap_to_area` can give a source within MAX_ASPECT.

    Before rounding, the sides are h' = sqrt(area·r) and w' = area / h' for the aspect r = h/w, so
    h' runs over [sqrt(area / MAX_ASPECT), sqrt(area · MAX_ASPECT)]. (32i, 32j) is in the table when
    some h' of that range rounds to i while area / h' rounds to j. The rounding intervals are taken
    closed (a tie may round either way), so the table can only be larger than what clips reach."""
    m, area = BUCKET_MULTIPLE, variant.area

    def rounds_to(k: int) -> tuple[float, float]:  # sides that snap to k·m (everything below 1.5·m snaps to m)
        return (0.0 if k == 1 else m * (k - 0.5)), m * (k + 0.5)

    low, high = (area / MAX_ASPECT) ** 0.5, (area * MAX_ASPECT) ** 0.5
    table = set()
    for i in range(1, int(high / m + 0.5) + 1):
        a, b = rounds_to(i)
        a, b = max(a, low), min(b, high)
        if a > b:
            continue
        w_low, w_high = area / b, area / a
        for j in range(1, int(w_high / m + 0.5) + 1):
            c, d = rounds_to(j)
            if c <= w_high and d >= w_low:
                table.add((m * i, m * j))
    return tuple(sorted(table))


def snap_to_area(height: int, width: int, area: int, multiple: int = BUCKET_MULTIPLE) -> tuple[int, int]:
    """Ovi's resolution rule: rescale (h, w) to the target area keeping the aspect ratio, then
    round each side (Python's round, i.e. banker's rounding) to a multiple of 32."""
    if height <= 0 or width <= 0:
        raise ValueError(f"bad frame size {height}x{width}")
    scale = (area / (height * width)) ** 0.5
    h = max(multiple, round(height * scale / multiple) * multiple)
    w = max(multiple, round(width * scale / multiple) * multiple)
    return int(h), int(w)
