"""precompute/media.py on real H.264/AAC files: exact shapes, frame picking by timestamp, sample-
exact audio, typed errors for bad inputs, and a worker pool that survives hangs and crashes."""
import math

import numpy as np
import pytest
import torch

import clips
from precompute.media import (
    ClipError,
    DecodedClip,
    DecodeJob,
    DecodePool,
    Reason,
    cover_resize,
    decode_clip,
    pick_frame_indices,
    pixels_for_vae,
)
from precompute.variants import AUDIO_SAMPLES_PER_LATENT, FPS, get_variant, snap_to_area

TINY = get_variant("tiny")


def picked_indices(clip: DecodedClip) -> list[int]:
    """The source frame index encoded in the top rows of each output frame."""
    return [clips.read_index(frame[:, : frame.shape[1] // 4].float().mean()) for frame in clip.frames]


def expected_indices(t0: float, source_fps: float, n: int) -> list[int]:
    """The frame displayed at t0 + k/24 in a constant-rate source: floor(t * fps)."""
    return [math.floor((t0 + k / FPS) * source_fps + 1e-6) % 60 for k in range(n)]


@pytest.mark.parametrize(
    "fps, container, rate, channels, width, height",
    [
        (24, "mp4", 16_000, 1, 64, 64),
        (25, "mkv", 22_050, 2, 100, 70),
        (30, "mp4", 44_100, 2, 70, 100),
        (30, "mkv", 48_000, 1, 160, 90),
    ],
)
def test_decode_gives_exact_shapes_bucket_and_frames_by_timestamp(tmp_path, fps, container, rate, channels, width, height):
    path = clips.make_clip(tmp_path / f"c.{container}", 1.0, fps, width, height, audio_rate=rate,
                           channels=channels, container=container)
    clip = decode_clip(path, TINY, start=0.1)

    bucket = snap_to_area(height, width, TINY.area)
    assert clip.frames.dtype == torch.uint8
    assert tuple(clip.frames.shape) == (TINY.frames, 3, *bucket)
    assert clip.audio.dtype == torch.float32 and tuple(clip.audio.shape) == (TINY.audio_samples,)
    assert clip.info.bucket == bucket
    assert clip.info.source_size == (height, width)
    assert clip.info.source_fps == pytest.approx(fps)
    assert (clip.info.audio_rate_in, clip.info.audio_channels_in) == (rate, channels)
    assert clip.info.t0 == pytest.approx(0.1) and clip.info.t1 == pytest.approx(0.1 + TINY.frames / FPS)
    assert picked_indices(clip) == expected_indices(0.1, fps, TINY.frames)
    # the sine is there, at about its amplitude after the channel mean
    assert 0.02 < clip.info.audio_peak < 0.1


def test_30fps_source_duplicates_nothing_and_skips_every_fifth(tmp_path):
    """24 of every 30 source frames are shown; the picked frames' pts are the ones on screen."""
    path = clips.make_clip(tmp_path / "c.mp4", 1.0, 30, 64, 64)
    clip = decode_clip(path, TINY, start=0.0)
    assert picked_indices(clip) == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18, 20]
    for k, t in enumerate(clip.info.frame_times):
        assert t <= k / FPS + 1e-3 < t + 1 / 30


def test_decord_and_pyav_backends_pick_identical_frames_after_a_seek(tmp_path):
    path = clips.make_clip(tmp_path / "c.mkv", 3.2, 30, 64, 48, container="mkv", audio_rate=48_000)
    by_decord = decode_clip(path, TINY, start=2.3, video_backend="decord")
    by_pyav = decode_clip(path, TINY, start=2.3, video_backend="pyav")
    assert by_decord.info.video_backend == "decord" and by_pyav.info.video_backend == "pyav"
    assert torch.equal(by_decord.frames, by_pyav.frames)
    assert np.allclose(by_decord.info.frame_times, by_pyav.info.frame_times, atol=1e-3)
    assert picked_indices(by_pyav) == expected_indices(2.3, 30, TINY.frames)
    assert torch.equal(by_decord.audio, by_pyav.audio)


@pytest.mark.parametrize(
    "container, rate, channels, seconds, start",
    [
        ("mp4", 16_000, 1, 1.2, 0.1),
        ("mp4", 48_000, 2, 1.2, 0.25),
        ("mkv", 44_100, 2, 1.2, 0.1),
        ("mkv", 48_000, 1, 3.0, 2.1),  # seeks, and Matroska's 1 ms timestamps must not shift it
        ("mp4", 22_050, 1, 3.0, 2.1),
    ],
)
def test_click_lands_on_its_sample_and_audio_latent(tmp_path, container, rate, channels, seconds, start):
    click_at = start + 0.4  # 6,400 samples in: the middle of audio latent 12
    path = clips.make_clip(tmp_path / f"c.{container}", seconds, 24, 64, 64, audio_rate=rate,
                           channels=channels, container=container, click_at=click_at)
    clip = decode_clip(path, TINY, start=start)
    expected = round((click_at - start) * 16_000)
    found = int(clip.audio.abs().argmax())
    # The click is 3 source samples long and AAC-coded: its peak may sit a sample or two late.
    assert abs(found - expected) <= 3, (found, expected)
    assert found // AUDIO_SAMPLES_PER_LATENT == expected // AUDIO_SAMPLES_PER_LATENT == 12
    assert clip.audio[found].abs() > 0.3


def _bad_input(kind: str, tmp_path):
    small = dict(seconds=1.0, fps=24, width=64, height=64)
    if kind == "missing":
        return tmp_path / "nope.mp4", {}
    if kind == "empty":
        return clips.make_empty(tmp_path / "e.mp4"), {}
    if kind == "random_bytes":
        return clips.make_random_bytes(tmp_path / "r.mp4"), {}
    if kind == "truncated_mp4":
        return clips.make_truncated(tmp_path / "t.mp4", **small), {}
    if kind == "truncated_mkv":  # opens fine; the second half of the window is gone
        return clips.make_truncated(tmp_path / "t.mkv", container="mkv", **small), {"start": 0.25}
    if kind == "no_audio":
        return clips.make_silent_track_missing(tmp_path / "n.mp4", **small), {}
    if kind == "too_short":
        return clips.make_too_short(tmp_path / "s.mp4", fps=24, width=64, height=64), {}
    if kind == "strip_9_to_1":  # outside the bucket table (precompute.variants.MAX_ASPECT)
        return clips.make_clip(tmp_path / "strip.mp4", seconds=1.0, fps=24, width=288, height=32), {}
    good = clips.make_clip(tmp_path / "g.mp4", **small)
    window = {"start_after_end": {"start": 0.5, "end": 0.4},
              "window_shorter_than_clip": {"start": 0.0, "end": 0.5},
              "negative_start": {"start": -1.0},
              "start_near_end": {"start": 0.6}}[kind]
    return good, window


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", Reason.MISSING),
        ("empty", Reason.UNREADABLE),
        ("random_bytes", Reason.UNREADABLE),
        ("truncated_mp4", Reason.UNREADABLE),
        ("truncated_mkv", Reason.TOO_SHORT),
        ("no_audio", Reason.NO_AUDIO),
        ("too_short", Reason.TOO_SHORT),
        ("start_after_end", Reason.BAD_WINDOW),
        ("window_shorter_than_clip", Reason.BAD_WINDOW),
        ("negative_start", Reason.BAD_WINDOW),
        ("start_near_end", Reason.TOO_SHORT),
        ("strip_9_to_1", Reason.BAD_ASPECT),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_bad_input_raises_clip_error_with_reason(tmp_path, kind, reason, backend):
    path, window = _bad_input(kind, tmp_path)
    with pytest.raises(ClipError) as caught:
        decode_clip(path, TINY, video_backend=backend, **window)
    assert caught.value.reason is reason
    assert str(path) in str(caught.value)


def test_pixels_for_vae_maps_uint8_to_minus_one_one():
    frames = torch.tensor([0, 255, 127, 128], dtype=torch.uint8).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    pixels = pixels_for_vae(frames)
    assert pixels.shape == (3, 2, 2, 2)
    assert pixels[0, 0].flatten().tolist() == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1, 128 / 127.5 - 1], abs=1e-6)
    with pytest.raises(ValueError):
        pixels_for_vae(frames.float())


def test_cover_resize_center_crops_the_long_side():
    # 64x128 source: left and right quarters black/white, middle half grey -> a 64x64 bucket
    # must keep exactly the middle half.
    frame = np.full((1, 64, 128, 3), 100, dtype=np.uint8)
    frame[:, :, :32] = 0
    frame[:, :, 96:] = 255
    out = cover_resize(frame, (64, 64))
    assert out.shape == (1, 3, 64, 64)
    assert (out == 100).all()


def test_pick_frame_indices_rejects_times_outside_the_video():
    starts = np.arange(10) / 30
    assert pick_frame_indices(starts, 10 / 30, np.array([0.0, 1 / 24, 0.2])).tolist() == [0, 1, 6]
    with pytest.raises(ClipError) as early:
        pick_frame_indices(starts + 0.1, 0.5, np.array([0.0]))
    assert early.value.reason is Reason.TOO_SHORT
    with pytest.raises(ClipError) as late:
        pick_frame_indices(starts, 10 / 30, np.array([10 / 30 + 0.01]))
    assert late.value.reason is Reason.TOO_SHORT


def test_clip_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(ClipError(Reason.TIMEOUT, "slow", "/x.mp4")))
    assert (error.reason, error.detail, error.path) == (Reason.TIMEOUT, "slow", "/x.mp4")


# The pool ---------------------------------------------------------------------------------------

def test_pool_turns_a_hung_decoder_into_a_timeout_and_keeps_going(tmp_path):
    good = str(clips.make_clip(tmp_path / "g.mp4", 1.0, 24, 64, 64))
    hung = str(clips.make_fifo(tmp_path / "stalled.mp4"))  # open() blocks forever in FFmpeg
    jobs = [DecodeJob(good, tag=0), DecodeJob(hung, tag=1), DecodeJob(good, tag=2),
            DecodeJob(str(tmp_path / "missing.mp4"), tag=3)]
    with DecodePool(TINY, workers=1, timeout_s=2.5, max_tasks_per_worker=8) as pool:
        results = list(pool.imap(jobs))
        assert pool.restarts == 1
    assert [job.tag for job, _ in results] == [0, 1, 2, 3]  # submission order
    assert isinstance(results[0][1], DecodedClip) and isinstance(results[2][1], DecodedClip)
    assert results[0][1].frames.shape == (TINY.frames, 3, 64, 64)
    assert torch.equal(results[0][1].frames, results[2][1].frames)
    assert results[1][1].reason is Reason.TIMEOUT
    assert results[3][1].reason is Reason.MISSING


def test_pool_recycles_workers_and_survives_a_crash(tmp_path):
    jobs = [DecodeJob(f"job{i}", tag=i) for i in range(5)]
    with DecodePool(TINY, workers=1, timeout_s=30.0, max_tasks_per_worker=2, prefetch=0,
                    decode_fn=clips.worker_pid) as pool:
        pids = [pid for _, pid in pool.imap(jobs)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]

    with DecodePool(TINY, workers=1, timeout_s=30.0, decode_fn=clips.crash_worker) as pool:
        results = list(pool.imap([DecodeJob("a"), DecodeJob("b")]))
        assert pool.restarts == 2
    assert [r.reason for _, r in results] == [Reason.WORKER_DIED, Reason.WORKER_DIED]


def test_pool_can_be_reused_after_the_consumer_stops_early(tmp_path):
    with DecodePool(TINY, workers=1, timeout_s=30.0, decode_fn=clips.worker_pid) as pool:
        for _ in pool.imap([DecodeJob(f"a{i}", tag=i) for i in range(4)]):
            break
        again = list(pool.imap([DecodeJob("b0", tag="b0"), DecodeJob("b1", tag="b1")]))
    assert [job.tag for job, _ in again] == ["b0", "b1"]
    assert all(isinstance(pid, int) for _, pid in again)


def test_late_audio_track_sets_the_default_start_and_stays_in_sync(tmp_path):
    path = clips.make_clip(tmp_path / "late.mkv", 1.5, 24, 64, 64, audio_rate=48_000, container="mkv",
                           click_at=0.7, audio_delay=0.3)
    clip = decode_clip(path, TINY)
    assert clip.info.t0 == pytest.approx(0.3, abs=1e-3)  # the first time both streams exist
    assert picked_indices(clip)[0] == 7  # the frame on screen at 0.3 s
    assert abs(int(clip.audio.abs().argmax()) - 6400) <= 3  # the click, 0.4 s after t0
    with pytest.raises(ClipError) as caught:
        decode_clip(path, TINY, start=0.1)  # video exists there, audio does not
    assert caught.value.reason is Reason.TOO_SHORT
