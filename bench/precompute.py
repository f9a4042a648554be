"""Stage-1 throughput: decode, encode and shard-write time per clip, separated, then the real
pipeline end to end (precompute.encode.encode_rows: decode workers fed ahead of the GPU).

    python bench/precompute.py --out bench/results/precompute_h200.json   # 1 GPU, full-size, bf16
    python bench/precompute.py --device cpu --variant tiny                 # smoke test, any machine

Full-size encoders (Wan2.2 VAE, MMAudio 16k VAE, umT5-XXL) are built from their configs with random
N(0, 0.02) weights directly on the device (speed does not depend on the values; spec/data.md §7.1),
so no checkpoint is needed. The source is a synthetic H.264 + AAC clip (48 kHz stereo) of the
variant's default size written with PyAV; its noisy half-frame makes the bitrate high, so decode
times are on the pessimistic side. Target (the issue): >= 1 clip/s per GPU at 720²x121 + 5 s audio,
with decoding never the bottleneck.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path

# `python bench/precompute.py` puts bench/ first on sys.path, where this file would shadow the
# `precompute` package it measures.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from precompute.encode import EncodeConfig, FailureLog, ManifestRow, encode_clip, encode_rows
from precompute.encoders.bundle import EncoderBundle
from precompute.encoders.mmaudio_vae import AudioVAE, VAEConfig, random_checkpoint
from precompute.encoders.umt5 import UMT5_XXL, TextEncoder, build_encoder_model, build_tiny_tokenizer
from precompute.encoders.wan_vae import WanVideoVAE
from precompute.encoders.wan_vae_modules import WanVAEConfig, WanVAEModel
from precompute.media import ClipError, DecodeJob, DecodePool, clip_duration_s, decode_clip, pixels_for_vae
from precompute.shards import ShardWriter, sample_key
from precompute.variants import Variant, get_variant

INIT_STD = 0.02
# ~140 umT5 tokens with the real tokenizer; the tiny bench tokenizer cuts it finer (more tokens).
PROMPT = ("A woman in a red coat walks along a rainy street at night, neon signs reflecting in the puddles, "
          "she turns to the camera and says <S>I told you it would work.<E> then smiles. "
          "<AUDCAP>Clear female voice, soft rain, distant traffic, footsteps on wet stone.<ENDAUDCAP>")


@dataclass
class Result:
    variant: str
    device: str
    dtype: str
    source: str
    bucket: str
    decode_one_s: float          # one clip, in this process
    decode_pool_clips_s: float   # DecodePool with `decode_workers` processes
    decode_workers: int
    video_vae_s: float           # per clip, incl. the uint8 host->device copy
    audio_vae_s: float
    t5_per_prompt_s: float       # batch of text_batch prompts / text_batch
    text_tokens: int
    write_s: float               # per sample: safetensors + tar + fsync'd shard close
    encode_clips_s: float        # 1 / (video + audio + t5 + write): the GPU side alone
    end_to_end_clips_s: float    # encode_rows over `clips` rows, decode pool start-up included
    steady_clips_s: float        # end to end between the first and the last finished clip
    end_to_end_failed: int
    clips: int
    peak_gib: float


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, INIT_STD, generator=gen)
    return module


def full_size_bundle(variant: Variant, device: torch.device, dtype: torch.dtype, cache: Path) -> EncoderBundle:
    """Ovi's three encoders at full size with random weights, built on `device` (no files)."""
    with torch.device(device):
        video = WanVideoVAE(_randomise(WanVAEModel(WanVAEConfig()), 0).to(dtype))
    audio = AudioVAE.from_state_dict(random_checkpoint(VAEConfig(), seed=0), device=device)
    t5 = build_encoder_model(UMT5_XXL, device="meta").to_empty(device=device).to(dtype)
    t5.tie_weights()
    text = TextEncoder(_randomise(t5, 0), build_tiny_tokenizer(cache / "tokenizer"), text_len=variant.text_len,
                       pad_to_longest=True)
    return EncoderBundle(video, audio, text, {"all": "random"}, device)


def make_source(path: Path, hw: tuple[int, int], seconds: float, fps: int = 24, audio_rate: int = 48_000) -> Path:
    """H.264 (crf 18) + AAC stereo: a moving gradient with per-frame noise, a sine with noise."""
    height, width = hw
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(height), np.arange(width)).astype(np.int32)
    with av.open(str(path), mode="w", format="mp4") as out:
        video = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if video.codec_context.name == "libx264":
            video.options = {"crf": "18", "preset": "veryfast"}
        audio = out.add_stream("aac", rate=audio_rate)
        audio.layout = "stereo"
        for i in range(int(seconds * fps)):
            rgb = np.stack([(ramp + 3 * i) % 256, (ramp // 2 + 5 * i) % 256, (255 - ramp) % 256], axis=-1)
            rgb = (rgb + rng.integers(0, 12, rgb.shape)).clip(0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        n = int(seconds * audio_rate)
        t = np.arange(n) / audio_rate
        wave = (0.2 * np.sin(2 * np.pi * 440 * t) + 0.02 * rng.standard_normal(n)).astype(np.float32)
        for s in range(0, n, 1024):
            block = np.ascontiguousarray(np.stack([wave[s : s + 1024]] * 2))
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = audio_rate, s
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocator, cuDNN autotune)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def run(args: argparse.Namespace) -> Result:
    torch.manual_seed(0)
    variant = get_variant(args.variant)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    work = Path(tempfile.mkdtemp(prefix="bench_precompute_", dir=args.workdir))
    try:
        return _measure(args, variant, device, dtype, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a 720p run leaves ~300 MB of shards


def _measure(args: argparse.Namespace, variant: Variant, device: torch.device, dtype: torch.dtype,
             work: Path) -> Result:
    starts = [round(0.04 * i, 3) for i in range(args.clips)]  # distinct windows -> distinct keys
    hw = tuple(args.source_hw) if args.source_hw else variant.default_hw
    source = make_source(work / "source.mp4", hw, clip_duration_s(variant) + starts[-1] + 0.5)

    decode_clip(source, variant)  # warm-up: imports, page cache
    start = time.perf_counter()
    clip = decode_clip(source, variant)
    decode_one_s = time.perf_counter() - start
    with DecodePool(variant, workers=args.decode_workers, timeout_s=600) as pool:
        list(pool.imap([DecodeJob(str(source), 0.0)] * args.decode_workers))  # workers started and warm
        start = time.perf_counter()
        results = list(pool.imap(DecodeJob(str(source), s) for s in starts))
        decode_pool_clips_s = len(results) / (time.perf_counter() - start)
    errors = [result for _, result in results if isinstance(result, ClipError)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(results)} bench clips failed to decode: {errors[0]}")

    bundle = (EncoderBundle.load(variant, None, device, dtype, cache_dir=work) if variant.name == "tiny"
              else full_size_bundle(variant, device, dtype, work))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = ManifestRow(0, source, source.name, PROMPT, None, 0.0, None, sample_key(source.name, 0.0, variant.name), {})
    texts = bundle.text.encode_with_ids([PROMPT] * args.text_batch)
    with torch.inference_mode():
        video_vae_s = timed(lambda: bundle.video_vae.encode(
            pixels_for_vae(clip.frames.to(device), bundle.video_vae.dtype)[None]), device, args.repeats)
        audio_vae_s = timed(lambda: bundle.audio_vae.encode(clip.audio[None].to(device)), device, args.repeats)
        t5_s = timed(lambda: bundle.text.encode_with_ids([PROMPT] * args.text_batch), device, args.repeats)
    sample = encode_clip(bundle, variant, row, clip, texts.contexts[0], texts.text_ids[0])

    with ShardWriter(work / "write_bench", rank=0, maxcount=args.samples_per_shard) as writer:
        start = time.perf_counter()
        for i in range(args.clips):
            writer.write(replace(sample, key=f"{i:016x}"))
        writer.close()
        write_s = (time.perf_counter() - start) / args.clips

    cfg = EncodeConfig(manifest=work / "none.csv", out=work / "e2e", variant=variant, encoders=None,
                       samples_per_shard=args.samples_per_shard, decode_workers=args.decode_workers,
                       decode_timeout_s=600, text_batch=args.text_batch)
    rows = [ManifestRow(i, source, source.name, PROMPT, None, s, None, sample_key(source.name, s, variant.name), {})
            for i, s in enumerate(starts)]
    with ShardWriter(cfg.out, rank=0, maxcount=cfg.samples_per_shard) as writer:
        start = time.perf_counter()
        clock = _Clock()
        failures = FailureLog(cfg.out, 0)
        encode_rows(cfg, bundle, rows, writer, failures, clock)
        writer.close()
        sync(device)
        end_to_end_s = time.perf_counter() - start

    t5_per_prompt_s = t5_s / args.text_batch
    encode_s = video_vae_s + audio_vae_s + t5_per_prompt_s + write_s
    return Result(
        variant=variant.name, device=str(device), dtype=args.dtype, source=f"{source.stat().st_size / 1e6:.1f} MB "
        f"{hw[0]}x{hw[1]} h264+aac", bucket="x".join(map(str, clip.info.bucket)),
        decode_one_s=decode_one_s, decode_pool_clips_s=decode_pool_clips_s, decode_workers=args.decode_workers,
        video_vae_s=video_vae_s, audio_vae_s=audio_vae_s, t5_per_prompt_s=t5_per_prompt_s,
        text_tokens=int(texts.text_ids[0].numel()), write_s=write_s, encode_clips_s=1.0 / encode_s,
        end_to_end_clips_s=args.clips / end_to_end_s, steady_clips_s=clock.steady_rate(),
        end_to_end_failed=sum(failures.counts.values()), clips=args.clips,
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
    )


class _Clock:
    """A progress sink that notes when each clip finished (for the steady-state rate)."""

    def __init__(self):
        self.times: list[float] = []

    def update(self, n: int = 1) -> None:
        self.times += [time.perf_counter()] * n

    def steady_rate(self) -> float:
        """Clips/s between the first and the last finished clip: start-up excluded."""
        span = self.times[-1] - self.times[0] if len(self.times) > 1 else 0.0
        return (len(self.times) - 1) / span if span > 0 else float("nan")


def table(r: Result) -> str:
    rows = [
        ("decode, 1 clip in-process", f"{r.decode_one_s:.3f} s", f"{1 / r.decode_one_s:.2f}"),
        (f"decode, pool of {r.decode_workers} workers", "", f"{r.decode_pool_clips_s:.2f}"),
        ("Wan2.2 VAE encode (+ host->device)", f"{r.video_vae_s:.3f} s", ""),
        ("MMAudio VAE encode", f"{r.audio_vae_s:.4f} s", ""),
        (f"umT5 per prompt ({r.text_tokens} tokens, batched)", f"{r.t5_per_prompt_s:.4f} s", ""),
        ("shard write per sample", f"{r.write_s:.4f} s", ""),
        ("encode + write (GPU side)", f"{1 / r.encode_clips_s:.3f} s", f"{r.encode_clips_s:.2f}"),
        (f"end to end, {r.clips} clips, pool start-up included", "", f"{r.end_to_end_clips_s:.2f}"),
        ("end to end, steady state (first to last clip)", "", f"{r.steady_clips_s:.2f}"),
    ]
    bottleneck = "decode" if r.decode_pool_clips_s < r.encode_clips_s else "encode (GPU side)"
    lines = [f"precompute bench: {r.variant} on {r.device} ({r.dtype}), source {r.source}, bucket {r.bucket}, "
             f"peak {r.peak_gib:.1f} GiB", "", "| stage | time/clip | clips/s |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", f"bottleneck: {bottleneck}; end-to-end failures: {r.end_to_end_failed}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="720x720_5s")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--source-hw", type=int, nargs=2, metavar=("H", "W"), help="default: the variant's default size")
    p.add_argument("--clips", type=int, default=None, help="clips for the pool / write / end-to-end runs")
    p.add_argument("--decode-workers", type=int, default=None, help="default: min(8, cpu count)")
    p.add_argument("--text-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples-per-shard", type=int, default=8)
    p.add_argument("--workdir", default=None, help="where the clip and shards go while it runs (default: system temp)")
    p.add_argument("--out", type=Path, help="also write the result as JSON")
    args = p.parse_args()
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("fp32" if cpu else "bf16")
    args.clips = args.clips or (4 if cpu else 24)
    args.decode_workers = args.decode_workers or min(8, os.cpu_count() or 1)
    if cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    result = run(args)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(asdict(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
