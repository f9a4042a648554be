"""How the checkpoint evaluator's rule, and each of its metrics alone, ranks toy-world DMD snapshots
against the toy world's judge: per rule, on how many runs its pick is within 5% of the judge's best
snapshot, and the Spearman of the two rankings (issue 17's check, bench/toyworld_sweep.py's
`evaluator_agreement`, for every metric at once). Meant for choosing a rule on some runs and checking
it on others, never both on the same runs:

    python bench/evaluator_rules.py OUT [OUT ...] [--json rules.json]   # sweep or run directories

Each OUT is searched for the runs' results.json (bench/toyworld.py with dmd_snapshots > 1).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a script: the repo root first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.toyworld import target_key
from bench.toyworld_sweep import evaluator_agreement

# metrics that describe one side only, not a distance between student and teacher
NOT_A_RULE = ("av_sync_student", "av_sync_teacher")
# ratios to the teacher's: 1 is best, so a rule takes |log ratio|
RATIOS = ("diversity_", "channel_std_ratio")
LATEST = "latest snapshot (baseline)"


def snapshot_rows(results_files: list[Path]) -> list[dict]:
    """One row per run: the judge's distance and the evaluator's metrics of every DMD snapshot."""
    rows = []
    for path in results_files:
        report = json.loads(path.read_text())
        key = target_key(report["config"]["cfg"])
        snapshots = {name: r for name, r in report["results"].items() if name.startswith("student@4") and "evaluator" in r}
        rows.append({"run": str(path.parent), "seed": report["config"].get("seed"),
                     "steps": {name: snapshot_step(name, report["config"]["dmd_steps"]) for name in snapshots},
                     "snapshots": {name: r[key] for name, r in snapshots.items()},
                     "metrics": {name: r["evaluator"] for name, r in snapshots.items()}})
    return rows


def snapshot_step(name: str, recipe_steps: int) -> int:
    """"student@4" is the recipe's step; the others are named "student@4, DMD step N"."""
    return recipe_steps if name == "student@4" else int(name.rsplit(" ", 1)[1])


def rule_value(metrics: dict[str, float], rule: str) -> float:
    """Lower is better: the evaluator's own score, a distance as it is, a ratio as |log ratio|."""
    value = metrics[rule]
    return abs(math.log(value)) if rule.startswith(RATIOS) else value


def rule_names(rows: list[dict]) -> list[str]:
    names = next(iter(rows[0]["metrics"].values())).keys()
    return ["score", *sorted(n for n in names if n != "score" and n not in NOT_A_RULE)]


def agreement_per_rule(rows: list[dict]) -> dict[str, dict]:
    ranked_by = lambda value: evaluator_agreement([{**row, "evaluator": {name: value(row, name) for name in row["metrics"]}}
                                                   for row in rows])
    return {**{rule: ranked_by(lambda row, name, rule=rule: rule_value(row["metrics"][name], rule)) for rule in rule_names(rows)},
            LATEST: ranked_by(lambda row, name: -row["steps"][name])}


def markdown(agreement: dict[str, dict]) -> str:
    lines = ["| rule | within 5% of the judge's best | mean Spearman | Spearman per run |", "|---|---:|---:|---|"]
    for rule, a in agreement.items():
        runs = a["runs"]
        lines.append(f"| {rule} | {sum(r['within_5pct'] for r in runs)} of {len(runs)} | {a['mean_spearman']:.2f} | "
                     + " ".join(f"{r['spearman']:.2f}" for r in runs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the agreement per rule here")
    args = parser.parse_args(argv)
    files = sorted(f for d in args.dirs for f in ([d / "results.json"] if (d / "results.json").is_file() else d.glob("*/results.json")))
    rows = [row for row in snapshot_rows(files) if len(row["snapshots"]) > 1]
    if not rows:
        print(f"no run with DMD snapshots under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    agreement = agreement_per_rule(rows)
    print("runs: " + ", ".join(row["run"] for row in rows))
    print(markdown(agreement))
    if args.json:
        args.json.write_text(json.dumps({"runs": [row["run"] for row in rows], "rules": agreement}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
