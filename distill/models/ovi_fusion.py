"""OviFusion: Ovi's twin-tower audio-video DiT with fusion in every block.

State dict = the official checkpoint's 2,073 keys (`video_model.*`, `audio_model.*`), no buffers.
Forward is batched (samples of one bucket share shapes); Ovi's own code takes per-sample lists.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import OviConfig, TowerConfig, variant_config
from .tower import TowerState, WanTower


def fused_block(vblock, ablock, v: TowerState, a: TowerState, vx: torch.Tensor, ax: torch.Tensor):
    """Ovi's fused block order: audio self-attn, video self-attn, then each tower's text+fusion
    cross-attention and FFN; both directions see the other tower *after* its self-attention."""
    vmod, amod = vblock.modulation(v.e0), ablock.modulation(a.e0)
    ax = ablock.attend_self(ax, amod, a.rope, a.split)
    vx = vblock.attend_self(vx, vmod, v.rope, v.split)
    audio_after_self_attn = ax
    ax = ablock.attend_cross_and_ffn(ax, amod, a.context, a.split, other=vx, rope=a.rope, other_rope=v.rope)
    vx = vblock.attend_cross_and_ffn(vx, vmod, v.context, v.split, other=audio_after_self_attn,
                                     rope=v.rope, other_rope=a.rope)
    return vx, ax


def single_block(block, s: TowerState, x: torch.Tensor):
    """A tower on its own (Ovi's audio-only / video-only path): plain Wan block, no fusion."""
    mod = block.modulation(s.e0)
    x = block.attend_self(x, mod, s.rope, s.split)
    return block.attend_cross_and_ffn(x, mod, s.context, s.split)


class OviFusion(nn.Module):
    def __init__(self, cfg: OviConfig):
        super().__init__()
        self.cfg = cfg
        self.video_model = WanTower(cfg.video)
        self.audio_model = WanTower(cfg.audio)
        self.gradient_checkpointing = False

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_ovi_configs(cls, video_cfg: dict, audio_cfg: dict) -> "OviFusion":
        """From the dicts of Ovi's `video.json` / `audio.json` (text_dim defaults to 4096)."""
        return cls(OviConfig(TowerConfig.from_ovi_dict(video_cfg), TowerConfig.from_ovi_dict(audio_cfg)))

    @classmethod
    def from_variant(cls, name: str, seed: int | None = None) -> "OviFusion":
        """The architecture of a released variant. `tiny` is always initialised with seed 0 so the
        same name gives the same weights; real variants expect `load_ovi_checkpoint` (a seed
        gives them a seeded random init, e.g. for benchmarks)."""
        model = cls(variant_config(name))
        if name == "tiny" or seed is not None:
            init_weights(model, seed=0 if seed is None else seed)
        return model

    # -- forward -------------------------------------------------------------------------------
    def forward(self, video: torch.Tensor | None, audio: torch.Tensor | None, t: torch.Tensor,
                text_video: torch.Tensor | None, text_audio: torch.Tensor | None,
                first_frame_clean: bool = False, skip_block: int | None = None,
                t_video: torch.Tensor | None = None, skip_samples: torch.Tensor | None = None):
        """video [B,48,F,H,W], audio [B,L,20] (channel-last), t [B] on the 0..1000 scale shared
        by both towers (t_video [B,N_v] optionally overrides it per video token), text_* [B,<=text_len,D]
        zero-padded and unmasked. first_frame_clean: latent frame 0 tokens get t = 0 (i2v).
        skip_block: block index skipped in both towers (Ovi's SLG); skip_samples [B] bool limits
        the skip to those samples (the block runs for all and the others keep its output, so a
        conditional and an SLG pass can share one forward). Returns velocities of the input
        shapes; None for a missing modality (single-tower path)."""
        if video is None and audio is None:
            raise ValueError("need at least one of video, audio")
        t = torch.as_tensor(t, device=(video if video is not None else audio).device)
        if t.dim() == 0:
            t = t.expand((video if video is not None else audio).shape[0])
        v = self.video_model.prepare(video, t if t_video is None else t_video, text_video, first_frame_clean) if video is not None else None
        a = self.audio_model.prepare(audio, t, text_audio, False) if audio is not None else None
        vx, ax = (v.x if v else None), (a.x if a else None)
        for i in range(self.cfg.video.num_layers):
            skipped = skip_block is not None and skip_block >= 0 and i == skip_block
            if skipped and skip_samples is None:
                continue
            out_v, out_a = self._run_block(i, v, a, vx, ax)
            if skipped:
                out_v, out_a = _keep_input_where(skip_samples, vx, out_v), _keep_input_where(skip_samples, ax, out_a)
            vx, ax = out_v, out_a
        if v:
            v.x = vx
        if a:
            a.x = ax
        return (self.video_model.finish(v) if v else None), (self.audio_model.finish(a) if a else None)

    def _run_block(self, i, v, a, vx, ax):
        if v and a:
            fn, args = fused_block, (self.video_model.blocks[i], self.audio_model.blocks[i], v, a, vx, ax)
        elif v:
            fn, args = (lambda b, s, x: (single_block(b, s, x), None)), (self.video_model.blocks[i], v, vx)
        else:
            fn, args = (lambda b, s, x: (None, single_block(b, s, x))), (self.audio_model.blocks[i], a, ax)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def _keep_input_where(skip: torch.Tensor, x_in: torch.Tensor | None, x_out: torch.Tensor | None):
    if x_in is None:
        return None
    if skip.shape != (x_in.shape[0],) or skip.dtype != torch.bool:
        raise ValueError(f"skip_samples must be a bool tensor [B={x_in.shape[0]}], got {skip.dtype} {tuple(skip.shape)}")
    return torch.where(skip.to(x_in.device).view(-1, *([1] * (x_in.dim() - 1))), x_in, x_out)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded variance-preserving init, independent of the global RNG and construction order:
    matrices N(0, 1/sqrt(fan_in)), modulations N(0, 1/sqrt(dim)), norms 1, biases 0."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("modulation"):
            value = torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5
        elif p.dim() >= 2:
            value = torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            value = torch.ones(p.shape)
        else:
            value = torch.zeros(p.shape)
        p.copy_(value.to(p.dtype))
    return model
