"""The toy world over seeds and guidance scales, several runs per GPU at once, in one table:

    python bench/toyworld_sweep.py --size gpu --seeds 11 12 13 --cfgs 1 2 3 --parallel 9 --out /tmp/sweep \\
        [--drift-factor 2] [--set FIELD=VALUE ...]

One teacher per seed (bench/toyworld.py --teacher-only), then one DMD run per (seed, CFG) from that
teacher (--teacher), each a bench/toyworld.py process; at most --parallel at a time, spread over the
visible GPUs. The guidance scale changes DMD's teacher and the samplers', not the teacher's training,
so the seeds' teachers are shared by every CFG. With --drift-factor 2 each run trains twice the
recipe's DMD steps and the table shows whether the student holds.

Per CFG it prints each seed and the issue-16 bar over the seeds (`verdict`): without guidance, the
mean student FD to the truth <= 1.1x teacher@50's (worst seed <= 1.25x), below teacher@4 on every
seed and <= 0.8x it in the mean; with guidance, the FD to teacher@50's samples <= 0.5x teacher@4's
in the mean and below it on every seed, and the FD to the truth <= 1.1x teacher@50's in the mean;
in every setting each run's own `criteria` (modes, A/V onset, diversity, drift), and the judge's own
spread (a second teacher@50 draw against the same truth); with guidance also DMD's target (the
fine-tune's own 50-step samples) on the same bar. Writes
OUT/sweep.json and OUT/sweep.md (`--table-only`: from the runs already in OUT, training nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOYWORLD = REPO / "bench" / "toyworld.py"


def run_all(jobs: list[tuple[list[str], Path]], parallel: int, gpus: list[str]) -> list[int]:
    """Run `toyworld.py ARGS` for every job (args, log), at most `parallel` at a time; returns the exit codes."""
    pending, running, codes = list(enumerate(jobs)), {}, [None] * len(jobs)
    while pending or running:
        while pending and len(running) < parallel:
            i, (args, log) = pending.pop(0)
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log, "w")
            running[i] = (subprocess.Popen([sys.executable, str(TOYWORLD), *args], cwd=REPO, env=env, stdout=handle,
                                           stderr=subprocess.STDOUT), handle)
        for i, (proc, handle) in list(running.items()):
            if proc.poll() is not None:
                handle.close()
                codes[i] = proc.returncode
                del running[i]
        time.sleep(2)
    return codes


def visible_gpus() -> list[str]:
    import torch
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]


def run_dir(out: Path, seed: int, cfg: float) -> Path:
    return out / f"seed{seed}_cfg{cfg:g}"


def teacher_file(out: Path, seed: int) -> Path:
    return out / f"seed{seed}_teacher" / "teacher.safetensors"


def train_teachers(size: str, seeds: list[int], out: Path, parallel: int, sets: list[str]) -> float:
    """One teacher per seed (a teacher already in OUT is kept); returns the seconds it took."""
    gpus = visible_gpus()
    todo = [s for s in seeds if not teacher_file(out, s).is_file()]
    jobs = [(["--seed", str(s), "--teacher-only", "--out", str(out / f"seed{s}_teacher"), "--size", size, "--set", *sets],
             out / f"seed{s}_teacher.log") for s in todo]
    t0 = time.time()
    codes = run_all(jobs, parallel, gpus)
    failed = [todo[i] for i, code in enumerate(codes) if code != 0]
    if failed:
        raise SystemExit(f"teacher training failed for seed(s) {failed}: see {out}/seed*_teacher.log")
    return time.time() - t0


def sweep(size: str, seeds: list[int], cfgs: list[float], out: Path, parallel: int, sets: list[str],
          drift_factor: int) -> dict:
    gpus = visible_gpus()
    common = ["--size", size, "--set", f"drift_factor={drift_factor}", *sets]  # --set takes the rest
    t0 = time.time()
    teacher_s = train_teachers(size, seeds, out, parallel, sets)
    runs = [(s, c) for c in cfgs for s in seeds]
    jobs = [(["--seed", str(s), "--teacher", str(teacher_file(out, s)),
              "--out", str(run_dir(out, s, c)), *common, f"cfg={c}"],
             run_dir(out, s, c).with_suffix(".log")) for s, c in runs]
    codes = run_all(jobs, parallel, gpus)
    reports = read_reports(out, seeds, cfgs)
    reports.update({run: None for run, code in zip(runs, codes) if code != 0})
    summary = summarise(reports, seeds, cfgs)
    summary["timings"] = {"teachers_s": teacher_s, "dmd_s": time.time() - t0 - teacher_s, "parallel": parallel,
                          "gpus": gpus}
    return summary


def read_reports(out: Path, seeds: list[int], cfgs: list[float]) -> dict:
    """{(seed, cfg): the run's results.json, or None where the run left none}."""
    path = lambda s, c: run_dir(out, s, c) / "results.json"
    return {(s, c): json.loads(path(s, c).read_text()) if path(s, c).is_file() else None for c in cfgs for s in seeds}


def _ratio_of_means(a: list[float], b: list[float]) -> float:
    return float(np.mean(a) / np.mean(b))


def summarise(reports: dict, seeds: list[int], cfgs: list[float]) -> dict:
    """Per CFG: one row per seed and the bar over the seeds (see the module docstring)."""
    from bench.toyworld import REFERENCE, target_key
    out = {"settings": {}}
    for c in cfgs:
        rows, missing = [], []
        for s in seeds:
            report = reports.get((s, c))
            if report is None:
                missing.append(s)
                continue
            r = report["results"]
            recipe = report["config"]["dmd_steps"]
            students = sorted((name for name in r if name.startswith("student@4")), key=lambda n: _step_of(n, recipe))
            snapshots = {name: r[name][target_key(c)] for name in students}
            evaluator = {name: r[name]["evaluator"]["score"] for name in students if "evaluator" in r[name]}
            rows.append({"seed": s, "teacher@50": r[REFERENCE]["fd_mean"], "teacher@4": r["teacher@4"]["fd_mean"],
                         # the judge's own spread: teacher@50 again, from other noise, against the same truth
                         "teacher@50 again": r["teacher@50 (2nd draw)"]["fd_mean"],
                         "student": r["student@4"]["fd_mean"],
                         "teacher@4 to t50": r["teacher@4"]["fd_ref_mean"], "student to t50": r["student@4"]["fd_ref_mean"],
                         "t50 floor": r["teacher@50 (2nd draw)"]["fd_ref_mean"],
                         "undistilled to t50": r["undistilled@4"]["fd_ref_mean"],
                         # where DMD starts: the fine-tuned model at 4 steps with guided_steps, else the teacher's
                         "init to t50": r.get("undistilled guided@4", r["undistilled@4"])["fd_ref_mean"],
                         "guided@50 to t50": r["guided@50"]["fd_ref_mean"] if "guided@50" in r else None,
                         "guided@50 onset": r["guided@50"]["onset_agreement"] if "guided@50" in r else None,
                         "onset": {name: r[name]["onset_agreement"] for name in ONSET_SAMPLERS},
                         "snapshots": snapshots, "evaluator": evaluator, "run_criteria_ok": all(v["ok"] for v in report["criteria"].values()),
                         "failed_criteria": [k for k, v in report["criteria"].items() if not v["ok"]]})
        out["settings"][f"{c:g}"] = {"rows": rows, "missing_seeds": missing, "verdict": verdict(rows, c) if rows else {},
                                     "judge_spread": judge_spread(rows), "evaluator": evaluator_agreement(rows),
                                     "target": target_bound(rows, c)}
    return out


def target_bound(rows: list[dict], cfg: float) -> dict | None:
    """With guidance, DMD's target is the fine-tune's own samples (guided@50): the guided bar as a student
    exactly at its target would score it, and the target's onset agreement. A student can beat its target
    only through the regression term, so where this misses, stage 2 is what to improve."""
    if cfg == 1 or not rows or any(row["guided@50 to t50"] is None for row in rows):
        return None
    col = lambda key: [row[key] for row in rows]
    return {"mean_ratio": _ratio_of_means(col("guided@50 to t50"), col("teacher@4 to t50")),
            "below_teacher4": sum(row["guided@50 to t50"] < row["teacher@4 to t50"] for row in rows),
            "onset": {row["seed"]: row["guided@50 onset"] for row in rows}}


# A/V onset agreement of the recipe's student beside teacher@50's, and a second teacher@50 draw's: how
# far the onset check's statistic moves between two draws of the same sampler
ONSET_SAMPLERS = ("student@4", "teacher@50", "teacher@50 (2nd draw)")


def _step_of(name: str, recipe_step: int) -> int:
    """'student@4, DMD step 600' -> 600; 'student@4' (the recipe's student) -> the recipe's step."""
    return int(name.rsplit(" ", 1)[1]) if name.startswith("student@4, DMD step ") else recipe_step


def _ranks(x: list[float]) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        ranks[x == value] = ranks[x == value].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation; nan when either side has no spread (all tied)."""
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 and ra.std() > 0 and rb.std() > 0 else float("nan")


def evaluator_agreement(rows: list[dict]) -> dict:
    """Issue 17's check on each run: the snapshot distill/eval_metrics.py ranks best (it never sees the
    truth) against the judge's best (the setting's FD); within 5% and the Spearman of the two rankings."""
    out = []
    for row in rows:
        names = [n for n in row["snapshots"] if n in row["evaluator"]]
        if len(names) < 2:
            continue
        judge = [row["snapshots"][n] for n in names]
        picked = names[int(np.argmin([row["evaluator"][n] for n in names]))]
        out.append({"seed": row["seed"], "picked": picked, "picked_fd": row["snapshots"][picked], "best_fd": min(judge),
                    "within_5pct": bool(row["snapshots"][picked] <= 1.05 * min(judge)),
                    "spearman": spearman([row["evaluator"][n] for n in names], judge)})
    return {"runs": out, "all_within_5pct": all(r["within_5pct"] for r in out),
            "mean_spearman": float(np.nanmean([r["spearman"] for r in out])) if out else float("nan")}


def judge_spread(rows: list[dict]) -> dict:
    """How far the bars' own yardstick moves: a second teacher@50 draw's FD to the truth over the first's
    (per seed, and the mean as the CFG 1 bar computes it). A student/teacher@50 ratio is only resolved
    beyond this."""
    ratios = [row["teacher@50 again"] / row["teacher@50"] for row in rows]
    return {"per_seed": ratios, "largest_change": max((abs(r - 1) for r in ratios), default=float("nan")),
            "mean_ratio": _ratio_of_means([row["teacher@50 again"] for row in rows], [row["teacher@50"] for row in rows])
            if rows else float("nan")}


def verdict(rows: list[dict], cfg: float) -> dict[str, dict]:
    col = lambda key: [row[key] for row in rows]
    checks = {}
    if cfg == 1:
        checks["mean FD: student / teacher@50 <= 1.1"] = (_ratio_of_means(col("student"), col("teacher@50")), 1.1)
        checks["worst seed FD: student / teacher@50 <= 1.25"] = (max(r["student"] / r["teacher@50"] for r in rows), 1.25)
        checks["mean FD: student / teacher@4 <= 0.8"] = (_ratio_of_means(col("student"), col("teacher@4")), 0.8)
        checks["worst seed FD: student / teacher@4 < 1"] = (max(r["student"] / r["teacher@4"] for r in rows), 1.0)
    else:
        checks["mean FD to t50: student / teacher@4 <= 0.5"] = (_ratio_of_means(col("student to t50"),
                                                                               col("teacher@4 to t50")), 0.5)
        checks["worst seed FD to t50: student / teacher@4 < 1"] = (max(r["student to t50"] / r["teacher@4 to t50"]
                                                                       for r in rows), 1.0)
        checks["mean FD to truth: student / teacher@50 <= 1.1"] = (_ratio_of_means(col("student"), col("teacher@50")), 1.1)
    checks["every run's own criteria (modes, onset, diversity, drift)"] = (float(sum(not r["run_criteria_ok"] for r in rows)), 0.0)
    strict = lambda name: name.endswith("< 1")
    return {name: {"value": v, "bound": b, "ok": bool(v < b if strict(name) else v <= b)} for name, (v, b) in checks.items()}


def markdown(summary: dict) -> str:
    lines = []
    for c, setting in summary["settings"].items():
        lines += [f"### CFG {c}{' (no guidance: judged against the truth)' if c == '1' else ' + SLG (judged against teacher@50)'}",
                  "", "| seed | teacher@50 | t50 again | teacher@4 | student | t@4 → t50 | init → t50 | student → t50 | t50 floor | guided@50 → t50 | student along DMD | onset: student / t50 / t50 again | own criteria |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for row in setting["rows"]:
            along = " / ".join(f"{v:.3f}" for v in row["snapshots"].values())
            onset = " / ".join(f"{row['onset'][name]:.2f}" for name in ONSET_SAMPLERS)
            own = "pass" if row["run_criteria_ok"] else "fail: " + ", ".join(row["failed_criteria"])
            lines.append(f"| {row['seed']} | {row['teacher@50']:.3f} | {row['teacher@50 again']:.3f} | {row['teacher@4']:.3f} | {row['student']:.3f} | "
                         f"{row['teacher@4 to t50']:.3f} | {row['init to t50']:.3f} | {row['student to t50']:.3f} | {row['t50 floor']:.3f} | "
                         f"{'-' if row['guided@50 to t50'] is None else format(row['guided@50 to t50'], '.3f')} | {along} | {onset} | {own} |")
        if setting["missing_seeds"]:
            lines.append(f"\nruns that failed (no results): seeds {setting['missing_seeds']}")
        lines.append("")
        for name, check in setting["verdict"].items():
            lines.append(f"- {'PASS' if check['ok'] else 'FAIL'} {name}: {check['value']:.3f}")
        if setting["rows"]:
            spread = setting["judge_spread"]
            lines.append(f"- the judge's spread: a second teacher@50 draw's FD to the truth is {spread['mean_ratio']:.3f}x "
                         f"the first's in the mean, up to {spread['largest_change']:.1%} off on one seed")
        if setting.get("target"):
            target = setting["target"]
            onsets = ", ".join(f"{v:.2f}" for v in target["onset"].values())
            lines.append(f"- DMD's target (guided@50) on the same bar: {target['mean_ratio']:.3f} in the mean, below teacher@4 on "
                         f"{target['below_teacher4']} of {len(setting['rows'])} seeds; its onset agreement {onsets}")
        agreement = setting["evaluator"]
        for run in agreement["runs"]:
            lines.append(f"- evaluator (seed {run['seed']}): picks {run['picked']} at FD {run['picked_fd']:.3f}, "
                         f"the judge's best {run['best_fd']:.3f} ({'within' if run['within_5pct'] else 'NOT within'} 5%), "
                         f"Spearman {run['spearman']:.2f}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="gpu")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--cfgs", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--parallel", type=int, default=3, help="runs at a time (spread over the visible GPUs)")
    parser.add_argument("--drift-factor", type=int, default=2, help="train this many times the recipe's DMD steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teachers-only", action="store_true",
                        help="train the seeds' teachers and stop (a later sweep into OUT reuses them)")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: the table of the runs already in OUT (e.g. after a change to the table)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.teachers_only:
        seconds = train_teachers(args.size, args.seeds, args.out, args.parallel, args.set)
        print(f"teachers of seeds {args.seeds} in {args.out} ({seconds:.0f} s)")
        return 0
    if args.table_only:
        summary = summarise(read_reports(args.out, args.seeds, args.cfgs), args.seeds, args.cfgs)
        if (earlier := args.out / "sweep.json").is_file():   # the training run's timings stay
            summary["timings"] = json.loads(earlier.read_text()).get("timings")
    else:
        summary = sweep(args.size, args.seeds, args.cfgs, args.out, args.parallel, args.set, args.drift_factor)
    table = markdown(summary)
    (args.out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "sweep.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
