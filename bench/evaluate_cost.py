"""What distill/evaluate.py costs on one GPU: seconds per checkpoint evaluation (8 prompts x 1 seed:
4-step student sampling + decode to mp4 + contact sheet + latent metrics), the one-off 50-step
CFG+SLG teacher reference, and the peak GPU memory (the evaluator must fit one 80 GB GPU).

    PYTHONPATH=. python bench/evaluate_cost.py --out bench/results/evaluate_cost.json   # 1 GPU, 720x720_5s, bf16
    python bench/evaluate_cost.py --smoke --out /tmp/evaluate_cost.json                 # tiny models, CPU
    PYTHONPATH=. python bench/evaluate_cost.py --num-layers 4 --clips 2 --out /tmp/e.json   # quick GPU check

Full-size models get random weights on the GPU (bench/inference.py's build_dit and build_decoders:
the cost does not depend on the values); text embeddings are random (umT5 runs once per evaluator
process, not per checkpoint). The per-checkpoint work runs through the evaluator's own functions
(distill/sample.py's sample_latents and decoders, distill/evaluate.py's write_clips and
store_latents, distill/eval_metrics.py), twice: the first pass pays cuDNN autotuning and the
allocator's warm-up, the second is the steady cost reported. Not included: reading and stitching
the EMA shards of a checkpoint (~47 GB of fp32 from the run's file system: storage-bound, measure
it on your cluster) and loading umT5 once.

The reference: --reference-steps-run teacher steps for one clip are timed and extrapolated to
--reference-steps x --clips (the teacher's steps all cost the same: 2 DiT forwards each), plus the
clips' decode at the measured per-clip cost. A guided fine-tune's checkpoint (stage 2) is sampled
by the same teacher sampler without CFG or SLG (one forward a step), timed the same way: its
per-checkpoint cost is the student's with the 4-step sampling replaced by that extrapolation. The one DiT serves as teacher and student: the
evaluator holds one at a time as well.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.inference import Stopwatch, build_decoders, build_dit, full_size_parser, release  # noqa: E402
from distill.eval_metrics import checkpoint_metrics  # noqa: E402
from distill.evaluate import store_latents, write_clips  # noqa: E402
from distill.flow import STUDENT_SIGMAS  # noqa: E402
from distill.sample import SampleConfig, plan_jobs, sample_latents  # noqa: E402
from distill.sampling import TeacherSamplerConfig  # noqa: E402
from precompute.encoders.bundle import EncoderBundle  # noqa: E402
from precompute.variants import get_variant  # noqa: E402

SLG_BLOCK = 11   # Ovi's; shallower test models skip their last block instead
USABLE_GIB_80GB = 78.0   # what an 80 GB H100 leaves to PyTorch


def random_texts(prompts: list[str], text_len: int, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(text_len, dim, generator=g) for p in prompts}


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    variant = get_variant(args.variant)
    out_dir = Path(tempfile.mkdtemp(prefix="evaluate_cost_"))
    results: dict = {"variant": variant.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "clips": args.clips,
                     "num_layers": args.num_layers or "full", "reference_steps": args.reference_steps,
                     "reference_steps_run": args.reference_steps_run}

    def record(key, value):
        results[key] = value
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"{key}: {json.dumps(value)}", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    clock = Stopwatch(device)
    dit = build_dit(variant.name, device, dtype, args.num_layers)
    video_vae, audio_vae, vocoder = build_decoders(variant.name == "tiny", device, dtype)
    bundle = EncoderBundle(video_vae=video_vae, audio_vae=audio_vae, text=None)
    record("build_s", clock.lap())

    prompts = [f"evaluation prompt {i} <AUDCAP>sound {i}<ENDAUDCAP>" for i in range(args.clips)]
    jobs = plan_jobs(prompts, (0,), variant, None, [], {})
    texts = random_texts(prompts + ["negative video", "negative audio"], variant.text_len, dit.cfg.video.text_dim)
    negatives = (texts["negative video"], texts["negative audio"])
    slg = min(SLG_BLOCK, len(dit.video_model.blocks) - 1)
    cfg = SampleConfig(model_path=Path("random"), teacher=False, variant=variant, prompts_file=Path("-"), out=out_dir,
                       batch_size=1, progress=False)
    names = [job.name for job in jobs]

    # -- the reference's teacher steps, timed on one clip and extrapolated
    teacher_cfg = replace(cfg, teacher=True, teacher_cfg=TeacherSamplerConfig(steps=args.reference_steps_run, slg_block=slg))
    sample_latents(dit, jobs[:1], replace(teacher_cfg, teacher_cfg=TeacherSamplerConfig(steps=1, slg_block=slg)),
                   variant, texts, negatives, {}, (), device, dtype)   # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock.lap()
    reference = sample_latents(dit, jobs[:1], teacher_cfg, variant, texts, negatives, {}, (), device, dtype)
    step_s = clock.lap() / args.reference_steps_run
    record("teacher_step_s", step_s)
    record("reference_peak_gib", peak_gib(device))
    # a guided fine-tune's checkpoint (stage 2) is sampled as DMD queries it: the same steps, no CFG, no
    # SLG (distill/evaluate.py's RunInfo.unguided): the positive pass alone
    unguided = TeacherSamplerConfig(steps=args.reference_steps_run, cfg_video=1.0, cfg_audio=1.0, slg_block=None)
    clock.lap()
    sample_latents(dit, jobs[:1], replace(cfg, teacher=True, teacher_cfg=unguided), variant, texts, negatives, {}, (),
                   device, dtype)
    unguided_step_s = clock.lap() / args.reference_steps_run
    record("unguided_teacher_step_s", unguided_step_s)
    # the metrics' cost does not depend on the values: random reference latents of the clips' shape
    g = torch.Generator().manual_seed(1)
    one_video, one_audio = reference[jobs[0].name]
    reference = {n: (torch.randn(one_video.shape, generator=g), torch.randn(one_audio.shape, generator=g)) for n in names}

    # -- one checkpoint's evaluation, twice (cold, then the steady cost)
    passes = []
    for attempt in range(2):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = out_dir / f"step-{attempt}"
        out.mkdir()
        clock.lap()
        latents = sample_latents(dit, jobs, cfg, variant, texts, None, {}, STUDENT_SIGMAS, device, dtype, "fresh")
        stages = {"student_sampling_s": clock.lap()}
        write_clips(jobs, latents, bundle, vocoder, device, out, f"step {attempt}", progress=False)
        stages["decode_mp4_sheet_s"] = clock.lap()
        student = store_latents(out, names, latents)
        ref_video = torch.stack([reference[n][0] for n in names])
        ref_audio = torch.stack([reference[n][1] for n in names])
        metrics = checkpoint_metrics(*student, ref_video, ref_audio)
        stages["metrics_s"] = clock.lap()
        stages["total_s"] = sum(stages.values())
        stages["peak_gib"] = peak_gib(device)
        stages["score"] = metrics["score"]
        passes.append(stages)
        record(f"checkpoint_pass_{attempt}", stages)
        del latents
        release(device)

    steady = passes[-1]
    decode_per_clip = steady["decode_mp4_sheet_s"] / args.clips
    reference_s = step_s * args.reference_steps * args.clips + decode_per_clip * args.clips
    unguided_dit_s = unguided_step_s * args.reference_steps * args.clips
    record("summary", {
        "seconds_per_checkpoint": steady["total_s"], "seconds_per_checkpoint_first": passes[0]["total_s"],
        # stage 2: the student's 4-step sampling replaced by the unguided teacher's reference steps
        "seconds_per_fine_tune_checkpoint_extrapolated": steady["total_s"] - steady["student_sampling_s"] + unguided_dit_s,
        "fine_tune_dit_s_extrapolated": unguided_dit_s,
        "reference_s_extrapolated": reference_s, "reference_dit_s_extrapolated": step_s * args.reference_steps * args.clips,
        "peak_gib": None if device.type != "cuda" else max([results["reference_peak_gib"]] + [p["peak_gib"] for p in passes]),
        "fits_80gb": None if device.type != "cuda" else max([results["reference_peak_gib"]] + [p["peak_gib"] for p in passes]) < USABLE_GIB_80GB,
        "not_included": "reading + stitching the EMA shards (~47 GB fp32, storage-bound); umT5 once per process",
        "teacher": asdict(TeacherSamplerConfig(steps=args.reference_steps, slg_block=slg)),
    })
    return results


def table(r: dict) -> str:
    s = r["summary"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    lines = [f"distill/evaluate.py cost, {r['variant']} ({r['num_layers']} layers), {r['clips']} clips x 1 seed, "
             f"{r['device']}, {r['dtype']}", "",
             "| per checkpoint | first pass s | steady s |", "|---|---:|---:|"]
    first, steady = r["checkpoint_pass_0"], r["checkpoint_pass_1"]
    for key in ("student_sampling_s", "decode_mp4_sheet_s", "metrics_s", "total_s"):
        lines.append(f"| {key.removesuffix('_s')} | {first[key]:.2f} | {steady[key]:.2f} |")
    lines += ["", f"Reference (one-off, {r['reference_steps']} teacher steps x 2 forwards x {r['clips']} clips, "
              f"extrapolated from {r['reference_steps_run']} steps on 1 clip: {r['teacher_step_s']:.3f} s/step): "
              f"**{s['reference_s_extrapolated']:.1f} s** ({s['reference_dit_s_extrapolated']:.1f} s DiT + decode)",
              f"Per checkpoint: **{s['seconds_per_checkpoint']:.1f} s** steady ({s['seconds_per_checkpoint_first']:.1f} s "
              f"first); peak GPU memory {fmt(s['peak_gib'])} GiB (fits 80 GB: {s['fits_80gb']}).",
              f"Per checkpoint of a guided fine-tune (stage 2: {r['reference_steps']} unguided teacher steps, "
              f"{r['unguided_teacher_step_s']:.3f} s/step, instead of the 4-step student): "
              f"**{s['seconds_per_fine_tune_checkpoint_extrapolated']:.1f} s** ({s['fine_tune_dit_s_extrapolated']:.1f} s DiT, "
              "extrapolated); its start (the teacher unguided) is made once with the reference at the same cost.",
              f"Not included: {s['not_included']}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = full_size_parser(__doc__)
    p.add_argument("--clips", type=int, default=8, help="prompts x seeds per checkpoint")
    p.add_argument("--num-layers", type=int, help="DiT depth (default: the variant's 30)")
    p.add_argument("--reference-steps", type=int, default=50, help="teacher steps of the reference (extrapolated to)")
    p.add_argument("--reference-steps-run", type=int, default=5, help="teacher steps actually timed")
    p.add_argument("--smoke", action="store_true", help="tiny variant, 2 clips, 2 teacher steps, on the CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.variant, args.device = "tiny", args.device or "cpu"
        args.clips, args.reference_steps_run = min(args.clips, 2), 2
    args.device = args.device or "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here (use --smoke for the CPU check)")
    if args.clips < 2:
        p.error("--clips must be >= 2 (the metrics need two samples)")
    if min(args.reference_steps, args.reference_steps_run) < 1:
        p.error("--reference-steps and --reference-steps-run must be >= 1")
    if args.device == "cpu":
        torch.set_num_threads(1)
    results = run(args)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
