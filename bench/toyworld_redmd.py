"""A finished toy-world run's DMD stage again, with changes: the same dataset, teacher and guided
fine-tune, so a change to DMD alone is measured against that run's own students.

    python bench/toyworld_redmd.py RUN OUT [--set FIELD=VALUE ...] [--dmd KEY=VALUE ...]
    python bench/toyworld_redmd.py RUN OUT --measure      # the run's own saved samples, no training
    python bench/toyworld_redmd.py RUN OUT --fine-tune [--set FIELD=VALUE ...] [--flow KEY=VALUE ...]

RUN is a guided bench/toyworld.py output folder (a sweep's seedS_cfgC) that still holds its data,
pairs and guided.safetensors. `--set` changes the run's size (bench/toyworld.py fields, e.g.
generator_lr=6e-5 drift_factor=2), `--dmd` adds trainer overrides after the recipe's (e.g.
dmd.critic_ratio=10). Every snapshot is sampled from the run's own noise and measured four ways:
FD to teacher@50's samples (the guided student's target; same noise), to teacher@50's samples from
other noise (the distribution alone), to the fine-tune's own 50-step samples (guided@50: the
distribution DMD aims at) and to the truth. Session 14 found the drift of issue 16
this way (bench/results/dmd_drift_ablation_cpu_s14.json). --measure does the same for the run's own
samplers from its samples.pt (OUT/measure.json): where its students went, relative to DMD's target.
--measure also splits every sampler's FD to the truth into each feature's mean term and the
covariance term (which features a distance is made of). --measure and --fine-tune also give stage 2's gap closed: how far the fine-tune's samples came from
the teacher without guidance to teacher@50's, by the judge and by distill/evaluate.py's gap_closed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import toyworld as tw
from bench.toyworld_redraw import read_run, run_teacher

FINE_TUNE = "guided@50"
START = "teacher unguided@50"   # where stage 2 starts: the teacher sampled without guidance, the run's noise
KEEP = ("to_t50", "to_t50_other_noise", "to_guided50", "to_truth", "diversity", "onset")


def distances(samples: dict[str, dict[int, dict]], size: tw.SizeConfig) -> dict[str, dict[str, float]]:
    """{sampler: {to_t50, to_t50_other_noise, to_guided50, to_truth, diversity, onset}}: the same
    evaluation three times, with teacher@50's samples, teacher@50's samples from other noise and the
    fine-tune's samples as the reference. Every sampler starts from teacher@50's noise, so to_t50
    also rewards keeping the teacher's noise-to-sample map; to_t50_other_noise does not (a move seen
    in to_t50 alone is a move of that map, not of the distribution)."""
    seed = size.seeded(12345)
    judge = lambda reference: tw.evaluate({**samples, tw.REFERENCE: samples[reference]}, size.world,
                                          size.truth_per_class, seed=seed)
    judged, unpaired, to_fine_tune = judge(tw.REFERENCE), judge(tw.REFERENCE_FLOOR), judge(FINE_TUNE)
    return {name: {"to_t50": r["fd_ref_mean"], "to_t50_other_noise": unpaired[name]["fd_ref_mean"],
                   "to_guided50": to_fine_tune[name]["fd_ref_mean"], "to_truth": r["fd_mean"],
                   "diversity": r["diversity_ratio"], "onset": r["onset_agreement"]}
            for name, r in judged.items() if "fd_ref_mean" in r and name != tw.REFERENCE}


def stage2_gap(teacher, fine_tunes: dict[str, dict], size: tw.SizeConfig, device: torch.device) -> dict:
    """How far each fine-tune's samples ({name: tw.sample_fine_tune's whole samples}: samples.pt keeps
    features only) came from stage 2's start (the teacher without guidance) to teacher@50's guided
    samples: by the judge (its FD to teacher@50's samples) and by distill/evaluate.py's gap_closed on
    its latent score (what a user sees on real weights); 1 = at teacher@50's samples, 0 = where it started.
    Without guidance (cfg 1) the start is teacher@50's samples themselves: no gap, so None."""
    from distill.evaluate import gap_closed
    samples = {tw.REFERENCE: tw.sample_at_50(teacher, size, device, guidance=True),
               START: tw.sample_at_50(teacher, size, device, guidance=False), **fine_tunes}
    judged = tw.evaluate(samples, size.world, size.truth_per_class, seed=size.seeded(12345))
    scored = tw.evaluator_metrics(samples)
    start_fd, start_score = judged[START]["fd_ref_mean"], scored[START]["score"]
    guided = size.cfg > 1
    return {"start_to_t50": start_fd, "start_score": start_score,
            **{name: {"to_t50": judged[name]["fd_ref_mean"], "score": scored[name]["score"],
                      "judge_gap_closed": 1.0 - judged[name]["fd_ref_mean"] / start_fd if guided else None,
                      "evaluator_gap_closed": gap_closed(scored[name]["score"], start_score) if guided else None}
               for name in fine_tunes}}


def redmd(run: Path, out: Path, sets: list[str], dmd: list[str], device: torch.device) -> dict:
    """Train the run's DMD stage again into `out` with the changes; the snapshots' distances."""
    report, size = read_run(run)
    guided = run / "guided.safetensors"
    if not size.guided_steps or not guided.is_file() or not (run / "data").is_dir():
        raise SystemExit(f"{run}: not a guided run that still holds data/ and guided.safetensors")
    size = dataclasses.replace(tw.with_overrides(size, sets), extra_dmd=(*size.extra_dmd, *dmd))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    anchor = run / "pairs" if size.regression_weight else None  # --set regression_weight=W: the run's own pairs
    students = tw.train_student(run / "data", out, size, guided, anchor, guidance="samples")
    train_s = time.perf_counter() - t0
    load = lambda path: tw.load_model(path, size.num_layers, device)
    samples = tw.sample_all(load(run_teacher(run, report)), {f"DMD step {step}": load(path) for step, path in students.items()}, size,
                            device, guided=load(guided))
    result = {"run": str(run), "set": sets, "dmd": dmd, "train_s": train_s, "distances": distances(samples, size)}
    (out / "redmd.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def refine_tune(run: Path, out: Path, sets: list[str], flow: list[str], device: torch.device) -> dict:
    """Stage 2 alone: the run's guided fine-tune trained again into `out` with the changes (new pairs
    too where `pairs` changes), its own 50-step samples measured against teacher@50's (same and other
    noise) and against the run's own fine-tune's. Stage 2 bounds where DMD can go (session 16)."""
    report, size = read_run(run)
    if not size.guided_steps or not (run / "pairs").is_dir() or not (run / "samples.pt").is_file():
        raise SystemExit(f"{run}: not a guided run that still holds data/, pairs/ and samples.pt")
    size = dataclasses.replace(tw.with_overrides(size, sets), extra_flow=(*size.extra_flow, *flow))
    out.mkdir(parents=True, exist_ok=True)
    teacher = run_teacher(run, report)
    t0 = time.perf_counter()
    pairs = run / "pairs" if size.pairs == report["config"]["pairs"] else tw.make_pairs(run / "data", out, size, teacher)
    guided = tw.guided_finetune(run / "data", pairs, out, size, teacher)
    train_s = time.perf_counter() - t0
    saved = torch.load(run / "samples.pt", weights_only=False)
    samples = {name: saved[name] for name in (tw.REFERENCE, tw.REFERENCE_FLOOR, FINE_TUNE)}
    load = lambda path: tw.load_model(path, size.num_layers, device)
    changed = samples[f"{FINE_TUNE}, changed"] = tw.sample_fine_tune(load(guided), size, device)
    original = tw.sample_fine_tune(load(run / "guided.safetensors"), size, device)
    result = {"run": str(run), "set": sets, "flow": flow, "train_s": train_s, "distances": distances(samples, size),
              "stage2": stage2_gap(load(teacher), {FINE_TUNE: original, f"{FINE_TUNE}, changed": changed}, size, device)}
    (out / "refine_tune.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def measure(run: Path, out: Path, device: torch.device) -> dict:
    """The run's own saved samples (samples.pt), measured the four ways, and stage 2's gap closed
    (the teacher sampled again without guidance), into OUT/measure.json."""
    report, size = read_run(run)
    saved = run / "samples.pt"
    if not saved.is_file():
        raise SystemExit(f"{run}: no samples.pt (the samples a bench/toyworld.py run saves)")
    samples = torch.load(saved, weights_only=False)
    if FINE_TUNE not in samples:
        raise SystemExit(f"{saved}: no {FINE_TUNE} samples: not a guided run (guided_steps > 0)")
    load = lambda path: tw.load_model(path, size.num_layers, device)
    result = {"run": str(run), "distances": distances(samples, size),
              "fd_to_truth_terms": tw.fd_to_truth_terms(samples, size.world, size.truth_per_class, seed=size.seeded(12345)),
              "stage2": stage2_gap(load(run_teacher(run, report)),
                                  {FINE_TUNE: tw.sample_fine_tune(load(run / "guided.safetensors"), size, device)}, size, device)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "measure.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="bench/toyworld.py size fields")
    parser.add_argument("--dmd", nargs="*", default=[], metavar="KEY=VALUE", help="trainer overrides after the recipe's")
    parser.add_argument("--measure", action="store_true", help="no training: measure the run's own saved samples")
    parser.add_argument("--fine-tune", action="store_true", help="stage 2 alone: the guided fine-tune again, no DMD")
    parser.add_argument("--flow", nargs="*", default=[], metavar="KEY=VALUE", help="fine-tune overrides after the recipe's")
    args = parser.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.measure and (args.set or args.dmd or args.flow or args.fine_tune):
        parser.error("--measure trains nothing: --set, --dmd, --flow and --fine-tune do not apply")
    if args.fine_tune and args.dmd or args.flow and not args.fine_tune:
        parser.error("--dmd changes the DMD stage, --flow the fine-tune (--fine-tune)")
    if args.measure:
        result = measure(args.run, args.out, device)
    elif args.fine_tune:
        result = refine_tune(args.run, args.out, args.set, args.flow, device)
    else:
        result = redmd(args.run, args.out, args.set, args.dmd, device)
    print(" " * 28 + " ".join(f"{k:>11s}" for k in KEEP))
    for name, d in result["distances"].items():
        print(f"{name:28s}" + " ".join(f"{d[k]:11.3f}" for k in KEEP))
    for name, split in result.get("fd_to_truth_terms", {}).items():
        top = sorted(split["mean_terms"].items(), key=lambda kv: -kv[1])[:3]
        print(f"FD to the truth, {name}: mean {sum(split['mean_terms'].values()):.3f} (" + ", ".join(f"{k} {v:.3f}" for k, v in top)
              + f") + covariance {split['covariance_term']:.3f}")
    for name, gap in result.get("stage2", {}).items():
        if isinstance(gap, dict) and gap["judge_gap_closed"] is None:
            print(f"stage 2, {name}: no gap to close at CFG 1 (its start is teacher@50's samples)")
        elif isinstance(gap, dict):
            print(f"stage 2, {name}: gap closed {gap['judge_gap_closed']:.2f} by the judge, "
                  f"{gap['evaluator_gap_closed']:.2f} by distill/evaluate.py's score")
    return 0


if __name__ == "__main__":
    sys.exit(main())
