"""The training batch: what the data pipeline hands the DMD step. One bucket per batch, so
every sample has the same shapes and the DiT runs batched."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    video: torch.Tensor            # [B, 48, F, h, w] clean video latents (normalised), bf16
    audio: torch.Tensor            # [B, L, 20] clean audio latents (channel-last), bf16
    text: torch.Tensor             # [B, text_len, D] prompt embedding, zero-padded (both towers)
    neg_text_video: torch.Tensor   # [B, text_len, D] video negative prompt (Ovi's uncond pass)
    neg_text_audio: torch.Tensor   # [B, text_len, D] audio negative prompt
    image_latent: torch.Tensor | None = None  # [B, 48, 1, h, w]: image-to-video condition, None for t2v
    keys: tuple[str, ...] = ()
    # A teacher pair (distill/pairs.py): the starting noise of the student's rollout and the
    # guided teacher's 50-step sample from that noise, the target of dmd.regression_weight.
    noise_video: torch.Tensor | None = None   # [B, 48, F, h, w]
    noise_audio: torch.Tensor | None = None   # [B, L, 20]
    target_video: torch.Tensor | None = None  # [B, 48, F, h, w]
    target_audio: torch.Tensor | None = None  # [B, L, 20]

    @property
    def i2v(self) -> bool:
        return self.image_latent is not None

    @property
    def size(self) -> int:
        return self.video.shape[0]

    @property
    def has_pair(self) -> bool:
        return self.target_video is not None

    def to(self, device, dtype: torch.dtype | None = None) -> "Batch":
        move = lambda x: None if x is None else x.to(device=device, dtype=dtype or x.dtype, non_blocking=True)
        tensors = ("video", "audio", "text", "neg_text_video", "neg_text_audio", "image_latent",
                   "noise_video", "noise_audio", "target_video", "target_audio")
        return replace(self, **{name: move(getattr(self, name)) for name in tensors})
