"""Inference speed, teacher vs student, in one run: the 50-step CFG+SLG teacher (`sample_teacher`,
TeacherSamplerConfig defaults: 2 DiT forwards per step) against the 4-step student
(`sample_student`: 1 forward per step), DiT time and end to end (DiT + Wan2.2 VAE decode +
MMAudio VAE decode + BigVGAN vocoder + the uint8/float copies to the host), with each stage's share.

    PYTHONPATH=. python bench/inference.py --out results/inference.json     # 1 GPU, full size, bf16
    python bench/inference.py --smoke --out /tmp/inference.json              # tiny models, CPU, seconds

Full-size models get random N(0, 0.02) weights, made directly on the GPU (speed does not depend on
the values): OviFusion of the variant (11.66B parameters, built on the meta device in bf16, then
materialised), the Wan2.2 VAE (bf16), the MMAudio 16 kHz VAE and BigVGAN (float32, as
distill/sample.py runs them). Text embeddings are random tensors: umT5 is the same cost for both
samplers (one prompt, ~7 ms) and is not part of either number; mp4 encoding (CPU) is not either.

The video decode is the part of the student's time that the DiT speed-up does not shrink, so the
run first times every decode variant on the same latent (`--decode-variants`; each: one warm-up
call, which also runs cuDNN's autotuning and any compilation, then `--sweep-repeats` timed calls,
its model TFLOP/s and its max |diff| against the first variant), then uses the fastest for both
end-to-end runs. A variant is `+`-joined tokens:
  cN       N latent frames per decoder call after frame 0 (c1: the official frame-by-frame decode)
  fa0      frame 0 inside the first chunk instead of alone
  bench    torch.backends.cudnn.benchmark on (autotuned conv algorithms), else off
  cl       channels-last (NDHWC) activations and weights
  2d       each causal 3-D conv as one 2-D conv over its time taps stacked into channels
  compile  RMSNorm (+SiLU) fused into one kernel by torch.compile (wan_vae_modules.compile_decoder_ops)
  best     the fastest variant so far (e.g. `best+compile`)

Order (every stage is written to --out as soon as it is measured, so a run cut short keeps what it
had): build models -> DiT warm-up (compiles the element-wise ops; one student sample and one teacher
step) -> student DiT x --repeats -> decode variants -> audio decode -> student end to end x
--repeats -> teacher end to end x 1 (its DiT part is the teacher's DiT time). With --teacher-steps
below 50, the teacher's 50-step times are extrapolated from the measured per-step time.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distill.flow import STUDENT_SIGMAS  # noqa: E402
from distill.media_out import audio_to_float, video_to_uint8  # noqa: E402
from distill.models import OviFusion, layers, variant_config  # noqa: E402
from distill.sampling import TeacherSamplerConfig, sample_student, sample_teacher  # noqa: E402
from precompute.encoders import bigvgan, mmaudio_vae, wan_vae_modules  # noqa: E402
from precompute.encoders.bigvgan import Vocoder, VocoderConfig  # noqa: E402
from precompute.encoders.mmaudio_vae import AudioVAE, VAEConfig  # noqa: E402
from precompute.encoders.wan_vae import DecodeOptions, WanVideoVAE  # noqa: E402
from precompute.encoders.wan_vae_modules import WanVAEConfig, WanVAEModel  # noqa: E402
from precompute.variants import get_variant, snap_to_area  # noqa: E402

INIT_STD = 0.02
TEACHER_REFERENCE_STEPS = 50
TARGET_DIT, TARGET_E2E = 24.0, 10.0
# 31 latent frames = 1 + 5 x 6 = 1 + 3 x 10 = 1 + 2 x 15. At 704x704 one conv sample over 6+ latent
# frames passes 2^31 elements in the last stage: CausalConv3d then cuts it along time itself.
# Most telling first: variants that would start after --budget-s are skipped.
GPU_DECODE_VARIANTS = ("c1", "c6+bench+cl", "c6+bench+cl+2d", "c15+bench+cl+2d", "c10+bench+cl", "best+compile",
                       "c6+bench", "c1+bench")
SMOKE_DECODE_VARIANTS = ("c1", "c2+fa0+cl", "best+2d")
SMOKE_SIZE = (32, 32)   # pixels: a 2x2 latent, one DiT token per frame
SMOKE_AUDIO_LATENTS = 8


# ----------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time between synchronised points (every GPU kernel before `lap` has finished)."""

    def __init__(self, device: torch.device):
        self.device = device
        sync(device)
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        sync(self.device)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    def total(self) -> float:
        return self.last - self.start


class ForwardTimer:
    """Wraps the DiT: counts forwards and times each (CUDA events: no extra synchronisation)."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.marks: list = []

    def __call__(self, *args, **kwargs):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.model(*args, **kwargs)
            end.record()
        else:
            start = time.perf_counter()
            out = self.model(*args, **kwargs)
            end = time.perf_counter()
        self.marks.append((start, end))
        return out

    def reset(self) -> None:
        self.marks = []

    def seconds(self) -> list[float]:
        sync(self.device)
        if self.device.type == "cuda":
            return [s.elapsed_time(e) / 1e3 for s, e in self.marks]
        return [e - s for s, e in self.marks]


def stats(values: list[float]) -> dict:
    values = sorted(values)
    return {"n": len(values), "median": values[len(values) // 2], "min": values[0], "max": values[-1]}


# ----------------------------------------------------------------------------- models

def _randomise(module: torch.nn.Module, seed: int, device: torch.device) -> torch.nn.Module:
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, INIT_STD, generator=gen)
    return module


def build_dit(variant_name: str, device: torch.device, dtype: torch.dtype, num_layers: int | None = None) -> OviFusion:
    """Random-weight DiT of the variant (`num_layers`: a shallower one, for quick checks)."""
    if variant_name == "tiny" and num_layers is None:
        return OviFusion.from_variant("tiny").to(device=device, dtype=dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        model = OviFusion(variant_config(variant_name, num_layers)).to(dtype)   # meta in bf16: 23 GB, never 46
    model = model.to_empty(device=device)
    return _randomise(model, 0, device).eval().requires_grad_(False)


def build_decoders(tiny: bool, device: torch.device, dtype: torch.dtype) -> tuple[WanVideoVAE, AudioVAE, Vocoder]:
    """Video VAE in `dtype`, audio VAE and vocoder in float32 (distill/sample.py's choices)."""
    if tiny:
        return (WanVideoVAE.tiny(seed=0, device=device, dtype=dtype), AudioVAE.tiny(seed=0).to(device),
                Vocoder.tiny(seed=0).to(device))
    with torch.device(device):
        model = WanVAEModel(WanVAEConfig())
    video = WanVideoVAE(_randomise(model, 0, device).to(dtype))
    audio = AudioVAE.from_state_dict(mmaudio_vae.random_checkpoint(VAEConfig(), seed=0), device=device)
    vocoder = Vocoder.from_state_dict(bigvgan.random_checkpoint(VocoderConfig(), seed=0), device=device)
    return video, audio, vocoder


# ----------------------------------------------------------------------------- decode variants

def parse_variant(spec: str, best: str | None) -> tuple[str, dict]:
    """'c5+bench+cl' -> (name, {chunk, first_alone, channels_last, benchmark, compile})."""
    tokens = spec.split("+")
    if tokens[0] == "best":
        if best is None:
            raise ValueError(f"decode variant {spec!r}: no earlier variant to be 'best'")
        name = best + ("+" + "+".join(tokens[1:]) if tokens[1:] else "")
        tokens = best.split("+") + tokens[1:]
    else:
        name = spec
    opts = dict(chunk=1, first_alone=True, channels_last=False, conv_as_2d=False, benchmark=False, compile=False)
    for tok in tokens:
        if tok.startswith("c") and tok[1:].isdigit():
            opts["chunk"] = int(tok[1:])
        elif tok == "fa0":
            opts["first_alone"] = False
        elif tok == "cl":
            opts["channels_last"] = True
        elif tok == "2d":
            opts["conv_as_2d"] = True
        elif tok == "bench":
            opts["benchmark"] = True
        elif tok == "compile":
            opts["compile"] = True
        else:
            raise ValueError(f"decode variant {spec!r}: unknown token {tok!r}")
    return name, opts


def decode_options(opts: dict) -> DecodeOptions:
    return DecodeOptions(chunk=opts["chunk"], first_alone=opts["first_alone"], channels_last=opts["channels_last"],
                         conv_as_2d=opts["conv_as_2d"])


_COMPILED = {"on": False}


def apply_globals(opts: dict, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = opts["benchmark"]
    if opts["compile"] != _COMPILED["on"]:
        wan_vae_modules.compile_decoder_ops(opts["compile"])
        _COMPILED["on"] = opts["compile"]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_flops(config: WanVAEConfig, latent_shape) -> float:
    """Model FLOPs of one video decode (convolutions + attention), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = WanVAEModel(config).to(torch.bfloat16)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.decode(torch.empty(latent_shape, device="meta", dtype=torch.bfloat16), chunk=latent_shape[2])
    return float(counter.get_total_flops())


def sweep_decode(vae: WanVideoVAE, latent: torch.Tensor, specs, repeats: int, device: torch.device,
                 deadline: float, record, flops: float = 0.0) -> tuple[str, dict]:
    rows, reference, best = [], None, None
    for spec in specs:
        try:
            name, opts = parse_variant(spec, best)
        except ValueError as err:
            rows.append({"variant": spec, "error": str(err)})
            continue
        if time.perf_counter() > deadline:
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        row, out = {"variant": name, **opts}, None
        try:
            apply_globals(opts, device)
            options = decode_options(opts)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            clock = Stopwatch(device)
            out = vae.decode(latent, options=options)
            row["first_call_s"] = clock.lap()              # autotune / compile included
            times = []
            for _ in range(repeats):
                out = None
                out = vae.decode(latent, options=options)
                times.append(clock.lap())
            row["seconds"] = min(times)
            row["all_s"] = times
            if flops:
                row["tflops"] = flops / row["seconds"] / 1e12
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if reference is None:
                reference, row["max_abs_diff_vs_first"] = out, 0.0
            else:
                row["max_abs_diff_vs_first"] = (out - reference).abs().max().item()
            del out
            if best is None or row["seconds"] < next(r["seconds"] for r in rows if r.get("variant") == best):
                best = name
        except torch.cuda.OutOfMemoryError as err:   # a too-large chunk: note it, go on
            row["error"] = f"OOM: {str(err).splitlines()[0]}"
        except Exception as err:                      # e.g. a compile failure: note it, go on eagerly
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            if opts["compile"]:
                apply_globals({**opts, "compile": False}, device)
        release(device)
        rows.append(row)
        print(f"decode {name}: {json.dumps({k: v for k, v in row.items() if k != 'variant'})}", flush=True)
        record(rows)
    if best is None:
        raise RuntimeError("no decode variant finished")
    return best, parse_variant(best, None)[1]


# ----------------------------------------------------------------------------- pipelines

def audio_decode(audio_vae: AudioVAE, vocoder: Vocoder, audio_latent: torch.Tensor) -> torch.Tensor:
    mel = audio_vae.decode(audio_latent.float())
    return vocoder(mel.to(next(vocoder.parameters()).dtype))


@torch.no_grad()
def end_to_end(sampler, vae: WanVideoVAE, options: DecodeOptions, audio_vae: AudioVAE, vocoder: Vocoder,
               device: torch.device) -> dict:
    """One clip: DiT sampling -> video decode -> audio decode -> uint8 frames + float audio on the host."""
    clock = Stopwatch(device)
    video_latent, audio_latent = sampler()
    stages = {"dit": clock.lap()}
    video = vae.decode(video_latent, options=options)
    stages["video_decode"] = clock.lap()
    waveform = audio_decode(audio_vae, vocoder, audio_latent)
    stages["audio_decode"] = clock.lap()
    frames, audio = video_to_uint8(video[0]), audio_to_float(waveform[0])
    stages["to_host"] = clock.lap()
    total = clock.total()
    return {"stages_s": stages, "total_s": total, "shares": {k: v / total for k, v in stages.items()},
            "frames": list(frames.shape), "audio_samples": int(audio.size)}


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    variant = get_variant(args.variant)
    height, width = args.size or snap_to_area(*variant.default_hw, variant.area)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"variant": variant.name, "pixels": [variant.frames, height, width],
                     "audio_latents": args.audio_latents or variant.audio_latents, "device":
                     torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
                     "teacher_steps_run": args.teacher_steps, "teacher": asdict(TeacherSamplerConfig()),
                     "student_sigmas": list(STUDENT_SIGMAS), "repeats": args.repeats}

    def record(key=None, value=None):
        if key is not None:
            results[key] = value
        results["wall_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(results, indent=1) + "\n")

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        layers.compile_elementwise_ops()
    torch.manual_seed(0)

    # -- models
    clock = Stopwatch(device)
    dit = build_dit(variant.name, device, dtype)
    vae, audio_vae, vocoder = build_decoders(variant.name == "tiny", device, dtype)
    record("init_s", clock.lap())
    print(f"models built in {results['init_s']:.1f} s", flush=True)

    cfg = dit.cfg
    gen = torch.Generator(device=device).manual_seed(0)
    noise_video = torch.randn((1, cfg.video.in_dim, variant.latent_frames, height // 16, width // 16),
                              generator=gen, device=device)
    audio_latents = args.audio_latents or variant.audio_latents
    noise_audio = torch.randn((1, audio_latents, cfg.audio.in_dim), generator=gen, device=device)
    text, neg_video, neg_audio = (torch.randn((1, variant.text_len, cfg.video.text_dim), generator=gen,
                                              device=device).to(dtype) for _ in range(3))
    # noise stays float32 (the samplers' arithmetic runs in the sample's dtype), text in the DiT's: as distill/sample.py
    timer = ForwardTimer(dit, device)
    teacher_cfg = TeacherSamplerConfig(steps=args.teacher_steps)

    def student():
        generator = torch.Generator(device=device).manual_seed(1)
        return sample_student(timer, noise_video, noise_audio, text, sigmas=STUDENT_SIGMAS, generator=generator)

    def teacher(cfg_=teacher_cfg):
        return sample_teacher(timer, noise_video, noise_audio, text, neg_video, neg_audio, cfg=cfg_)

    # -- DiT warm-up (element-wise kernels compile here), then the student's DiT alone
    clock.lap()
    student()
    teacher(TeacherSamplerConfig(steps=1))
    record("dit_warmup_s", clock.lap())
    student_dit = []
    for _ in range(args.repeats):
        timer.reset()
        clock.lap()
        latents = student()
        student_dit.append({"seconds": clock.lap(), "forwards": stats(timer.seconds())})
    record("student_dit", {"runs": student_dit, "seconds": min(r["seconds"] for r in student_dit),
                           "forward_passes": len(STUDENT_SIGMAS)})
    print(f"student DiT: {results['student_dit']['seconds']:.3f} s", flush=True)

    # -- decode variants on the student's latent
    specs = args.decode_variants or (SMOKE_DECODE_VARIANTS if variant.name == "tiny" else GPU_DECODE_VARIANTS)
    record("decode_tflop", decode_flops(vae.config, tuple(latents[0].shape)) / 1e12)
    with torch.no_grad():
        best, best_opts = sweep_decode(vae, latents[0], specs, args.sweep_repeats, device, deadline,
                                       lambda rows: record("decode_variants", rows), results["decode_tflop"] * 1e12)
    apply_globals(best_opts, device)
    options = decode_options(best_opts)
    record("best_decode", best)
    print(f"best decode: {best}", flush=True)

    # -- audio decode alone
    with torch.no_grad():
        if device.type == "cuda":
            audio_decode(audio_vae, vocoder, latents[1])   # warm-up
        times = []
        for _ in range(args.repeats):
            clock.lap()
            audio_decode(audio_vae, vocoder, latents[1])
            times.append(clock.lap())
    record("audio_decode_s", min(times))
    del latents
    release(device)

    # -- end to end
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(args.repeats):
        timer.reset()
        runs.append(end_to_end(student, vae, options, audio_vae, vocoder, device))
        runs[-1]["forwards"] = stats(timer.seconds())
    e2e_student = min(runs, key=lambda r: r["total_s"])
    record("e2e_student", {**e2e_student, "runs_total_s": [r["total_s"] for r in runs]})
    print(f"student end to end: {e2e_student['total_s']:.3f} s", flush=True)
    release(device)
    timer.reset()
    e2e_teacher = end_to_end(teacher, vae, options, audio_vae, vocoder, device)
    forwards = timer.seconds()
    e2e_teacher["forwards"] = stats(forwards)
    e2e_teacher["forward_passes"] = len(forwards)
    scale = TEACHER_REFERENCE_STEPS / args.teacher_steps
    if args.teacher_steps != TEACHER_REFERENCE_STEPS:   # extrapolate the DiT part to 50 steps
        e2e_teacher["measured_stages_s"] = dict(e2e_teacher["stages_s"])
        e2e_teacher["stages_s"]["dit"] *= scale
        e2e_teacher["total_s"] = sum(e2e_teacher["stages_s"].values())
        e2e_teacher["shares"] = {k: v / e2e_teacher["total_s"] for k, v in e2e_teacher["stages_s"].items()}
        e2e_teacher["extrapolated_to_steps"] = TEACHER_REFERENCE_STEPS
    record("e2e_teacher", e2e_teacher)
    if device.type == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    teacher_dit = e2e_teacher["stages_s"]["dit"]
    student_dit_s = results["student_dit"]["seconds"]
    teacher_forwards = 2 * TEACHER_REFERENCE_STEPS
    results["summary"] = {
        "teacher_dit_s": teacher_dit, "student_dit_s": student_dit_s,
        "teacher_step_s": e2e_teacher["measured_stages_s"]["dit"] / args.teacher_steps
        if "measured_stages_s" in e2e_teacher else teacher_dit / args.teacher_steps,
        "forward_pass_ratio": teacher_forwards / len(STUDENT_SIGMAS),
        "teacher_forward_median_s": e2e_teacher["forwards"]["median"],
        "student_forward_median_s": e2e_student["forwards"]["median"],
        "dit_speedup": teacher_dit / student_dit_s,
        "teacher_e2e_s": e2e_teacher["total_s"], "student_e2e_s": e2e_student["total_s"],
        "e2e_speedup": e2e_teacher["total_s"] / e2e_student["total_s"],
        "decode_s": e2e_student["stages_s"]["video_decode"] + e2e_student["stages_s"]["audio_decode"],
        "target_dit": TARGET_DIT, "target_e2e": TARGET_E2E,
    }
    s = results["summary"]
    s["dit_target_met"] = s["dit_speedup"] >= TARGET_DIT
    s["e2e_target_met"] = s["e2e_speedup"] >= TARGET_E2E
    # the decode time (video + audio + host copies) that would just meet the end-to-end target
    fixed = e2e_student["total_s"] - e2e_student["stages_s"]["dit"]
    s["non_dit_s"] = fixed
    s["non_dit_budget_for_target_s"] = (teacher_dit - TARGET_E2E * student_dit_s) / (TARGET_E2E - 1)
    record()
    return results


# ----------------------------------------------------------------------------- report

def table(r: dict) -> str:
    lines = [f"Inference, {r['variant']} ({r['pixels'][0]} frames {r['pixels'][1]}x{r['pixels'][2]}), "
             f"{r['device']}, torch {r['torch']}, {r['dtype']}",
             "", "Wan2.2 VAE decode variants (same latent; min of timed calls after one warm-up)",
             f"({r.get('decode_tflop', float('nan')):.4g} TFLOP per decode)", "",
             "| variant | s | TFLOP/s | first call s | peak GiB | max abs diff vs first |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in r.get("decode_variants", []):
        if "seconds" in row:
            lines.append(f"| {row['variant']} | {row['seconds']:.3f} | {row.get('tflops', float('nan')):.0f} | "
                         f"{row['first_call_s']:.2f} | {row.get('peak_gib', float('nan')):.1f} | "
                         f"{row['max_abs_diff_vs_first']:.3g} |")
        else:
            lines.append(f"| {row['variant']} | {row.get('error') or row.get('skipped')} | | | | |")
    lines += ["", f"Best decode: {r.get('best_decode')}. Audio decode (MMAudio VAE + BigVGAN): "
              f"{r.get('audio_decode_s', float('nan')):.3f} s.", ""]
    t, st = r.get("e2e_teacher"), r.get("e2e_student")
    if t and st:
        lines += ["| stage | teacher s | share | student s | share |", "|---|---:|---:|---:|---:|"]
        for k in t["stages_s"]:
            lines.append(f"| {k} | {t['stages_s'][k]:.3f} | {100 * t['shares'][k]:.1f}% | "
                         f"{st['stages_s'][k]:.3f} | {100 * st['shares'][k]:.1f}% |")
        lines.append(f"| **total** | **{t['total_s']:.3f}** | | **{st['total_s']:.3f}** | |")
        s = r["summary"]
        ext = f" (DiT extrapolated from {r['teacher_steps_run']} steps)" if "extrapolated_to_steps" in t else ""
        lines += ["", f"Teacher {TEACHER_REFERENCE_STEPS} steps x 2 forwards{ext}: {s['teacher_step_s']:.3f} s/step; "
                  f"student {len(r['student_sigmas'])} forwards.",
                  f"DiT speed-up: **{s['dit_speedup']:.1f}x** (forward-pass ratio {s['forward_pass_ratio']:.0f}x; "
                  f"target {TARGET_DIT:.0f}x: {'met' if s['dit_target_met'] else 'NOT met'})",
                  f"End-to-end speed-up: **{s['e2e_speedup']:.2f}x** (target {TARGET_E2E:.0f}x: "
                  f"{'met' if s['e2e_target_met'] else 'NOT met'}); the student's non-DiT time is "
                  f"{s['non_dit_s']:.3f} s, the target allows {s['non_dit_budget_for_target_s']:.3f} s."]
    if "peak_gib" in r:
        lines.append(f"Peak GPU memory in the end-to-end runs: {r['peak_gib']:.1f} GiB; wall {r['wall_s']:.0f} s.")
    return "\n".join(lines)


def full_size_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every full-size, random-weight bench shares (its docstring: title, then epilog)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results (written after every stage)")
    p.add_argument("--variant", default="720x720_5s")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    return p


def main(argv=None) -> int:
    p = full_size_parser(__doc__)
    p.add_argument("--teacher-steps", type=int, default=None,
                   help=f"teacher steps actually run (default {TEACHER_REFERENCE_STEPS}; 2 with --smoke); "
                        f"fewer are extrapolated to {TEACHER_REFERENCE_STEPS}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 2; 1 with --smoke)")
    p.add_argument("--sweep-repeats", type=int, default=1, help="timed calls per decode variant after its warm-up")
    p.add_argument("--decode-variants", nargs="+", help="decode variants to time, in order (see above)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="decode variants that would start after this many seconds from launch are skipped")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="pixel size, multiples of 32 (default: the variant's bucket, 704x704 for 720x720_5s; "
                        f"{SMOKE_SIZE[0]}x{SMOKE_SIZE[1]} with --smoke)")
    p.add_argument("--audio-latents", type=int, help=f"audio latent frames (default: the variant's; "
                   f"{SMOKE_AUDIO_LATENTS} with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny variant on the CPU: checks that the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.variant, args.device = "tiny", args.device or "cpu"
        args.teacher_steps = args.teacher_steps or 2
        args.repeats = args.repeats or 1
        args.size = args.size or SMOKE_SIZE
        args.audio_latents = args.audio_latents or SMOKE_AUDIO_LATENTS
    args.device = args.device or "cuda"
    args.teacher_steps = args.teacher_steps or TEACHER_REFERENCE_STEPS
    args.repeats = args.repeats or 2
    if args.size and any(v <= 0 or v % 32 for v in args.size):
        p.error(f"--size must be positive multiples of 32, got {args.size}")
    if args.teacher_steps < 1 or args.repeats < 1 or args.sweep_repeats < 1:
        p.error("--teacher-steps, --repeats and --sweep-repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here (use --smoke for the CPU check)")
    if args.device == "cpu":
        torch.set_num_threads(1)   # small convs on a shared CPU: more threads are slower
    results = run(args)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
