"""Generated clips out: decoder tensors -> an mp4 with H.264 video and AAC audio, as Ovi saves them
(spec/ovi.md §5.6: frames (x+1)/2·255 as uint8, audio in [-1, 1] at 16 kHz, libx264 + aac).

PyAV writes the file directly (no moviepy, no temporary wav), so the audio keeps its exact sample
count apart from AAC's own framing.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from precompute.variants import AUDIO_SAMPLE_RATE, FPS

AAC_FRAME_SAMPLES = 1024  # what the AAC encoder consumes per frame
AUDIO_BIT_RATE = 128_000
VIDEO_CRF = "18"  # visually lossless-ish; these files are for looking at, not for re-encoding


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoder output [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]. Rounds to nearest (Ovi
    truncates; the difference is at most one level)."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, F, H, W], got shape {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def audio_to_float(audio: torch.Tensor) -> np.ndarray:
    """Vocoder output [1, N] or [N] -> float32 [N] clipped to [-1, 1] (AAC would wrap anything outside)."""
    if audio.ndim == 2 and audio.shape[0] == 1:
        audio = audio[0]
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [N] or [1, N], got shape {tuple(audio.shape)}")
    return audio.detach().float().clamp(-1, 1).cpu().numpy()


def write_mp4(path: str | os.PathLike, frames: np.ndarray, audio: np.ndarray, fps: int = FPS,
              sample_rate: int = AUDIO_SAMPLE_RATE) -> Path:
    """frames uint8 [F, H, W, 3] (H, W even: yuv420p halves the chroma) and mono float audio [N]
    -> `path` (H.264 yuv420p at `fps`, AAC mono at `sample_rate`). Written to a sibling
    `.partial` file and renamed, so a crash never leaves a playable-looking half file."""
    path = Path(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [F>0, H, W, 3], got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame size {height}x{width}: H.264 in yuv420p needs even sides")
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio must be mono float [N>0], got shape {audio.shape}")
    samples = np.clip(audio.astype(np.float32), -1.0, 1.0)

    tmp = path.with_name(path.name + ".partial")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        vstream = container.add_stream("libx264", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        vstream.options = {"crf": VIDEO_CRF}
        astream = container.add_stream("aac", rate=sample_rate)
        astream.layout = "mono"
        astream.bit_rate = AUDIO_BIT_RATE
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode(None))
        for start in range(0, samples.size, AAC_FRAME_SAMPLES):
            block = samples[None, start:start + AAC_FRAME_SAMPLES]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
            container.mux(astream.encode(frame))
        container.mux(astream.encode(None))
    os.replace(tmp, path)
    return path
