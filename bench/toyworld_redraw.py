"""A finished toy-world run's samplers again from other starting noise: how far its verdicts move
between draws, i.e. what difference the run's numbers can resolve at all.

    python bench/toyworld_redraw.py RUN [RUN ...] --draws 2 [--out redraw.json]

RUN is a bench/toyworld.py output folder (a sweep's seedS_cfgC) that still holds its exports. Every
sampler of the run (teacher@50, teacher@4, the fine-tune, each student snapshot) is sampled again
from `--draws` other noise seeds and judged against the run's own truth draw; per draw it prints the
drift check's ratio (the last snapshot over the recipe's student, in the setting's distance), the
student's FD to the truth over teacher@50's, and its setting distance over teacher@4's. Draw 0 is the
run's own results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.toyworld import SizeConfig, drift_pair, evaluate, load_model, sample_all, size_from_config, target_key


def ratios(results: dict, cfg: float, recipe_step: int) -> dict[str, float]:
    """The run's verdict ratios from one draw's results."""
    key, student = target_key(cfg), results["student@4"]
    out = {"student / teacher@50 (FD to truth)": student["fd_mean"] / results["teacher@50"]["fd_mean"],
           f"student / teacher@4 ({key})": student[key] / results["teacher@4"][key]}
    if (pair := drift_pair(results, recipe_step)) is not None:
        out[f"drift: {pair[1].split(', ')[1]} / recipe ({key})"] = results[pair[1]][key] / student[key]
    return out


def exported_students(run: Path, recipe_step: int) -> dict[str, Path]:
    """{sampler name as the run wrote it: export} for the recipe's student and every snapshot."""
    students = {"student@4": run / "student.safetensors"}
    for path in sorted(run.glob("student_step*.safetensors")):
        students[f"student@4, DMD step {int(path.stem.removeprefix('student_step'))}"] = path
    missing = [str(p) for p in students.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"{run}: the run's exports are gone ({', '.join(missing)}); nothing to sample again")
    return dict(sorted(students.items(), key=lambda item: recipe_step if item[0] == "student@4"
                       else int(item[0].rsplit(" ", 1)[1])))


def read_run(run: Path) -> tuple[dict, SizeConfig]:
    """The run's results.json and the size it ran with."""
    path = run / "results.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no results.json (not a finished bench/toyworld.py run)")
    report = json.loads(path.read_text())
    return report, size_from_config(report["config"])


def run_teacher(run: Path, report: dict) -> Path:
    """The teacher export the run distilled (its own, or the --teacher it was given)."""
    return run / "teacher.safetensors" if report["teacher"] == "trained by this run" else Path(report["teacher"])


def resample(run: Path, noise_seeds: list[int], device: torch.device) -> list[dict]:
    """Every sampler's metrics per noise seed, against the run's own truth draw (the run's own seed,
    size.seeded(7), gives back its results.json)."""
    report, size = read_run(run)
    teacher = run_teacher(run, report)
    load = lambda path: load_model(path, size.num_layers, device)
    students = {name: load(path) for name, path in exported_students(run, size.dmd_steps).items()}
    guided = load(run / "guided.safetensors") if (run / "guided.safetensors").is_file() else None
    return [evaluate(sample_all(load(teacher), students, size, device, guided=guided, noise_seed=seed),
                     size.world, size.truth_per_class, seed=size.seeded(12345)) for seed in noise_seeds]


def redraw(run: Path, draws: int, device: torch.device) -> dict:
    """Draw 0 (the run's own results) and `draws` more from other noise: the verdict ratios of each, and
    every sampler's setting distance."""
    report, size = read_run(run)
    per_draw = [report["results"], *resample(run, [size.seeded(7) + 100_000 * d for d in range(1, draws + 1)], device)]
    key = target_key(size.cfg)
    return {"run": str(run), "cfg": size.cfg, "seed": size.seed,
            "draws": [ratios(r, size.cfg, size.dmd_steps) for r in per_draw],
            f"{key} per draw": [{name: m[key] for name, m in r.items() if key in m} for r in per_draw]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--draws", type=int, default=2, help="other noise seeds per run (draw 0 is the run's own)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.draws < 1:
        raise SystemExit(f"--draws must be >= 1, got {args.draws}")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    out = []
    for run in args.runs:
        result = redraw(run, args.draws, device)
        out.append(result)
        print(f"{run} (seed {result['seed']}, CFG {result['cfg']:g})")
        for name in result["draws"][0]:
            print(f"  {name}: " + " / ".join(f"{d[name]:.3f}" for d in result["draws"]))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
