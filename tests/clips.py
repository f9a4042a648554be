"""Real media files for tests, written with PyAV (H.264 + AAC), with content that can be checked.

Video: the top half of every frame is a flat grey whose level encodes the frame index (so a test
can tell which source frame the decoder picked), the bottom half a gradient that moves. Audio: a
quiet sine, plus optionally one loud click at a known time (so a test can check sample alignment).
Also makers for the bad inputs the precompute stage must survive.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Grey levels 16, 20, ..., 252: 4 apart, so H.264 noise on a flat area (about 1 level) never
# makes one index read as its neighbour.
_INDEX_BASE, _INDEX_STEP, _INDEX_PERIOD = 16, 4, 60
SINE_HZ, SINE_AMPLITUDE = 220.0, 0.05
CLICK_AMPLITUDE, CLICK_SAMPLES = 0.9, 3


def index_level(frame_index: int) -> int:
    return _INDEX_BASE + _INDEX_STEP * (frame_index % _INDEX_PERIOD)


def read_index(top_half_mean: float) -> int:
    """Inverse of index_level for one decoded frame's mean grey level of its top half."""
    return int(round((float(top_half_mean) - _INDEX_BASE) / _INDEX_STEP))


def _video_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _frame_rgb(index: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    frame = np.empty((height, width, 3), dtype=np.uint8)
    top = height // 2
    frame[:top] = index_level(index)
    ramp = (np.arange(width) * 4 + index * 7) % 256
    frame[top:] = ramp[None, :, None].astype(np.uint8)
    frame[top:, :, 2] = 255 - frame[top:, :, 2]
    # A little seeded texture so the encoder has real work; small enough to keep the top flat.
    frame[top:] = np.clip(frame[top:].astype(int) + rng.integers(-2, 3, frame[top:].shape), 0, 255)
    return frame


def audio_signal(seconds: float, rate: int, channels: int, click_at: float | None) -> np.ndarray:
    """float32 [channels, n]: the sine (a little louder in the second channel) plus the click."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    mono = SINE_AMPLITUDE * np.sin(2 * np.pi * SINE_HZ * t)
    if click_at is not None:
        at = int(round(click_at * rate))
        mono[at : at + CLICK_SAMPLES] = CLICK_AMPLITUDE
    gains = [1.0, 0.5][:channels]
    return np.stack([mono * g for g in gains]).astype(np.float32)


def make_clip(
    path: str | os.PathLike,
    seconds: float,
    fps: int | Fraction,
    width: int,
    height: int,
    audio_rate: int = 16_000,
    channels: int = 1,
    container: str = "mp4",
    audio: bool = True,
    click_at: float | None = None,
    seed: int = 0,
    audio_delay: float = 0.0,
    audio_codec: str = "aac",
) -> Path:
    """Write a real video file (H.264 in yuv420p, AAC audio) and return its path. ``click_at`` is
    a presentation time; ``audio_delay`` starts the audio track that much after the video.
    ``audio_codec="vorbis"`` (mkv, stereo) uses FFmpeg's own Vorbis encoder."""
    if container not in ("mp4", "mkv"):
        raise ValueError(f"container must be mp4 or mkv, got {container!r}")
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    if audio_codec not in ("aac", "vorbis") or (audio_codec == "vorbis" and (container, channels) != ("mkv", 2)):
        raise ValueError(f"audio_codec must be aac, or vorbis in a stereo mkv; got {audio_codec!r} in {container}, {channels} ch")
    path = Path(path)
    rng = np.random.default_rng(seed)
    fps = Fraction(fps)
    n_frames = int(round(seconds * fps))
    with av.open(str(path), mode="w", format="matroska" if container == "mkv" else "mp4") as out:
        vstream = out.add_stream(_video_codec(), rate=fps)
        vstream.width, vstream.height = width, height
        vstream.pix_fmt = "yuv420p"
        vstream.options = {"crf": "12", "preset": "ultrafast"} if vstream.codec_context.name == "libx264" else {}
        astream = None
        if audio:
            astream = out.add_stream(audio_codec, rate=audio_rate)
            astream.layout = "mono" if channels == 1 else "stereo"
            if audio_codec == "vorbis":
                astream.codec_context.options = {"strict": "experimental"}  # FFmpeg's native encoder
            else:
                astream.bit_rate = 128_000 * channels
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(_frame_rgb(i, width, height, rng), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / fps
            out.mux(vstream.encode(frame))
        out.mux(vstream.encode(None))
        if astream is not None:
            click = None if click_at is None else click_at - audio_delay
            samples = audio_signal(seconds - audio_delay, audio_rate, channels, click)
            delay = int(round(audio_delay * audio_rate))
            chunk = 1024
            for start in range(0, samples.shape[1], chunk):
                block = np.ascontiguousarray(samples[:, start : start + chunk])
                frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=astream.layout.name)
                frame.sample_rate = audio_rate
                frame.pts = delay + start
                frame.time_base = Fraction(1, audio_rate)
                out.mux(astream.encode(frame))
            out.mux(astream.encode(None))
    return path


# Bad inputs ---------------------------------------------------------------------------------

def make_tiny_manifest(root: Path, n_clips: int) -> Path:
    """n small talking-head-style clips (0.9 s, 64x64, 24 fps) and their manifest.csv, for the
    tests that need a real tiny dataset (precompute it with --variant tiny)."""
    rows = ["video,prompt"]
    for i in range(n_clips):
        make_clip(root / f"clip{i}.mp4", seconds=0.9, fps=24, width=64, height=64, seed=i)
        rows.append(f"clip{i}.mp4,<S>line {i}<E> someone speaks. <AUDCAP>a voice<ENDAUDCAP>")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


# Clips of several aspect ratios, frame rates and audio formats (issue 18). With --variant tiny
# they land in three buckets: 64x64, 64x96 and 96x32 (the portrait clip: one token wide).
MIXED_ASPECT_CLIPS = (
    dict(name="landscape_4x3.mp4", width=320, height=240, fps=24),
    dict(name="landscape_16x9_stereo.mp4", width=480, height=270, fps=30, channels=2),
    dict(name="square.mp4", width=256, height=256, fps=25),
    dict(name="landscape_16x9.mp4", width=640, height=360, fps=24),
    dict(name="portrait.mp4", width=200, height=356, fps=24),
    dict(name="vorbis.mkv", width=320, height=240, fps=24, channels=2, container="mkv", audio_codec="vorbis"),
)


def make_mixed_aspect_manifest(root: Path, seconds: float = 0.9) -> Path:
    """The clips of MIXED_ASPECT_CLIPS and their manifest.csv (precompute with --variant tiny)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = ["video,prompt"]
    for i, spec in enumerate(MIXED_ASPECT_CLIPS):
        spec = dict(spec)
        name = spec.pop("name")
        make_clip(root / name, seconds=seconds, seed=i, **spec)
        rows.append(f"{name},<S>line {i}<E> someone speaks. <AUDCAP>a voice<ENDAUDCAP>")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def make_empty(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def make_random_bytes(path: str | os.PathLike, size: int = 20_000, seed: int = 0) -> Path:
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def make_truncated(path: str | os.PathLike, **clip_kwargs) -> Path:
    """A good clip cut in half (for mp4 the moov index at the end is lost)."""
    path = Path(path)
    make_clip(path, **clip_kwargs)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_silent_track_missing(path: str | os.PathLike, **clip_kwargs) -> Path:
    """A clip with a video stream and no audio stream at all."""
    return make_clip(path, audio=False, **clip_kwargs)


def make_too_short(path: str | os.PathLike, seconds: float = 0.4, **clip_kwargs) -> Path:
    """A clip shorter than the tiny variant's 17 frames at 24 fps (0.708 s)."""
    return make_clip(path, seconds=seconds, **clip_kwargs)


def make_fifo(path: str | os.PathLike) -> Path:
    """A named pipe nobody writes to: opening it for reading blocks forever, like a stalled
    network mount. Used to prove that a hung decoder cannot stall the caller."""
    path = Path(path)
    os.mkfifo(path)
    return path


# Stand-ins for decode_clip, to observe the pool itself -----------------------------------------

def worker_pid(path, variant, start=None, end=None) -> int:
    """Returns the worker's pid instead of a clip, so a test can see workers being recycled."""
    return os.getpid()


def crash_worker(path, variant, start=None, end=None):
    """Dies the way a segfaulting native decoder does: no exception, no reply."""
    os._exit(11)
