"""Prompts in, mp4 files out: the 4-step student (or the 50-step teacher, for side-by-side).

    python distill/sample.py --student student.safetensors --variant 720x720_5s --prompts P.txt \\
        --out DIR --encoders ckpts/ [--image FIRST_FRAME] [--seed 100 --seeds 2]
    python distill/sample.py --student RUN_DIR [--step N] ...           (the run's EMA weights)
    python distill/sample.py --teacher ckpts/Ovi/model.safetensors ...  (Ovi's own sampler)
    python distill/sample.py --student S --variant tiny --prompts P.txt --out DIR   (tiny encoders)

Stages, each finished and freed before the next: validate every argument and file; umT5 encodes
every distinct prompt (and the teacher's negatives) in batches, then is deleted; the video VAE
encodes the first-frame images (i2v); the DiT samples batches of jobs of one size and mode; then
the video VAE, MMAudio VAE and BigVGAN decode each job to `DIR/{index:03d}_{seed}.mp4`
(H.264 24 fps + AAC 16 kHz mono), and `DIR/settings.json` records what made them.

Decisions:
  * One job = (prompt index, seed). Its initial noise comes from its own generator seeded from
    (seed, index), so it does not depend on the batch it runs in. The student's re-noising between
    steps draws from one generator per batch (sample_student takes one), seeded from the batch's
    jobs: with --batch-size 1 (the default) every file is reproducible on its own.
  * Prompts: one per line, blank lines skipped, converted to the variant's audio-caption style
    (precompute.prompts). `--image` once applies to every prompt; given once per prompt it pairs
    with them in order.
  * Size: the variant's default (or --height/--width) snapped to its area; with an image, the
    image's own aspect snapped to the area, the image cover-resized and centre-cropped into it
    (precompute's resize, so frame 0 looks like the training data's).
  * Encoder files are all or none: --encoders DIR (Ovi's ckpts/ layout) and/or the single-file
    flags; none only with --variant tiny, which rebuilds precompute's seeded tiny encoders.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av
import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from distill.export import ema_state, find_step
from distill.flow import RENOISE_MODES, STUDENT_SIGMAS
from distill.media_out import audio_to_float, video_to_uint8, write_mp4
from distill.models import OviFusion, load_ovi_checkpoint, variant_config
from distill.models.loading import check_header, expected_entries, read_header
from distill.sampling import TeacherSamplerConfig, sample_student, sample_teacher
from precompute.encoders.bigvgan import Vocoder
from precompute.encoders.bundle import TINY_SEED, EncoderBundle, EncoderFileError, EncoderPaths
from precompute.encoders.wan_vae import DecodeOptions
from precompute.media import cover_resize, pixels_for_vae
from precompute.prompts import DEFAULT_AUDIO_NEGATIVE, DEFAULT_VIDEO_NEGATIVE, prompt_for_variant
from precompute.variants import VARIANTS, Variant, get_variant, snap_to_area

EXIT_OK, EXIT_USAGE = 0, 2
VOCODER_IN_CKPTS = "MMAudio/ext_weights/best_netG.pt"  # beside the MMAudio VAE in Ovi's ckpts/
SETTINGS_FILE = "settings.json"
RENOISE_TAG = 0x5EED  # keeps the re-noising stream apart from the initial-noise one


class SampleError(ValueError):
    """Bad input (argument, file, prompt, image); the message names it."""


# Config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleConfig:
    model_path: Path                  # student: safetensors, run dir or step dir; teacher: safetensors
    teacher: bool
    variant: Variant
    prompts_file: Path
    out: Path
    seeds: tuple[int, ...] = (0,)
    images: tuple[Path, ...] = ()
    size: tuple[int, int] | None = None   # requested H, W before snapping (t2v only)
    step: int | None = None               # training step, when model_path is a run dir
    sigmas: tuple[float, ...] | None = None  # student; None: the run's, else STUDENT_SIGMAS
    renoise: str | None = None            # student; None: the run's, else "fresh"
    teacher_cfg: TeacherSamplerConfig = field(default_factory=TeacherSamplerConfig)
    batch_size: int = 1
    text_batch: int = 8
    encoders: EncoderPaths | None = None
    vocoder: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    video_negative: str = DEFAULT_VIDEO_NEGATIVE
    audio_negative: str = DEFAULT_AUDIO_NEGATIVE
    cache_dir: Path | None = None         # tiny tokenizer; default OUT/.cache
    progress: bool = True


def add_encoder_arguments(p: argparse.ArgumentParser) -> None:
    """The decoders' and umT5's files: one folder laid out as Ovi's ckpts/, or one flag per file."""
    p.add_argument("--encoders", type=Path, help="a folder laid out as Ovi's ckpts/")
    p.add_argument("--wan-vae", type=Path)
    p.add_argument("--mmaudio-vae", type=Path)
    p.add_argument("--vocoder", type=Path, help=f"BigVGAN best_netG.pt (in ckpts: {VOCODER_IN_CKPTS})")
    p.add_argument("--t5", type=Path)
    p.add_argument("--tokenizer", type=Path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill/sample.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--student", type=Path, help="exported safetensors, a training run dir or a step-N dir")
    which.add_argument("--teacher", type=Path, help="official Ovi safetensors: run the 50-step CFG+SLG teacher")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="first frame (i2v): once for every prompt, or once per prompt in order")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt: seed, seed+1, ...")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--step", type=int, help="with a run dir: this checkpoint step instead of the latest")
    p.add_argument("--sigmas", help="student sigmas, comma-separated (default: the run's, else the 4 warped steps)")
    p.add_argument("--renoise", choices=RENOISE_MODES,
                   help="student re-noising between steps (default: the run's dmd.renoise, else fresh)")
    p.add_argument("--steps", type=int, help="teacher solver steps (default 50)")
    p.add_argument("--cfg-video", type=float, default=TeacherSamplerConfig.cfg_video)
    p.add_argument("--cfg-audio", type=float, default=TeacherSamplerConfig.cfg_audio)
    p.add_argument("--slg-block", type=int, default=TeacherSamplerConfig.slg_block, help="<= 0: no SLG")
    p.add_argument("--batch-size", type=int, default=1, help="jobs per DiT batch")
    p.add_argument("--text-batch", type=int, default=8, help="prompts per umT5 batch")
    add_encoder_arguments(p)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="DiT, video VAE and umT5")
    p.add_argument("--video-negative", default=DEFAULT_VIDEO_NEGATIVE)
    p.add_argument("--audio-negative", default=DEFAULT_AUDIO_NEGATIVE)
    p.add_argument("--cache", type=Path, help="tiny tokenizer cache (default OUT/.cache)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _parse_sigmas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise SampleError(f"--sigmas {text!r}: expected comma-separated numbers") from None


def parse_args(argv: Sequence[str] | None = None) -> SampleConfig:
    """Command line -> SampleConfig; SampleError for anything that is wrong with it."""
    a = build_parser().parse_args(argv)
    teacher = a.teacher is not None
    for name, value in (("--seeds", a.seeds), ("--batch-size", a.batch_size), ("--text-batch", a.text_batch)):
        if value < 1:
            raise SampleError(f"{name} must be >= 1, got {value}")
    if a.seed < 0:
        raise SampleError(f"--seed must be >= 0, got {a.seed}")
    if (a.height is None) != (a.width is None):
        raise SampleError("--height and --width go together")
    if a.height is not None and (a.height <= 0 or a.width <= 0):
        raise SampleError(f"--height/--width must be > 0, got {a.height}x{a.width}")
    if a.height is not None and a.image:
        raise SampleError("--height/--width cannot be combined with --image: the image's aspect sets the size")
    if not teacher and a.steps is not None:
        raise SampleError("--steps is for --teacher; the student's steps are --sigmas")
    if teacher and (a.sigmas is not None or a.step is not None or a.renoise is not None):
        raise SampleError("--sigmas, --renoise and --step are for --student")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda: no CUDA device here")
    try:
        teacher_cfg = TeacherSamplerConfig(steps=a.steps or TeacherSamplerConfig.steps, cfg_video=a.cfg_video,
                                           cfg_audio=a.cfg_audio, slg_block=a.slg_block)
    except ValueError as err:
        raise SampleError(f"teacher settings: {err}") from None
    paths = EncoderPaths.from_ckpts_dir(a.encoders) if a.encoders else EncoderPaths()
    paths = paths.override(wan_vae=a.wan_vae, mmaudio_vae=a.mmaudio_vae, t5=a.t5, tokenizer=a.tokenizer)
    vocoder = a.vocoder or (a.encoders / VOCODER_IN_CKPTS if a.encoders else None)
    return SampleConfig(
        model_path=a.teacher if teacher else a.student, teacher=teacher, variant=get_variant(a.variant),
        prompts_file=a.prompts, out=a.out, seeds=tuple(range(a.seed, a.seed + a.seeds)), images=tuple(a.image),
        size=(a.height, a.width) if a.height is not None else None, step=a.step,
        sigmas=_parse_sigmas(a.sigmas) if a.sigmas else None, renoise=a.renoise, teacher_cfg=teacher_cfg,
        batch_size=a.batch_size, text_batch=a.text_batch, encoders=paths if paths.given else None, vocoder=vocoder, device=a.device,
        dtype=a.dtype, video_negative=a.video_negative, audio_negative=a.audio_negative, cache_dir=a.cache,
        progress=not a.no_progress,
    )


# Inputs: prompts, images, jobs -----------------------------------------------------------------

def read_prompt_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line. Errors name the file."""
    if not path.is_file():
        raise SampleError(f"--prompts {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise SampleError(f"--prompts {path}: not UTF-8 text ({err})") from None
    numbered = [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise SampleError(f"--prompts {path}: no prompts (the file is empty or blank)")
    return numbered


def caption_for_variant(text: str, variant: Variant, where: str) -> str:
    """A prompt in the variant's caption style; `where` (file:line) names it in the error."""
    try:
        return prompt_for_variant(text, variant)
    except ValueError as err:
        raise SampleError(f"{where}: {err}") from None


def read_prompts(path: Path, variant: Variant) -> list[str]:
    """Non-blank lines, each in the variant's caption style. Errors name the file and line."""
    return [caption_for_variant(text, variant, f"{path}:{number}") for number, text in read_prompt_lines(path)]


def load_image(path: Path) -> np.ndarray:
    """Any image ffmpeg reads (png, jpg, ppm, webp...) -> uint8 [H, W, 3]."""
    if not path.is_file():
        raise SampleError(f"--image {path}: no such file")
    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            return frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, StopIteration, ValueError) as err:
        raise SampleError(f"--image {path}: cannot decode as an image ({err})") from None


@dataclass(frozen=True)
class Job:
    index: int                     # the prompt's position among the file's non-blank lines
    seed: int
    prompt: str                    # as T5 sees it
    size: tuple[int, int]          # pixel H, W (multiples of 32)
    image: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.index:03d}_{self.seed}"


def plan_jobs(prompts: list[str], seeds: Sequence[int], variant: Variant, size: tuple[int, int] | None,
              images: Sequence[Path | None], image_sizes: dict[Path, tuple[int, int]]) -> list[Job]:
    """Every (prompt, seed) with its pixel size; `image_sizes` maps each image to its source H, W.
    `images`: none, one for every prompt, or one per prompt (None for a text-only prompt)."""
    if images and len(images) not in (1, len(prompts)):
        raise SampleError(f"--image given {len(images)} times for {len(prompts)} prompts: give it once or once per prompt")
    jobs = []
    for index, prompt in enumerate(prompts):
        image = (images[0] if len(images) == 1 else images[index]) if images else None
        source = image_sizes[image] if image is not None else (size or variant.default_hw)
        hw = snap_to_area(*source, variant.area)
        jobs.extend(Job(index, seed, prompt, hw, image) for seed in seeds)
    return jobs


def job_seed(index: int, seed: int) -> int:
    """A 63-bit torch seed from (seed, prompt index): distinct pairs give unrelated streams."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def renoise_seed(batch: Sequence[Job]) -> int:
    """The student's re-noising seed for a batch: from every job in it, tagged apart from job_seed."""
    entropy = [x for job in batch for x in (job.seed, job.index)] + [RENOISE_TAG]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


def job_noise(job: Job, variant: Variant, latent_channels: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 video [C_v, F_lat, H/16, W/16] and audio [L, C_a] noise, from the job's own generator."""
    gen = torch.Generator().manual_seed(job_seed(job.index, job.seed))
    h, w = job.size
    video = torch.randn((latent_channels[0], variant.latent_frames, h // 16, w // 16), generator=gen)
    audio = torch.randn((variant.audio_latents, latent_channels[1]), generator=gen)
    return video, audio


def batches_of(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs grouped by (pixel size, i2v or not), in prompt order, cut into batches."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.size, job.image is not None), []).append(job)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


# Models -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    kind: str                      # "student" | "teacher"
    weights: str                   # "safetensors" | "ema"
    path: Path                     # the file, or the step dir for "ema"
    sigmas: tuple[float, ...] | None = None  # the run's student sigmas, when known
    num_layers: int | None = None            # the run's depth override, when it had one
    renoise: str | None = None               # the run's dmd.renoise, when known


def _check_safetensors(path: Path, variant: Variant, what: str) -> dict[str, str]:
    """The file's metadata, once its keys, shapes and variant are known to fit."""
    if not path.is_file():
        raise SampleError(f"{what} {path}: no such file")
    with torch.device("meta"):
        model = OviFusion(variant_config(variant.name))
    check_header(path, read_header(path), expected_entries(model))  # CheckpointError names file and key
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    saved_variant = metadata.get("variant")
    if saved_variant and saved_variant != variant.name:
        raise SampleError(f"{what} {path}: exported for variant {saved_variant}, not --variant {variant.name}")
    return metadata


def resolve_model(cfg: SampleConfig) -> ModelSource:
    """Check the DiT weights exist and fit the variant (headers and configs only, no tensor data)."""
    if cfg.teacher:
        _check_safetensors(cfg.model_path, cfg.variant, "--teacher")
        return ModelSource("teacher", "safetensors", cfg.model_path)
    path = cfg.model_path
    if path.is_file():  # distill/export.py writes the run's sampler settings into the metadata
        meta = _check_safetensors(path, cfg.variant, "--student")
        try:
            sigmas = json.loads(meta["student_sigmas"]) if "student_sigmas" in meta else None
        except json.JSONDecodeError:
            raise SampleError(f"--student {path}: metadata student_sigmas {meta['student_sigmas']!r} is not a JSON list") from None
        return ModelSource("student", "safetensors", path, tuple(sigmas) if sigmas else None,
                           renoise=meta.get("renoise"))
    if not path.is_dir():
        raise SampleError(f"--student {path}: no such file or directory")
    step_path = find_step(path, cfg.step)
    try:
        config = json.loads((step_path / "trainer.json").read_text())["config"]
        model = config["model"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SampleError(f"--student {step_path / 'trainer.json'}: no training config ({type(err).__name__}: {err})") from None
    if model.get("variant") != cfg.variant.name:
        raise SampleError(f"--student {step_path}: trained as variant {model.get('variant')}, not --variant {cfg.variant.name}")
    if not any((step_path / "ema").glob("rank-*.pt")):
        raise SampleError(f"--student {step_path}: no EMA shards in {step_path / 'ema'} (export with --raw instead)")
    sigmas = config.get("dmd", {}).get("student_sigmas")
    return ModelSource("student", "ema", step_path, tuple(sigmas) if sigmas else None, model.get("num_layers"),
                       config.get("dmd", {}).get("renoise"))


def load_model(source: ModelSource, variant: Variant, device: torch.device, dtype: torch.dtype) -> OviFusion:
    with torch.device("meta"):
        model = OviFusion(variant_config(variant.name, source.num_layers))
    if source.weights == "safetensors":
        load_ovi_checkpoint(model, source.path, dtype=dtype, device=str(device))
    else:
        state = {k: v.to(device=device, dtype=dtype) for k, v in ema_state(source.path).items()}
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def check_encoder_files(cfg: SampleConfig) -> None:
    if cfg.encoders is None:
        if cfg.variant.name != "tiny":
            raise SampleError(f"variant {cfg.variant.name} needs the real encoder files: --encoders DIR (Ovi's "
                              f"ckpts/) or --wan-vae/--mmaudio-vae/--vocoder/--t5/--tokenizer")
        if cfg.vocoder is not None:
            raise SampleError("--vocoder without the other encoder files: give all five, or none for tiny")
        return
    vocoder_problem = ("vocoder: not given (--vocoder PATH, or --encoders DIR)" if cfg.vocoder is None
                       else f"vocoder: {cfg.vocoder} does not exist" if not cfg.vocoder.is_file() else None)
    try:
        cfg.encoders.check()
    except EncoderFileError as err:  # one message naming every missing file, the vocoder too
        raise SampleError(str(err) + (f"\n  {vocoder_problem}" if vocoder_problem else "")) from None
    if vocoder_problem:
        raise SampleError(f"encoder files:\n  {vocoder_problem}")


def resolve_device(cfg: SampleConfig) -> tuple[torch.device, torch.dtype]:
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.dtype, torch.bfloat16 if cuda else torch.float32)
    return device, dtype


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# Stages -------------------------------------------------------------------------------------------

def encode_texts(text_encoder, prompts: Sequence[str], batch: int, text_len: int) -> dict[str, torch.Tensor]:
    """Each distinct prompt -> [text_len, D] float32 on the CPU, zero-padded as the DiT sees it."""
    distinct = list(dict.fromkeys(prompts))
    out = {}
    for i in range(0, len(distinct), batch):
        chunk = distinct[i:i + batch]
        for prompt, emb in zip(chunk, text_encoder.encode(chunk)):
            emb = emb.float().cpu()
            out[prompt] = torch.cat([emb, emb.new_zeros(text_len - emb.shape[0], emb.shape[1])])
    return out


def encode_images(vae, images: dict[Path, np.ndarray], sizes: dict[Path, tuple[int, int]]) -> dict[Path, torch.Tensor]:
    """Each image, cover-resized to its job size -> normalised latent [1, 48, 1, H/16, W/16] on the CPU."""
    out = {}
    for path, pixels in images.items():
        frame = cover_resize(pixels[None], sizes[path])                    # uint8 [1, 3, H, W]
        video = pixels_for_vae(frame).unsqueeze(0)                          # [1, 3, 1, H, W] in [-1, 1]
        out[path] = vae.encode_image(video).float().cpu()
    return out


def sample_latents(model, jobs: list[Job], cfg: SampleConfig, variant: Variant, texts: dict[str, torch.Tensor],
                   negatives: tuple[torch.Tensor, torch.Tensor] | None, image_latents: dict[Path, torch.Tensor],
                   sigmas: tuple[float, ...], device: torch.device, dtype: torch.dtype,
                   renoise: str = "fresh") -> dict[str, tuple]:
    """job name -> (video latent [48, F, h, w], audio latent [L, 20]), float32 on the CPU."""
    channels = (model.cfg.video.in_dim, model.cfg.audio.in_dim)
    results = {}
    batches = batches_of(jobs, cfg.batch_size)
    for batch in tqdm(batches, desc="teacher" if cfg.teacher else "student", disable=not cfg.progress):
        noise = [job_noise(job, variant, channels) for job in batch]
        noise_video = torch.stack([v for v, _ in noise]).to(device)
        noise_audio = torch.stack([a for _, a in noise]).to(device)
        text = torch.stack([texts[job.prompt] for job in batch]).to(device, dtype)
        image = torch.cat([image_latents[job.image] for job in batch]).to(device) if batch[0].image else None
        if cfg.teacher:
            n = len(batch)
            neg_video, neg_audio = (x.to(device, dtype).expand(n, -1, -1) for x in negatives)
            video, audio = sample_teacher(model, noise_video, noise_audio, text, neg_video, neg_audio,
                                          cfg=cfg.teacher_cfg, image_latent=image)
        else:
            generator = torch.Generator(device).manual_seed(renoise_seed(batch))
            video, audio = sample_student(model, noise_video, noise_audio, text, sigmas=sigmas,
                                          image_latent=image, generator=generator, renoise=renoise)
        for job, v, a in zip(batch, video.float().cpu(), audio.float().cpu()):
            results[job.name] = (v, a)
    return results


def decode_options(device: torch.device) -> DecodeOptions:
    """The fastest decode measured on an H200 at 704x704x121 (bench/inference.py: 6 latent frames
    per call with cuDNN autotune, 2.53 s vs 2.73 s frame by frame); frame by frame elsewhere."""
    if device.type != "cuda":
        return DecodeOptions()
    torch.backends.cudnn.benchmark = True
    return DecodeOptions(chunk=6)


@torch.inference_mode()
def decode_clips(jobs: list[Job], latents: dict[str, tuple], bundle: EncoderBundle, vocoder: Vocoder,
                 device: torch.device, progress: bool) -> Iterator[tuple[Job, np.ndarray, np.ndarray]]:
    """(job, frames uint8 [F, H, W, 3], audio float32 [N]) per job, one at a time (a 720p clip is ~180 MB)."""
    options = decode_options(device)
    for job in tqdm(jobs, desc="decode", disable=not progress):
        video_latent, audio_latent = latents[job.name]
        video = bundle.video_vae.decode(video_latent[None].to(device), options=options)[0]  # [3, F, H, W] in [-1, 1]
        mel = bundle.audio_vae.decode(audio_latent[None].to(device))
        waveform = vocoder(mel.to(next(vocoder.parameters()).dtype))[0]        # [1, N]
        yield job, video_to_uint8(video), audio_to_float(waveform)


def write_clip(out: Path, job: Job, frames: np.ndarray, audio: np.ndarray) -> dict:
    """`out/{job.name}.mp4`, and the record settings.json keeps of it."""
    path = write_mp4(out / f"{job.name}.mp4", frames, audio)
    return dict(file=path.name, index=job.index, seed=job.seed, prompt=job.prompt,
                image=str(job.image) if job.image else None, height=frames.shape[1],
                width=frames.shape[2], frames=frames.shape[0], audio_samples=int(audio.size))


def decode_and_write(jobs: list[Job], latents: dict[str, tuple], bundle: EncoderBundle, vocoder: Vocoder,
                     out: Path, device: torch.device, progress: bool) -> list[dict]:
    return [write_clip(out, job, frames, audio)
            for job, frames, audio in decode_clips(jobs, latents, bundle, vocoder, device, progress)]


def load_vocoder(cfg: SampleConfig, device: torch.device) -> Vocoder:
    # float32 always: a few ms per clip, and Ovi runs it under autocast from fp32 mels anyway
    if cfg.vocoder is None:
        return Vocoder.tiny(seed=TINY_SEED).to(device)
    return Vocoder.from_file(cfg.vocoder, device=device)


def load_images(images: Sequence[Path | None]) -> dict[Path, np.ndarray]:
    return {path: load_image(path) for path in dict.fromkeys(images) if path is not None}


def job_image_sizes(jobs: Sequence[Job]) -> dict[Path, tuple[int, int]]:
    """The pixel size each first-frame image is resized into (its jobs' size)."""
    return {job.image: job.size for job in jobs if job.image is not None}


def student_sampler(cfg: SampleConfig, source: ModelSource) -> tuple[tuple[float, ...], str]:
    """The student's σ list and re-noising: the command line's, else the run's, else the defaults."""
    sigmas = tuple(cfg.sigmas or source.sigmas or STUDENT_SIGMAS)
    if not cfg.teacher and (not all(0 < s <= 1 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:]))):
        raise SampleError(f"--sigmas {sigmas}: must be strictly decreasing values in (0, 1]")
    renoise = cfg.renoise or source.renoise or "fresh"
    if renoise not in RENOISE_MODES:
        raise SampleError(f"{source.path}: unknown re-noising {renoise!r} (expected one of {RENOISE_MODES})")
    return sigmas, renoise


def encode_prompts(bundle: EncoderBundle, jobs: Sequence[Job], cfg: SampleConfig, device: torch.device,
                   with_negatives: bool) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """Every job's prompt (and the teacher's two negatives) through umT5, which is then deleted
    from the bundle: umT5-XXL is 11 GB in bf16, gone before the DiT loads."""
    text_encoder, bundle.text = bundle.text, None
    texts = encode_texts(text_encoder, [job.prompt for job in jobs], cfg.text_batch, cfg.variant.text_len)
    negatives = None
    if with_negatives:
        neg = encode_texts(text_encoder, [cfg.video_negative, cfg.audio_negative], 2, cfg.variant.text_len)
        negatives = (neg[cfg.video_negative], neg[cfg.audio_negative])
    del text_encoder
    release(device)
    return texts, negatives


def run(cfg: SampleConfig) -> dict:
    """The whole pipeline; returns the settings it wrote. Every input check runs before any weights load."""
    timings, clock = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    variant = cfg.variant
    prompts = read_prompts(cfg.prompts_file, variant)
    pixels = load_images(cfg.images)
    jobs = plan_jobs(prompts, cfg.seeds, variant, cfg.size, cfg.images, {p: img.shape[:2] for p, img in pixels.items()})
    check_encoder_files(cfg)
    source = resolve_model(cfg)
    sigmas, renoise = student_sampler(cfg, source)
    device, dtype = resolve_device(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    lap("validate")

    bundle = EncoderBundle.load(variant, cfg.encoders, device, dtype, cache_dir=cfg.cache_dir or cfg.out / ".cache",
                                hash_files=False)
    texts, negatives = encode_prompts(bundle, jobs, cfg, device, with_negatives=cfg.teacher)
    lap("text")

    image_latents = encode_images(bundle.video_vae, pixels, job_image_sizes(jobs))
    lap("images")

    model = load_model(source, variant, device, dtype)
    lap("load_dit")
    latents = sample_latents(model, jobs, cfg, variant, texts, negatives, image_latents, sigmas, device, dtype, renoise)
    del model
    release(device)
    lap("dit")

    vocoder = load_vocoder(cfg, device)
    written = decode_and_write(jobs, latents, bundle, vocoder, cfg.out, device, cfg.progress)
    lap("decode")

    student = {"steps": len(sigmas), "sigmas": list(sigmas), "renoise": renoise}
    sampler = asdict(cfg.teacher_cfg) if cfg.teacher else student
    settings = dict(
        model=dict(kind=source.kind, weights=source.weights, path=str(source.path)),
        variant=variant.name, sampler=sampler, seeds=list(cfg.seeds), prompts_file=str(cfg.prompts_file),
        prompts=prompts, negatives=dict(video=cfg.video_negative, audio=cfg.audio_negative) if cfg.teacher else None,
        batch_size=cfg.batch_size, device=str(device), dtype=str(dtype).removeprefix("torch."),
        encoders={**bundle.ids, "vocoder": str(cfg.vocoder) if cfg.vocoder else f"tiny-seed{TINY_SEED}"},
        outputs=written, timings_s=timings,
    )
    (cfg.out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, ensure_ascii=False))
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        settings = run(cfg)
    except (ValueError, FileNotFoundError) as err:  # SampleError, CheckpointError, EncoderFileError
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {len(settings['outputs'])} clip(s) and {SETTINGS_FILE} to {cfg.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
