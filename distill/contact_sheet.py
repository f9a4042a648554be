"""One picture per checkpoint: a row per clip with a few of its frames and its audio's spectrogram,
under a label (clip name and prompt), so a glance along the run shows what the student makes.

    sheet = contact_sheet([SheetRow("000_0  a dog barks", frames, audio), ...], title="step 300")
    save_png(sheet, path)

The sheet is built in memory (uint8 [H, W, 3]); only save_png touches the disk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from precompute.variants import AUDIO_SAMPLE_RATE

FRAMES_PER_ROW = 4
THUMB_HEIGHT = 160          # pixels; smaller clips keep their own height
LABEL_HEIGHT = 14
PAD = 4
SPECTROGRAM_FFT, SPECTROGRAM_HOP = 512, 128     # 32 ms windows, 8 ms hops at 16 kHz
BACKGROUND = (24, 24, 24)
TEXT = (230, 230, 230)
# dark blue -> purple -> orange -> pale yellow: quiet stays dark, loud stands out
SPECTROGRAM_COLOURS = np.array([(0, 0, 4), (80, 18, 123), (182, 54, 121), (251, 136, 97), (252, 253, 191)], np.float64)


@dataclass(frozen=True)
class SheetRow:
    label: str
    frames: np.ndarray          # uint8 [F, H, W, 3]: the whole clip (a few are picked)
    audio: np.ndarray           # float [N] in [-1, 1]
    sample_rate: int = AUDIO_SAMPLE_RATE


def pick_frames(count: int, wanted: int = FRAMES_PER_ROW) -> list[int]:
    """Evenly spaced indices from the first frame to the last."""
    if count <= wanted:
        return list(range(count))
    return [round(i * (count - 1) / (wanted - 1)) for i in range(wanted)]


def spectrogram_rgb(audio: np.ndarray, height: int, width: int) -> np.ndarray:
    """Log-power spectrogram (low frequencies at the bottom), 60 dB below the clip's peak to its
    peak, coloured -> uint8 [height, width, 3]."""
    wave = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    if wave.numel() < SPECTROGRAM_FFT:
        wave = torch.nn.functional.pad(wave, (0, SPECTROGRAM_FFT - wave.numel()))
    spec = torch.stft(wave, SPECTROGRAM_FFT, SPECTROGRAM_HOP, window=torch.hann_window(SPECTROGRAM_FFT),
                      return_complex=True).abs().pow(2)
    db = 10 * torch.log10(spec + 1e-12)
    level = ((db - (db.max() - 60)) / 60).clamp(0, 1).flip(0).numpy()             # [freq, time], 0..1
    image = Image.fromarray((level * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    return colourise(np.asarray(image, dtype=np.float64) / 255)


def colourise(level: np.ndarray) -> np.ndarray:
    """Levels in [0, 1] -> uint8 RGB along SPECTROGRAM_COLOURS."""
    stops = np.linspace(0, 1, len(SPECTROGRAM_COLOURS))
    rgb = np.stack([np.interp(level, stops, SPECTROGRAM_COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def _thumbnail(frame: np.ndarray, height: int) -> np.ndarray:
    h, w = frame.shape[:2]
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))


def contact_sheet(rows: list[SheetRow], title: str = "") -> np.ndarray:
    """uint8 [H, W, 3]: the title, then per row its label and FRAMES_PER_ROW frames + spectrogram."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    thumb_h = min(THUMB_HEIGHT, max(r.frames.shape[1] for r in rows))
    strips = []
    for row in rows:
        if row.frames.ndim != 4 or row.frames.shape[-1] != 3 or row.frames.dtype != np.uint8:
            raise ValueError(f"{row.label}: frames must be uint8 [F, H, W, 3], got {row.frames.dtype} {row.frames.shape}")
        thumbs = [_thumbnail(row.frames[i], thumb_h) for i in pick_frames(len(row.frames))]
        spectrogram = spectrogram_rgb(row.audio, thumb_h, 2 * thumbs[0].shape[1])
        parts = [p for t in thumbs + [spectrogram] for p in (t, np.full((thumb_h, PAD, 3), BACKGROUND, np.uint8))]
        strips.append((row.label, np.concatenate(parts[:-1], axis=1)))
    width = max(strip.shape[1] for _, strip in strips) + 2 * PAD
    height = LABEL_HEIGHT + PAD + sum(LABEL_HEIGHT + thumb_h + PAD for _ in strips)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    draw.text((PAD, 1), title, fill=TEXT, font=font)
    y = LABEL_HEIGHT + PAD
    for label, strip in strips:
        draw.text((PAD, y + 1), label, fill=TEXT, font=font)
        sheet.paste(Image.fromarray(strip), (PAD, y + LABEL_HEIGHT))
        y += LABEL_HEIGHT + thumb_h + PAD
    return np.asarray(sheet)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Written whole or not at all (a watcher may read it while the next one is written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial.png")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path

