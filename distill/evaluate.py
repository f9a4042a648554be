"""Evaluate every complete checkpoint of a DMD run once, beside training (its own process and GPU):

    python distill/evaluate.py --run runs/ovi720 --prompts eval_prompts.txt --encoders ckpts \\
        [--seeds 2] [--watch | --once] [--reference-steps 50] [--make-reference] [--teacher FILE]

For each checkpoint with COMPLETE (one still being written is left for the next pass; a rerun
skips every step already done), in step order:
  * the EMA student, stitched in memory from the per-rank shards as distill/export.py does;
  * 4-step samples of every prompt x seed (distill/sample.py's stages: the same noise per clip
    as `sample.py --seed S`, the run's σ list and re-noising), decoded to RUN/eval/step-N/NNN_S.mp4,
    plus RUN/eval/step-N/contact_sheet.png (a few frames and the spectrogram per clip);
  * latent metrics against the teacher reference (distill/eval_metrics.py; with --seeds >= 2 taken
    prompt by prompt, so a student that drops modes within a prompt shows) in
    RUN/eval/step-N/metrics.json, RUN/eval/metrics.jsonl and wandb (with the contact sheet and
    the clips; x-axis `train_step`);
  * RUN/eval/best.json (eval_store.BEST_RULE); `python distill/export.py --checkpoint RUN
    --step best` exports that checkpoint.

The teacher reference: the run's teacher (model.checkpoint; the seeded init for `tiny`; --teacher
overrides) sampled with Ovi's CFG + SLG at the run's DMD guidance (dmd.cfg_video, cfg_audio,
slg_block) for --reference-steps UniPC steps from the same noise as the student (a run with
dmd.guidance=samples: its fine-tuned model.checkpoint without guidance, or --teacher ORIGINAL with
it), made on the first
pass and cached in RUN/eval/reference/ (latents, mp4s, contact sheet). It is reused while the
clips and teacher settings are the same; otherwise the evaluator stops, asking for
--make-reference (which remakes it, and every checkpoint still on disk is evaluated again).

A guided fine-tune's run (stage 2, objective flow on teacher pairs) is evaluated the same way
with its checkpoints sampled as teachers: --reference-steps UniPC steps without CFG or SLG (how DMD
with dmd.guidance=samples will query it), against the original teacher's CFG + SLG reference. Its
start, the original teacher sampled the same way, is made once with the reference; every step then
reports gap_closed, the part of the start's score it has closed (1: at the reference). DMD aims at
this model's samples: a fine-tune that stops short of the guided reference makes a student that
does too (bench/RESULTS.md, "Guided DMD", session 17). best.json names its lowest-score step; in the
toy world the score once ranked a longer fine-tune below a shorter one that its judge put farther
(session 18): read it with the contact sheets.

--once (the default) evaluates what is complete now and exits. --watch polls every --poll-s
seconds until the checkpoint of the run's last step (trainer.json max_steps) is evaluated, or
nothing new came for --max-idle-s. Prompts: a text file (one per line, text-to-video) or JSON
lines {"prompt": ..., "image": ...} (image-to-video rows beside text ones); every clip is the
variant's default size (a first frame is cover-resized and centre-cropped into it), so the
metrics compare like with like. Bad input (no run, no checkpoint, bad prompts, missing encoder
or teacher files, a reference made for other clips) exits 2 naming it, before any model loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from distill import checkpoint
from distill import eval_store as store
from distill.contact_sheet import SheetRow, contact_sheet, pick_frames, save_png
from distill.eval_metrics import checkpoint_metrics
from distill.eval_prompts import EvalPrompt, captions, read_eval_prompts
from distill.metrics import MetricsLog
from distill.models import OviFusion, init_weights, variant_config
from distill.models.loading import check_header, expected_entries, read_header
from distill.sample import (
    VOCODER_IN_CKPTS, Job, ModelSource, SampleConfig, SampleError, add_encoder_arguments, check_encoder_files,
    decode_clips, encode_images, encode_prompts, job_image_sizes, load_images, load_model, load_vocoder, plan_jobs, release,
    resolve_device, resolve_model, sample_latents, student_sampler, write_clip,
)
from distill.sampling import TeacherSamplerConfig
from precompute.encoders.bundle import EncoderBundle, EncoderPaths
from precompute.variants import Variant, get_variant

EXIT_OK, EXIT_USAGE = 0, 2
MAX_LABEL_CHARS = 90


class EvalError(ValueError):
    """Bad input; the message names it."""


# Config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalConfig:
    run: Path
    prompts_file: Path
    seeds: tuple[int, ...] = (0,)
    encoders: EncoderPaths | None = None
    vocoder: Path | None = None
    teacher: Path | None = None           # default: the run's model.checkpoint (tiny: the seeded init)
    reference_steps: int = 50
    make_reference: bool = False
    watch: bool = False
    poll_s: float = 60.0
    max_idle_s: float = 6 * 3600.0
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    wandb_mode: str = "offline"
    progress: bool = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill/evaluate.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="the training run directory (distill/train.py --out)")
    p.add_argument("--prompts", required=True, type=Path, help="text file (one prompt per line) or .jsonl with images")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt: seed, seed+1, ...")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--watch", action="store_true", help="poll until the run's final checkpoint is evaluated")
    mode.add_argument("--once", action="store_true", help="evaluate what is complete now, then exit (the default)")
    p.add_argument("--reference-steps", type=int, default=50, help="teacher UniPC steps of the reference")
    p.add_argument("--make-reference", action="store_true", help="(re)make the teacher reference now")
    p.add_argument("--teacher", type=Path, help="teacher safetensors (default: the run's model.checkpoint)")
    add_encoder_arguments(p)  # none given: tiny runs only
    p.add_argument("--poll-s", type=float, default=60.0, help="--watch: seconds between looks at checkpoints/")
    p.add_argument("--max-idle-s", type=float, default=6 * 3600.0,
                   help="--watch: stop after this long without a new checkpoint (a run that died)")
    p.add_argument("--batch-size", type=int, default=1, help="clips per DiT batch")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--wandb-mode", choices=("offline", "online", "disabled"), default="offline")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    a = build_parser().parse_args(argv)
    for name, value in (("--seeds", a.seeds), ("--batch-size", a.batch_size), ("--reference-steps", a.reference_steps)):
        if value < 1:
            raise EvalError(f"{name} must be >= 1, got {value}")
    if a.seed < 0:
        raise EvalError(f"--seed must be >= 0, got {a.seed}")
    if a.poll_s <= 0 or a.max_idle_s <= 0:
        raise EvalError("--poll-s and --max-idle-s must be > 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device here")
    paths = EncoderPaths.from_ckpts_dir(a.encoders) if a.encoders else EncoderPaths()
    paths = paths.override(wan_vae=a.wan_vae, mmaudio_vae=a.mmaudio_vae, t5=a.t5, tokenizer=a.tokenizer)
    return EvalConfig(run=a.run, prompts_file=a.prompts, seeds=tuple(range(a.seed, a.seed + a.seeds)),
                      encoders=paths if paths.given else None,
                      vocoder=a.vocoder or (a.encoders / VOCODER_IN_CKPTS if a.encoders else None),
                      teacher=a.teacher, reference_steps=a.reference_steps, make_reference=a.make_reference,
                      watch=a.watch, poll_s=a.poll_s, max_idle_s=a.max_idle_s, batch_size=a.batch_size,
                      device=a.device, dtype=a.dtype, wandb_mode=a.wandb_mode, progress=not a.no_progress)


# The run --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunInfo:
    """What the evaluator needs of the training run, from a checkpoint's trainer.json."""
    variant: Variant
    num_layers: int | None
    teacher_file: Path | None      # model.checkpoint; None: the seeded init (tiny)
    init_seed: int
    random_init: bool
    teacher_cfg: TeacherSamplerConfig
    wandb_project: str
    run_name: str | None
    objective: str = "dmd"         # flow: a guided fine-tune (stage 2), its checkpoints sampled as teachers

    @property
    def fine_tune(self) -> bool:
        return self.objective == "flow"

    @property
    def unguided(self) -> TeacherSamplerConfig:
        """How a guided fine-tune (and the original teacher, its start) is sampled: the reference's
        steps without CFG or SLG. Its samples are what DMD with dmd.guidance=samples aims at."""
        return dataclasses.replace(self.teacher_cfg, cfg_video=1.0, cfg_audio=1.0, slg_block=None)

    @property
    def guided_reference(self) -> bool:
        cfg = self.teacher_cfg
        return cfg.cfg_video != 1.0 or cfg.cfg_audio != 1.0 or cfg.skip_block is not None

    @staticmethod
    def from_checkpoint(step_dir: Path, reference_steps: int, teacher_given: bool = False) -> RunInfo:
        """With dmd.guidance=samples the run's model.checkpoint is the teacher fine-tuned on its guided
        samples: it is sampled without CFG and SLG (its samples are what DMD aims at), unless
        --teacher names the original, which is sampled with the run's CFG + SLG. A flow run (the
        guided fine-tune itself) keeps the CFG + SLG reference: the original teacher as its pairs
        were made."""
        try:
            config = json.loads((step_dir / "trainer.json").read_text())["config"]
            model, dmd, log = config["model"], config.get("dmd", {}), config.get("log", {})
            variant = get_variant(model["variant"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise EvalError(f"{step_dir / 'trainer.json'}: no usable training config ({type(err).__name__}: {err})") from None
        defaults = TeacherSamplerConfig()
        teacher_cfg = TeacherSamplerConfig(steps=reference_steps, cfg_video=dmd.get("cfg_video", defaults.cfg_video),
                                           cfg_audio=dmd.get("cfg_audio", defaults.cfg_audio),
                                           slg_block=dmd.get("slg_block", defaults.slg_block))
        if dmd.get("guidance") == "samples" and not teacher_given:
            teacher_cfg = TeacherSamplerConfig(steps=reference_steps, cfg_video=1.0, cfg_audio=1.0, slg_block=None)
        return RunInfo(variant=variant, num_layers=model.get("num_layers"),
                       teacher_file=Path(model["checkpoint"]) if model.get("checkpoint") else None,
                       init_seed=model.get("init_seed", 0), random_init=bool(model.get("random_init")),
                       teacher_cfg=teacher_cfg, wandb_project=log.get("wandb_project", "ovi-dmd"),
                       run_name=log.get("run_name"), objective=config.get("objective", "dmd"))


def final_step(run: Path) -> int | None:
    """The run's last step (max_steps of its newest complete checkpoint: a resume may raise it)."""
    newest = checkpoint.latest(run)
    if newest is None:
        return None
    return int(json.loads((newest / "trainer.json").read_text())["config"]["max_steps"])


def wandb_group(run: Path) -> str:
    """The training run's wandb id (its group, distill/metrics.py), else the run folder's name."""
    id_file = run / "wandb_run_id"
    return id_file.read_text().strip() if id_file.is_file() else run.resolve().name


# Plan: every check before any model -----------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    cfg: EvalConfig
    info: RunInfo
    sample_cfg: SampleConfig       # the student side of sample.py's stages (model_path: per checkpoint)
    jobs: list[Job]
    pixels: dict[Path, np.ndarray]
    teacher: ModelSource | None    # None: the seeded tiny init
    reference_spec: dict
    reference_id: str
    make_reference: bool           # asked for, or no usable cached reference

    @property
    def names(self) -> list[str]:
        return [job.name for job in self.jobs]

    @property
    def groups(self) -> list[int] | None:
        """With several seeds per prompt the metrics compare prompt by prompt (eval_metrics' groups)."""
        return [job.index for job in self.jobs] if len(self.cfg.seeds) > 1 else None


def wait_for_first_checkpoint(cfg: EvalConfig) -> Path:
    ckpts = cfg.run / "checkpoints"
    waited_since = time.monotonic()
    announced = False
    while True:
        complete = checkpoint.complete_steps(cfg.run)
        if complete:
            return complete[0]
        if not cfg.watch:
            partial = sorted(p.name for p in ckpts.glob("step-*")) if ckpts.is_dir() else []
            extra = f" ({len(partial)} without COMPLETE: {', '.join(partial)})" if partial else ""
            raise EvalError(f"--run {cfg.run}: no complete checkpoint in {ckpts}{extra}")
        if time.monotonic() - waited_since > cfg.max_idle_s:
            raise EvalError(f"--run {cfg.run}: no complete checkpoint after {cfg.max_idle_s:.0f} s of watching")
        if not announced:
            print(f"waiting for the first complete checkpoint in {ckpts}", flush=True)
            announced = True
        time.sleep(cfg.poll_s)


def teacher_source(cfg: EvalConfig, info: RunInfo) -> ModelSource | None:
    path = cfg.teacher or info.teacher_file
    if path is None:
        if info.variant.name != "tiny" or info.random_init:
            raise EvalError("the run has no teacher file (model.checkpoint): pass --teacher FILE")
        return None
    if not path.is_file():
        raise EvalError(f"teacher {path}: no such file" + ("" if cfg.teacher else " (the run's model.checkpoint; --teacher overrides)"))
    with torch.device("meta"):
        model = OviFusion(variant_config(info.variant.name, info.num_layers))
    check_header(path, read_header(path), expected_entries(model))  # CheckpointError names file and key
    return ModelSource("teacher", "safetensors", path, num_layers=info.num_layers)


def prepare(cfg: EvalConfig) -> Plan:
    """Everything that can be wrong with the inputs, found before any model loads (in --watch,
    after waiting for the first complete checkpoint: it says what the run is)."""
    if not cfg.run.is_dir():
        raise EvalError(f"--run {cfg.run}: no such directory")
    prompts = read_eval_prompts(cfg.prompts_file)
    if cfg.encoders is not None:
        check_encoder_files(SampleConfig(model_path=cfg.run, teacher=False, variant=get_variant("tiny"),
                                         prompts_file=cfg.prompts_file, out=cfg.run, encoders=cfg.encoders,
                                         vocoder=cfg.vocoder))
    if cfg.teacher is not None and not cfg.teacher.is_file():
        raise EvalError(f"--teacher {cfg.teacher}: no such file")
    first = wait_for_first_checkpoint(cfg)
    info = RunInfo.from_checkpoint(first, cfg.reference_steps, teacher_given=cfg.teacher is not None)
    variant = info.variant
    sample_cfg = SampleConfig(model_path=first, teacher=False, variant=variant, prompts_file=cfg.prompts_file,
                              out=store.eval_root(cfg.run), seeds=cfg.seeds, batch_size=cfg.batch_size,
                              encoders=cfg.encoders, vocoder=cfg.vocoder, device=cfg.device, dtype=cfg.dtype,
                              cache_dir=store.eval_root(cfg.run) / ".cache", progress=cfg.progress)
    check_encoder_files(sample_cfg)
    student_sampler(sample_cfg, resolve_model(sample_cfg))   # the run's variant, EMA shards, σ list
    jobs, pixels = plan_eval_jobs(prompts, cfg.seeds, variant)
    teacher = teacher_source(cfg, info)
    spec = {"variant": variant.name, "clips": [dict(name=j.name, prompt=j.prompt, image=str(j.image) if j.image else None,
                                                     size=list(j.size)) for j in jobs],
            "teacher": str(teacher.path) if teacher else f"tiny init seed {info.init_seed}",
            "num_layers": info.num_layers, "sampler": dataclasses.asdict(info.teacher_cfg)}
    if info.fine_tune and info.guided_reference:   # where the fine-tune started: the same teacher, unguided
        spec["start_sampler"] = dataclasses.asdict(info.unguided)
    cached = store.read_reference_spec(cfg.run)
    if cached is not None and cached["spec"] != spec and not cfg.make_reference:
        changed = sorted(k for k in spec if cached["spec"].get(k) != spec[k])
        raise EvalError(f"{store.reference_dir(cfg.run)} was made for other {', '.join(changed)}: pass "
                        f"--make-reference to remake it (every checkpoint on disk is then evaluated again), "
                        f"or evaluate with the same prompts, seeds and teacher")
    return Plan(cfg=cfg, info=info, sample_cfg=sample_cfg, jobs=jobs, pixels=pixels, teacher=teacher,
                reference_spec=spec, reference_id=store.spec_id(spec),
                make_reference=cfg.make_reference or cached is None)


def plan_eval_jobs(prompts: list[EvalPrompt], seeds: Sequence[int], variant: Variant) -> tuple[list[Job], dict]:
    """Every (prompt, seed) at the variant's default size, first frames loaded."""
    images = [p.image for p in prompts]
    pixels = load_images(images)
    jobs = plan_jobs(captions(prompts, variant), seeds, variant, None, images if any(images) else [],
                     {path: variant.default_hw for path in pixels})
    return jobs, pixels


# The evaluator: models loaded once, one checkpoint at a time ------------------------------------

class Evaluator:
    def __init__(self, plan: Plan):
        self.plan, self.cfg, self.run = plan, plan.cfg, plan.cfg.run
        self.device, self.dtype = resolve_device(plan.sample_cfg)
        self.log: MetricsLog | None = None
        sc = plan.sample_cfg
        self.bundle = EncoderBundle.load(sc.variant, sc.encoders, self.device, self.dtype, cache_dir=sc.cache_dir,
                                         hash_files=False)
        self.texts, self.negatives = encode_prompts(self.bundle, plan.jobs, sc, self.device, with_negatives=True)
        self.image_latents = encode_images(self.bundle.video_vae, plan.pixels, job_image_sizes(plan.jobs))
        self.vocoder = load_vocoder(sc, self.device)
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self.start_metrics: dict[str, float] | None = None   # a guided fine-tune's start, against the reference

    # -- reference
    def ensure_reference(self) -> None:
        folder = store.reference_dir(self.run)
        with_start = "start_sampler" in self.plan.reference_spec
        if self.plan.make_reference:
            print(f"making the teacher reference ({self.plan.info.teacher_cfg.steps} steps) in {folder}", flush=True)
            start = time.perf_counter()
            teacher = self._load_teacher()
            latents = self._sample_as_teacher(teacher, self.plan.info.teacher_cfg)
            unguided = self._sample_as_teacher(teacher, self.plan.info.unguided) if with_start else None
            del teacher
            release(self.device)
            seconds = time.perf_counter() - start
            folder.mkdir(parents=True, exist_ok=True)
            self._write_clips(latents, folder, "teacher reference")
            if unguided is not None:
                store.save_latents(folder / store.START_LATENTS_FILE, self.plan.names, unguided)
            store.write_reference(self.run, self.plan.reference_spec, self.plan.names, latents,
                                  {"seconds": round(seconds, 3)})
        self.reference = store.load_latents(folder / store.LATENTS_FILE)
        if with_start:
            start_latents = store.load_latents(folder / store.START_LATENTS_FILE)
            self.start_metrics = checkpoint_metrics(*start_latents, *self.reference, groups=self.plan.groups)
            print(f"the fine-tune's start (the teacher without guidance): score {self.start_metrics['score']:.4f}",
                  flush=True)

    def _sample_as_teacher(self, model: OviFusion, sampler: TeacherSamplerConfig) -> dict:
        cfg = dataclasses.replace(self.plan.sample_cfg, teacher=True, teacher_cfg=sampler)
        return sample_latents(model, self.plan.jobs, cfg, cfg.variant, self.texts, self.negatives,
                              self.image_latents, (), self.device, self.dtype)

    def _load_teacher(self) -> OviFusion:
        if self.plan.teacher is not None:
            return load_model(self.plan.teacher, self.plan.sample_cfg.variant, self.device, self.dtype)
        info = self.plan.info
        model = init_weights(OviFusion(variant_config(info.variant.name, info.num_layers)), seed=info.init_seed)
        return model.to(self.device, self.dtype).eval().requires_grad_(False)

    # -- checkpoints
    def pending(self) -> list[Path]:
        done = store.done_steps(self.run, self.plan.reference_id)
        return [p for p in checkpoint.complete_steps(self.run) if store.step_number(p) not in done]

    def evaluate(self, step_dir: Path) -> dict | None:
        """One checkpoint, start to finish; None when the trainer pruned it before it was read."""
        step = store.step_number(step_dir)
        out = store.step_eval_dir(self.run, step)
        start = time.perf_counter()
        sc = dataclasses.replace(self.plan.sample_cfg, model_path=step_dir)
        try:
            source = resolve_model(sc)
            model = load_model(source, sc.variant, self.device, self.dtype)
        except (FileNotFoundError, SampleError, RuntimeError, OSError) as err:
            if not (step_dir / "COMPLETE").exists():
                print(f"step {step}: pruned by the trainer before it was evaluated; skipped", flush=True)
                return None
            raise
        timings = {"load_s": time.perf_counter() - start}
        if self.plan.info.fine_tune:
            latents = self._sample_as_teacher(model, self.plan.info.unguided)
            sampler = {"model": "guided fine-tune", **dataclasses.asdict(self.plan.info.unguided)}
        else:
            sigmas, renoise = student_sampler(sc, source)
            latents = sample_latents(model, self.plan.jobs, sc, sc.variant, self.texts, None, self.image_latents,
                                     sigmas, self.device, self.dtype, renoise)
            sampler = {"sigmas": list(sigmas), "renoise": renoise}
        del model
        release(self.device)
        timings["sample_s"] = time.perf_counter() - start - timings["load_s"]
        out.mkdir(parents=True, exist_ok=True)
        clips = self._write_clips(latents, out, f"step {step}")
        timings["decode_s"] = time.perf_counter() - start - timings["load_s"] - timings["sample_s"]
        student = store_latents(out, self.plan.names, latents)
        metrics = checkpoint_metrics(*student, *self.reference, groups=self.plan.groups)
        if self.start_metrics is not None:
            metrics["gap_closed"] = gap_closed(metrics["score"], self.start_metrics["score"])
        timings["total_s"] = time.perf_counter() - start
        result = {"step": step, "checkpoint": str(step_dir), "reference_id": self.plan.reference_id,
                  "metrics": metrics, "grouped_by_prompt": self.plan.groups is not None, "sampler": sampler,
                  "clips": clips, "timings_s": {k: round(v, 3) for k, v in timings.items()}}
        if self.start_metrics is not None:
            result["start_metrics"] = self.start_metrics
        self._logger().log(step, {f"eval/{k}": v for k, v in metrics.items()},
                           media={"eval/contact_sheet": out / store.CONTACT_SHEET,
                                  **{f"eval/clip/{c['file'][:-4]}": out / c["file"] for c in clips}})
        store.write_step_result(self.run, step, result)      # last: the step is done
        best = store.update_best(self.run, self.plan.reference_id)
        closed = f"; {metrics['gap_closed']:.0%} of the way from the unguided start" if "gap_closed" in metrics else ""
        print(f"step {step}: score {metrics['score']:.4f} (fd video {metrics['fd_video']:.4f}, audio "
              f"{metrics['fd_audio']:.4f}{closed}); best step {best['step']} ({best['score']:.4f}); "
              f"{timings['total_s']:.1f} s", flush=True)
        return result

    def _write_clips(self, latents: dict, out: Path, title: str) -> list[dict]:
        return write_clips(self.plan.jobs, latents, self.bundle, self.vocoder, self.device, out,
                           f"{self.run.name}: {title}", self.cfg.progress)

    def _logger(self) -> MetricsLog:
        if self.log is None:   # created on the first result, so a pass with nothing to do leaves wandb alone
            info = self.plan.info
            self.log = MetricsLog(store.eval_root(self.run), config=self._wandb_config(), rank=0,
                                  mode=self.cfg.wandb_mode, project=info.wandb_project,
                                  run_name=f"{info.run_name or self.run.resolve().name}-eval", resume=True,
                                  group=wandb_group(self.run), job_type="eval", step_metric="train_step")
        return self.log

    def _wandb_config(self) -> dict:
        return {"run": str(self.run), "prompts_file": str(self.cfg.prompts_file), "seeds": list(self.cfg.seeds),
                "reference": self.plan.reference_spec, "reference_id": self.plan.reference_id}

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def gap_closed(score: float, start_score: float) -> float:
    """How far a guided fine-tune has come from its start (the teacher sampled without guidance)
    to the guided reference: 0 where it started, 1 at the reference (score 0), < 0 farther off."""
    return 1.0 - score / start_score if start_score > 0 else float("nan")


def write_clips(jobs: list[Job], latents: dict, bundle: EncoderBundle, vocoder, device: torch.device, out: Path,
                title: str, progress: bool) -> list[dict]:
    """An mp4 per clip and the contact sheet, decoding each clip once (sample.py's decoders)."""
    clips, rows = [], []
    for job, frames, audio in decode_clips(jobs, latents, bundle, vocoder, device, progress):
        clips.append(write_clip(out, job, frames, audio))
        label = f"{job.name}  {'[i2v] ' if job.image else ''}{job.prompt}"
        # only the frames the sheet shows are kept: a whole 720p clip is ~180 MB
        rows.append(SheetRow(label[:MAX_LABEL_CHARS], frames[pick_frames(len(frames))].copy(), audio))
    save_png(contact_sheet(rows, title=title), out / store.CONTACT_SHEET)
    return clips


def store_latents(out: Path, names: list[str], latents: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's latents beside its clips (re-scoring needs no model), read back stacked."""
    store.save_latents(out / store.LATENTS_FILE, names, latents)
    return store.load_latents(out / store.LATENTS_FILE)


def watch_loop(evaluator: Evaluator, cfg: EvalConfig) -> list[int]:
    """Evaluate what is pending; with --watch, poll until the final step is done or the run goes idle."""
    evaluated, last_news = [], time.monotonic()
    while True:
        for step_dir in evaluator.pending():
            if evaluator.evaluate(step_dir) is not None:
                evaluated.append(store.step_number(step_dir))
            last_news = time.monotonic()
        if not cfg.watch:
            return evaluated
        final = final_step(cfg.run)
        done = store.done_steps(cfg.run, evaluator.plan.reference_id)
        if final is not None and any(step >= final for step in done):
            print(f"the run's final step {final} is evaluated", flush=True)
            return evaluated
        if time.monotonic() - last_news > cfg.max_idle_s:
            print(f"no new checkpoint for {cfg.max_idle_s:.0f} s: stopping", flush=True)
            return evaluated
        time.sleep(cfg.poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        plan = prepare(cfg)
    except (ValueError, FileNotFoundError) as err:   # EvalError, SampleError, CheckpointError, EncoderFileError
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    store.eval_root(cfg.run).mkdir(parents=True, exist_ok=True)
    pending = [store.step_number(p) for p in checkpoint.complete_steps(cfg.run)
               if store.step_number(p) not in store.done_steps(cfg.run, plan.reference_id)]
    if not pending and not cfg.watch and not plan.make_reference:
        print(f"nothing to evaluate: every complete checkpoint of {cfg.run} is done", flush=True)
        return EXIT_OK
    evaluator = Evaluator(plan)
    try:
        evaluator.ensure_reference()
        evaluated = watch_loop(evaluator, cfg)
    finally:
        evaluator.close()
    best = store.update_best(cfg.run, plan.reference_id)
    summary = f"evaluated {len(evaluated)} checkpoint(s) {evaluated}"
    print(summary + (f"; best step {best['step']} (score {best['score']:.4f}) in {store.eval_root(cfg.run) / store.BEST_FILE}"
                     if best else ""), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
