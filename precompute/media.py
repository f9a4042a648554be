"""Decode one clip window into exactly what the encoders need: F frames at 24 fps in the model's
area bucket, and the matching mono 16 kHz audio, sample-exact (spec/data.md §6.4).

Timeline: every time here (``start``, ``end``, ``t0``, ``t1``, frame times) is in seconds on the
*video stream's* presentation timeline, with its first frame at 0 (what decord reports). The audio
stream is placed on the same timeline through its own start time, so an audio track that starts
late or early stays in sync.

Pixels stay uint8 until the GPU: a decoded 5 s 704x1280 clip is 327 MB as uint8 and 1.3 GB as
float, and it crosses a process boundary. `pixels_for_vae` is the one place they become the VAE's
[-1, 1] floats (x/127.5 - 1).

`DecodePool` runs `decode_clip` in worker processes with a per-clip timeout and worker recycling,
because native decoders can hang holding the GIL or leak per file (decord #373, #167).
"""
from __future__ import annotations

import enum
import itertools
import math
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import av
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from precompute.variants import AUDIO_SAMPLE_RATE, FPS, MAX_ASPECT, Variant, aspect_ok, snap_to_area

# A frame is "being displayed" at t if its pts <= t + this; absorbs millisecond-rounded pts
# (Matroska) and float32 timestamps (decord).
FRAME_PICK_EPSILON_S = 1e-3
# The audio may end this many samples short (AAC/encoder tail rounding); the gap is zero-padded
# and recorded. Anything shorter is "too_short".
MAX_AUDIO_PAD_SAMPLES = 160  # 10 ms at 16 kHz
# Audio decoded before t0 / after the window end so the resampling filter sees real signal at
# the window edges instead of zeros.
AUDIO_MARGIN_S = 0.25
# Seek this far before t0, then decode forward (seeks land on a keyframe at or before the target).
SEEK_LOOKBACK_S = 2.0
RESIZE_CHUNK_FRAMES = 16  # frames decoded and resized at once: bounds memory for large sources
# MMAudio's resampler settings (Kaiser-best), so audio matches what its 16k VAE was trained on.
RESAMPLE_KW = dict(
    lowpass_filter_width=64,
    rolloff=0.9475937167399596,
    resampling_method="sinc_interp_kaiser",
    beta=14.769656459379492,
)


class Reason(str, enum.Enum):
    MISSING = "missing"              # the path does not exist
    UNREADABLE = "unreadable"        # not a media file, corrupt, or a codec nobody can decode
    NO_VIDEO = "no_video"
    NO_AUDIO = "no_audio"
    TOO_SHORT = "too_short"          # the source does not cover the window
    BAD_WINDOW = "bad_window"        # the requested start/end cannot hold one clip
    BAD_ASPECT = "bad_aspect"        # longer than MAX_ASPECT:1 either way: no bucket of the table fits it
    TIMEOUT = "timeout"              # the worker took longer than the pool's timeout and was killed
    WORKER_DIED = "worker_died"      # the worker process crashed (segfault, OOM kill)
    INTERNAL = "internal_error"      # an unexpected exception; a bug to look at


class ClipError(Exception):
    """Why one clip could not be decoded. The caller records it and moves on."""

    def __init__(self, reason: Reason, detail: str, path: str = ""):
        super().__init__(reason, detail, path)
        self.reason, self.detail, self.path = Reason(reason), detail, path

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" + (f" [{self.path}]" if self.path else "")

    def __reduce__(self):  # picklable across the worker pipe despite the custom __init__
        return ClipError, (self.reason, self.detail, self.path)


@dataclass(frozen=True)
class ClipInfo:
    source: str
    source_fps: float                 # the stream's average frame rate
    source_size: tuple[int, int]      # (height, width) of the decoded frames
    bucket: tuple[int, int]           # (height, width) of the output frames
    t0: float                         # window start (s, video timeline)
    t1: float                         # t0 + frames / 24
    frame_times: tuple[float, ...]    # pts (s) of the source frame used for each output frame
    audio_rate_in: int
    audio_channels_in: int
    audio_padded_samples: int         # zeros appended at the tail (<= MAX_AUDIO_PAD_SAMPLES)
    audio_peak: float                 # max |sample| of the output audio (silence check downstream)
    video_backend: str                # "decord" or "pyav"


@dataclass(frozen=True)
class DecodedClip:
    frames: torch.Tensor  # uint8 [F, 3, H, W], H x W == info.bucket
    audio: torch.Tensor   # float32 [variant.audio_samples], mono 16 kHz, starting at t0
    info: ClipInfo

    def __reduce__(self):
        # Through numpy so torch does not move the tensors via shared-memory file descriptors,
        # which a killed worker would leak.
        return _rebuild_clip, (self.frames.numpy(), self.audio.numpy(), self.info)


def _rebuild_clip(frames: np.ndarray, audio: np.ndarray, info: ClipInfo) -> DecodedClip:
    return DecodedClip(torch.from_numpy(frames), torch.from_numpy(audio), info)


def pixels_for_vae(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [F, 3, H, W] -> [3, F, H, W] in [-1, 1], the Wan2.2 VAE's input (x/127.5 - 1)."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected uint8 [F,3,H,W] frames, got {frames.dtype} {tuple(frames.shape)}")
    return (frames.to(dtype) / 127.5 - 1.0).permute(1, 0, 2, 3)


# Pure helpers ---------------------------------------------------------------------------------

def clip_duration_s(variant: Variant) -> float:
    """How much source time one clip needs: the longer of the video and the audio window (the
    10 s model's 314 audio latents outlast its 241 frames by 6 ms)."""
    return max(variant.frames / FPS, variant.audio_samples / AUDIO_SAMPLE_RATE)


def target_frame_times(t0: float, n_frames: int) -> np.ndarray:
    return t0 + np.arange(n_frames, dtype=np.float64) / FPS


def bucket_for(height: int, width: int, area: int, path: str) -> tuple[int, int]:
    """The bucket of a source frame size: snap_to_area, for sizes inside the bucket table."""
    if not aspect_ok(height, width):
        raise ClipError(Reason.BAD_ASPECT, f"{width}x{height} is more than {MAX_ASPECT:g}:1; the bucket table "
                                           f"(precompute/variants.py buckets) stops there", path)
    return snap_to_area(height, width, area)


def pick_frame_indices(frame_starts: np.ndarray, last_frame_end: float, times: np.ndarray) -> np.ndarray:
    """For each time t, the index of the frame displayed at t: the largest pts <= t + epsilon.
    ``frame_starts`` must be sorted (presentation order). Raises TOO_SHORT when a time falls
    before the first frame or after the last one ends."""
    if len(frame_starts) == 0:
        raise ClipError(Reason.TOO_SHORT, "the video stream has no frames")
    idx = np.searchsorted(frame_starts, times + FRAME_PICK_EPSILON_S, side="right") - 1
    if idx[0] < 0:
        raise ClipError(Reason.TOO_SHORT, f"window starts at {times[0]:.3f}s, before the first frame "
                                          f"({frame_starts[0]:.3f}s)")
    if times[-1] >= last_frame_end:
        raise ClipError(Reason.TOO_SHORT, f"window needs a frame at {times[-1]:.3f}s; the video ends at "
                                          f"{last_frame_end:.3f}s")
    return idx


def cover_resize(frames: np.ndarray, bucket: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, h, w, 3] -> uint8 [N, 3, H, W]: scale to cover the bucket (antialiased bicubic),
    then center-crop. Resizes uint8 channels-last directly: torch's fixed-point kernel is ~18x
    faster than float here (one core: 0.04 s vs 0.7 s per 16 720p frames), within a level or two
    of the float result on natural images."""
    n, src_h, src_w, _ = frames.shape
    out_h, out_w = bucket
    scale = max(out_h / src_h, out_w / src_w)
    mid_h, mid_w = max(out_h, round(src_h * scale)), max(out_w, round(src_w * scale))
    top, left = (mid_h - out_h) // 2, (mid_w - out_w) // 2
    out = torch.empty((n, 3, out_h, out_w), dtype=torch.uint8)
    for s in range(0, n, RESIZE_CHUNK_FRAMES):
        chunk = torch.from_numpy(np.ascontiguousarray(frames[s : s + RESIZE_CHUNK_FRAMES])).permute(0, 3, 1, 2)
        if (mid_h, mid_w) != (src_h, src_w):
            chunk = F.interpolate(chunk, size=(mid_h, mid_w), mode="bicubic", antialias=True, align_corners=False)
        out[s : s + RESIZE_CHUNK_FRAMES] = chunk[:, :, top : top + out_h, left : left + out_w]
    return out


def downmix_and_resample(samples: np.ndarray, rate_in: int) -> torch.Tensor:
    """float [C, n] at rate_in -> float32 mono [m] at 16 kHz (channel mean, then MMAudio's
    resampler). Output sample i sits at input time i / 16000, so slicing stays sample-exact."""
    mono = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).mean(dim=0)
    if rate_in == AUDIO_SAMPLE_RATE:
        return mono
    return AF.resample(mono, rate_in, AUDIO_SAMPLE_RATE, **RESAMPLE_KW)


# Probing and decoding -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Probe:
    video_start: float     # s, absolute; the origin of our timeline
    audio_offset: float    # s, audio stream start on our timeline
    fps: float
    duration: float | None  # s on our timeline, if the container says
    audio_rate: int
    audio_channels: int


def _stream_start(stream) -> float:
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _probe(container, path: str) -> _Probe:
    if not container.streams.video:
        raise ClipError(Reason.NO_VIDEO, "no video stream", path)
    if not container.streams.audio:
        raise ClipError(Reason.NO_AUDIO, "no audio stream", path)
    v, a = container.streams.video[0], container.streams.audio[0]
    v_start = _stream_start(v)
    duration = None
    if v.duration is not None and v.time_base is not None:
        duration = float(v.duration * v.time_base)
    elif container.duration is not None:
        duration = container.duration / 1e6 - (v_start - (container.start_time or 0) / 1e6)
    rate = float(v.average_rate) if v.average_rate else (float(v.guessed_rate) if v.guessed_rate else 0.0)
    return _Probe(v_start, _stream_start(a) - v_start, rate, duration, a.codec_context.sample_rate,
                  a.codec_context.channels)


def _choose_window(probe: _Probe, variant: Variant, start: float | None, end: float | None,
                   path: str) -> float:
    need = clip_duration_s(variant)
    t0 = max(0.0, probe.audio_offset) if start is None else float(start)
    if not math.isfinite(t0) or t0 < 0:
        raise ClipError(Reason.BAD_WINDOW, f"start={start} must be a finite time >= 0", path)
    if end is not None:
        if not math.isfinite(end) or end <= t0:
            raise ClipError(Reason.BAD_WINDOW, f"start={t0} must be before end={end}", path)
        if end - t0 < need - 1e-6:
            raise ClipError(Reason.BAD_WINDOW, f"window [{t0}, {end}] is {end - t0:.3f}s, shorter than one "
                                               f"{variant.name} clip ({need:.3f}s)", path)
    if probe.duration is not None and t0 + need > probe.duration + 0.05:
        raise ClipError(Reason.TOO_SHORT, f"clip [{t0:.3f}, {t0 + need:.3f}]s is past the end of the "
                                          f"{probe.duration:.3f}s video", path)
    return t0


def _decode_video_decord(path: str, times: np.ndarray, area: int) -> tuple[torch.Tensor, tuple[int, int], np.ndarray]:
    """Resized frames, the source (h, w) and the picked frames' pts. Decodes and resizes
    RESIZE_CHUNK_FRAMES distinct frames at a time, so a 1080p source never sits in memory whole."""
    import decord  # imported here so a process that only writes shards never loads it

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    stamps = reader.get_frame_timestamp(range(len(reader))).astype(np.float64)
    idx = pick_frame_indices(stamps[:, 0], float(stamps[-1, 1]), times)
    unique, inverse = np.unique(idx, return_inverse=True)
    chunks, source_size = [], (0, 0)
    for s in range(0, len(unique), RESIZE_CHUNK_FRAMES):
        batch = reader.get_batch(unique[s : s + RESIZE_CHUNK_FRAMES].tolist()).asnumpy()
        source_size = batch.shape[1:3]
        chunks.append(cover_resize(batch, bucket_for(*source_size, area, path)))
    return torch.cat(chunks)[torch.from_numpy(inverse)], source_size, stamps[idx, 0]


def _decode_video_pyav(path: str, video_start: float, times: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Same picking rule as decord's path, streamed: hold only the previous frame."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if times[0] > SEEK_LOOKBACK_S:
            container.seek(int((video_start + times[0] - SEEK_LOOKBACK_S) / stream.time_base), stream=stream)
        picked: list[np.ndarray] = []
        picked_times: list[float] = []
        prev: tuple[float, np.ndarray] | None = None
        prev_end = -math.inf
        for frame in container.decode(stream):
            t = float(frame.pts * frame.time_base) - video_start
            while len(picked) < len(times) and times[len(picked)] + FRAME_PICK_EPSILON_S < t:
                if prev is None:
                    raise ClipError(Reason.TOO_SHORT, f"window starts at {times[0]:.3f}s, before the "
                                                      f"first frame ({t:.3f}s)", path)
                picked.append(prev[1])
                picked_times.append(prev[0])
            if len(picked) == len(times):
                break
            duration = float(frame.duration * frame.time_base) if frame.duration else 1.0 / (fps or FPS)
            prev, prev_end = (t, frame.to_ndarray(format="rgb24")), t + duration
        remaining = times[len(picked):]
        if len(remaining):
            if prev is None:
                raise ClipError(Reason.TOO_SHORT, "no video frames decoded in the window", path)
            pick_frame_indices(np.array([prev[0]]), prev_end, remaining)  # raises if past the end
            picked += [prev[1]] * len(remaining)
            picked_times += [prev[0]] * len(remaining)
    return np.stack(picked), np.array(picked_times)


def _to_float_planar(frame: av.AudioFrame) -> np.ndarray:
    """Any PyAV audio frame -> float32 [channels, n] in [-1, 1]."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if data.dtype.kind == "i":
        return data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    return data.astype(np.float32, copy=False)


def _decode_audio(path: str, probe: _Probe, t0: float, n_out: int) -> tuple[torch.Tensor, int]:
    """Mono 16 kHz float32 [n_out] starting at t0, and how many tail samples were zero-padded."""
    t_end = t0 + n_out / AUDIO_SAMPLE_RATE
    with av.open(path) as container:
        stream = container.streams.audio[0]
        rate = probe.audio_rate
        seek_to = t0 - SEEK_LOOKBACK_S
        if seek_to > probe.audio_offset:
            container.seek(int((probe.video_start + seek_to) / stream.time_base), stream=stream)
        first_time: float | None = None
        chunks: list[np.ndarray] = []
        written = 0  # samples placed so far, counted from first_time
        drift: list[float] = []  # each frame's timestamp minus where counting samples put it
        for frame in container.decode(stream):
            data = _to_float_planar(frame)
            t = float(frame.pts * frame.time_base) - probe.video_start \
                if frame.pts is not None and frame.time_base is not None else None
            if first_time is None:
                first_time = t if t is not None else probe.audio_offset
            if t is not None:
                # Place each frame at its own timestamp: a gap becomes silence, an overlap is
                # trimmed, so sync survives a discontinuous track. Within the timestamps'
                # resolution (1 ms in Matroska = 48 samples at 48 kHz) the track is contiguous.
                slack = max(2, math.ceil(rate * float(frame.time_base)) + 1)
                position = round((t - first_time) * rate)
                if position > written + slack:
                    chunks.append(np.zeros((data.shape[0], position - written), np.float32))
                    written = position
                elif position < written - slack:
                    data = data[:, written - position :]
                drift.append(t - first_time - written / rate)
            chunks.append(data)
            written += data.shape[1]
            if first_time + written / rate > t_end + AUDIO_MARGIN_S:
                break
    if first_time is None or written == 0:
        raise ClipError(Reason.TOO_SHORT, "the audio stream decoded to no samples", path)
    # After a seek the first timestamp is as coarse as the time base (1 ms in Matroska); the
    # mean over all frames of the rounding error is ~0, so anchor on it instead.
    if drift:
        first_time += float(np.mean(drift))
    audio = downmix_and_resample(np.concatenate(chunks, axis=1), rate)
    offset = round((t0 - first_time) * AUDIO_SAMPLE_RATE)
    if offset < 0:
        raise ClipError(Reason.TOO_SHORT, f"audio starts at {first_time:.3f}s, after the window start "
                                          f"{t0:.3f}s", path)
    clip = audio[offset : offset + n_out]
    shortfall = n_out - clip.numel()
    if shortfall > MAX_AUDIO_PAD_SAMPLES:
        raise ClipError(Reason.TOO_SHORT, f"audio ends {shortfall} samples ({shortfall / AUDIO_SAMPLE_RATE:.3f}s) "
                                          f"before the window end {t_end:.3f}s", path)
    if shortfall > 0:
        clip = F.pad(clip, (0, shortfall))
    return clip.contiguous(), max(shortfall, 0)


def decode_clip(path: str | os.PathLike, variant: Variant, start: float | None = None,
                end: float | None = None, *, video_backend: str = "auto") -> DecodedClip:
    """Decode the clip that starts at ``start`` (default: the first time both streams exist) and
    must fit before ``end`` (default: the end of the file). ``video_backend``: "auto" (decord,
    PyAV if decord cannot open the file), "decord" or "pyav". Every problem with the input is a
    ClipError; anything else is a bug."""
    path = str(path)
    if video_backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"video_backend must be auto, decord or pyav, got {video_backend!r}")
    if not os.path.exists(path):
        raise ClipError(Reason.MISSING, "no such file", path)
    try:
        try:
            with av.open(path) as container:
                probe = _probe(container, path)
        except av.error.FFmpegError as exc:
            raise ClipError(Reason.UNREADABLE, f"cannot open: {exc}", path) from None
        t0 = _choose_window(probe, variant, start, end, path)
        times = target_frame_times(t0, variant.frames)
        pixels, frame_times, backend = None, None, "decord"
        if video_backend in ("auto", "decord"):
            try:
                pixels, (source_h, source_w), frame_times = _decode_video_decord(path, times, variant.area)
            except ClipError:
                raise
            except Exception as exc:  # decord raises its own DECORDError, RuntimeError, ...
                if video_backend == "decord":
                    raise ClipError(Reason.UNREADABLE, f"decord: {exc}", path) from None
        if pixels is None:
            backend = "pyav"
            frames, frame_times = _decode_video_pyav(path, probe.video_start, times, probe.fps)
            source_h, source_w = frames.shape[1:3]
            pixels = cover_resize(frames, bucket_for(source_h, source_w, variant.area, path))
        bucket = (pixels.shape[2], pixels.shape[3])
        audio, padded = _decode_audio(path, probe, t0, variant.audio_samples)
    except ClipError as exc:
        if not exc.path:
            exc.path = path
        raise
    except av.error.FFmpegError as exc:
        raise ClipError(Reason.UNREADABLE, f"decode failed: {exc}", path) from None
    info = ClipInfo(
        source=path, source_fps=probe.fps, source_size=(int(source_h), int(source_w)), bucket=bucket,
        t0=t0, t1=t0 + variant.frames / FPS, frame_times=tuple(float(t) for t in frame_times),
        audio_rate_in=probe.audio_rate, audio_channels_in=probe.audio_channels,
        audio_padded_samples=padded, audio_peak=float(audio.abs().max()), video_backend=backend,
    )
    return DecodedClip(pixels, audio, info)


# The worker pool ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeJob:
    path: str
    start: float | None = None
    end: float | None = None
    tag: object = None  # the caller's handle (e.g. manifest row number); must be picklable


DecodeResult = DecodedClip | ClipError
DecodeFn = Callable[..., DecodedClip]  # decode_clip's signature: (path, variant, start, end)

_READY = "ready"


def _worker_loop(conn: Connection, variant: Variant, decode_fn: DecodeFn, max_tasks: int) -> None:
    torch.set_num_threads(1)  # parallelism comes from the workers; more threads would oversubscribe
    conn.send(_READY)
    for _ in range(max_tasks):
        message = conn.recv()
        if message is None:
            return
        seq, job = message
        try:
            result: DecodeResult = decode_fn(job.path, variant, job.start, job.end)
        except ClipError as exc:
            result = exc
        except Exception:
            result = ClipError(Reason.INTERNAL, traceback.format_exc(limit=8), job.path)
        conn.send((seq, result))
    # Falling off the end is the recycling: the parent counted the tasks and starts a new worker.


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    tasks: int = 0
    seq: int | None = None      # the job it is running
    deadline: float = math.inf  # monotonic time after which it is killed


class DecodePool:
    """``decode_clip`` in worker processes, each killed after ``timeout_s`` on one clip and
    replaced after ``max_tasks_per_worker`` clips.

    ``imap(jobs)`` yields ``(job, DecodedClip | ClipError)`` **in submission order** (so shards
    come out in manifest order and reruns are reproducible); at most ``workers + prefetch`` jobs
    are taken from ``jobs`` ahead of what has been yielded. A hung clip yields
    ``ClipError(TIMEOUT)``, a crashed worker ``ClipError(WORKER_DIED)``; the pool goes on.
    """

    def __init__(self, variant: Variant, workers: int = 2, timeout_s: float = 120.0,
                 max_tasks_per_worker: int = 32, prefetch: int = 2, start_method: str = "forkserver",
                 decode_fn: DecodeFn = decode_clip, startup_timeout_s: float = 300.0):
        if workers < 1 or max_tasks_per_worker < 1 or prefetch < 0 or timeout_s <= 0:
            raise ValueError("need workers >= 1, max_tasks_per_worker >= 1, prefetch >= 0, timeout_s > 0")
        self.variant, self.timeout_s, self.max_tasks = variant, timeout_s, max_tasks_per_worker
        self.decode_fn, self.startup_timeout_s = decode_fn, startup_timeout_s
        self.max_pending = workers + prefetch
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Import torch/av/decord once in the server; each (re)started worker is then a cheap
            # fork of a process that has never run a decoder.
            self._ctx.set_forkserver_preload([__name__])
        self._workers = [self._start_worker() for _ in range(workers)]
        self.restarts = 0  # workers replaced after a timeout or crash (not counting recycling)

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_loop, args=(child, self.variant, self.decode_fn, self.max_tasks),
                                    daemon=True, name="decode-worker")
        process.start()
        child.close()
        worker = _Worker(process, parent)
        worker.deadline = time.monotonic() + self.startup_timeout_s
        return worker

    def _replace(self, worker: _Worker, kill: bool) -> None:
        if kill and worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=10)
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._start_worker()

    def imap(self, jobs: Iterable[DecodeJob]) -> Iterator[tuple[DecodeJob, DecodeResult]]:
        try:
            yield from self._run(iter(jobs))
        finally:
            # The consumer stopped early: a worker still busy would answer a later imap with a
            # stale result, so it is replaced.
            for worker in list(self._workers):
                if worker.seq is not None:
                    self._replace(worker, kill=True)

    def _run(self, source: Iterator[DecodeJob]) -> Iterator[tuple[DecodeJob, DecodeResult]]:
        submitted: dict[int, DecodeJob] = {}   # seq -> job, until yielded
        waiting: list[int] = []                # taken from `source`, not yet sent to a worker
        results: dict[int, DecodeResult] = {}
        counter = itertools.count()
        exhausted = False
        next_out = 0
        while True:
            while not exhausted and len(submitted) < self.max_pending:
                job = next(source, None)
                if job is None:
                    exhausted = True
                    break
                seq = next(counter)
                submitted[seq] = job
                waiting.append(seq)
            for worker in self._workers:
                if waiting and worker.ready and worker.seq is None:
                    seq = waiting.pop(0)
                    worker.conn.send((seq, submitted[seq]))
                    worker.seq, worker.deadline = seq, time.monotonic() + self.timeout_s
            while next_out in results:
                yield submitted.pop(next_out), results.pop(next_out)
                next_out += 1
            if exhausted and not submitted:
                return
            self._collect(results)

    def _collect(self, results: dict[int, DecodeResult]) -> None:
        """Wait for one message or the nearest deadline; handle replies, deaths and timeouts."""
        now = time.monotonic()
        nearest = min(w.deadline for w in self._workers if w.seq is not None or not w.ready) \
            if any(w.seq is not None or not w.ready for w in self._workers) else now + 1.0
        ready = wait([w.conn for w in self._workers], timeout=max(0.0, nearest - now))
        for worker in [w for w in self._workers if w.conn in ready]:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                self._on_dead(worker, results)
                continue
            if message == _READY:
                worker.ready, worker.deadline = True, math.inf
                continue
            seq, result = message
            results[seq] = result
            worker.seq, worker.deadline, worker.tasks = None, math.inf, worker.tasks + 1
            if worker.tasks >= self.max_tasks:
                self._replace(worker, kill=False)
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.deadline > now:
                continue
            if worker.seq is None:
                raise RuntimeError(f"a decode worker did not start within {self.startup_timeout_s}s")
            results[worker.seq] = ClipError(Reason.TIMEOUT, f"no result after {self.timeout_s}s; worker killed")
            self.restarts += 1
            self._replace(worker, kill=True)

    def _on_dead(self, worker: _Worker, results: dict[int, DecodeResult]) -> None:
        worker.process.join(timeout=10)
        if worker.seq is None and not worker.ready:
            raise RuntimeError(f"a decode worker died on start-up (exit code {worker.process.exitcode})")
        if worker.seq is not None:
            results[worker.seq] = ClipError(Reason.WORKER_DIED, f"worker exited with code {worker.process.exitcode}")
            self.restarts += 1
        self._replace(worker, kill=True)

    def close(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
