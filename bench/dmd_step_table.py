"""Joins bench/dmd_step.py results with the three-engine probe measured on the same machine:
rows with the step times, their ratios to the probe's TFLOP/s at the same video tokens and to the
same blocks without DeepSpeed (`--reference`), as JSON, and a markdown table.

    python bench/dmd_step_table.py --runs issue19=new.json main=base.json --probes probe_*.jsonl \\
        --out bench/results/dmd_step_1xh100_issue19.json

A run may also be given as the log of its stdout (the rows it printed before it stopped).
A run without its own reference (e.g. the code before the change, timed without --reference on
the same machine) takes the reference of the first run that has one, or of `--references` logs:
the plain blocks are the same code in both.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_probes(paths) -> dict[int, dict]:
    """video tokens -> the probe's printed JSON line ({"N", "gen": {...}, "critic": {...}})."""
    out = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith("{") and '"gen"' in line:
                row = json.loads(line)
                out[row["N"]] = row
    return out


def load_run(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    rows = [row for row in (json.loads(line) for line in text.splitlines() if line.startswith("{"))
            if "generator_s" in row]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return {key: rows[0].get(key) for key in ("world", "device", "layers")} | {"rows": rows}


def logged_references(paths) -> dict[tuple[str, int], tuple[float, float]]:
    """(grid, batch) -> plain generator / critic step s, from the `{"plain_reference": ...}` lines
    that bench/dmd_step.py --reference prints (a run stopped early still printed them)."""
    out = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith('{"plain_reference"'):
                r = json.loads(line)
                f, fb = r["forward_s"], r["forward_backward_ckpt_s"]
                out[r["plain_reference"], r.get("batch_per_gpu", 1)] = (3 * f + fb, f + fb)
    return out


def references(runs: dict[str, dict], logged: dict | None = None) -> dict[tuple[str, int], tuple[float, float]]:
    out = dict(logged or {})
    for result in runs.values():
        for r in result["rows"]:
            if "plain_generator_s" in r:
                out.setdefault((r["grid"], r["batch_per_gpu"]), (r["plain_generator_s"], r["plain_critic_s"]))
    return out


def table_rows(runs: dict[str, dict], probes: dict[int, dict], logged: dict | None = None) -> list[dict]:
    plain = references(runs, logged)
    rows = []
    for code, result in runs.items():
        for r in result["rows"]:
            probe = probes.get(r["video_tokens"])
            ref = plain.get((r["grid"], r["batch_per_gpu"]))
            rows.append({
                "code": code, "world": r.get("world", result["world"]), "device": r.get("device", result["device"]),
                "layers": r.get("layers", result["layers"]), "grid": r["grid"], "batch_per_gpu": r["batch_per_gpu"],
                "generator_s": r["generator_s"], "critic_s": r["critic_s"],
                "generator_tflops_per_gpu": r["generator_tflops_per_gpu"], "critic_tflops_per_gpu": r["critic_tflops_per_gpu"],
                "generator_ratio_to_probe": r["generator_tflops_per_gpu"] / probe["gen"]["tflops_per_gpu"] if probe else None,
                "critic_ratio_to_probe": r["critic_tflops_per_gpu"] / probe["critic"]["tflops_per_gpu"] if probe else None,
                "generator_ratio_to_reference": ref[0] / r["generator_s"] if ref else None,
                "critic_ratio_to_reference": ref[1] / r["critic_s"] if ref else None,
                "plain_generator_s": ref[0] if ref else None, "plain_critic_s": ref[1] if ref else None,
                "optimizer_step_s": {k: v for k, v in r.get("breakdown_s", {}).items() if "optimizer" in k},
                "peak_gib": r["peak_gib"],
            })
    return rows


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def markdown(rows: list[dict], probes: dict[int, dict]) -> str:
    lines = ["| code | grid | batch/GPU | generator s (TFLOP/s) | critic s (TFLOP/s) | vs probe gen / critic "
             "| vs reference gen / critic | G / F optimizer step s | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        opt = r["optimizer_step_s"]
        lines.append(
            f"| {r['code']} | {r['grid']} | {r['batch_per_gpu']} | {r['generator_s']:.3f} ({r['generator_tflops_per_gpu']:.0f}) "
            f"| {r['critic_s']:.3f} ({r['critic_tflops_per_gpu']:.0f}) "
            f"| {pct(r['generator_ratio_to_probe'])} / {pct(r['critic_ratio_to_probe'])} "
            f"| {pct(r['generator_ratio_to_reference'])} / {pct(r['critic_ratio_to_reference'])} "
            f"| {opt.get('G optimizer step', float('nan')):.3f} / {opt.get('F optimizer step', float('nan')):.3f} "
            f"| {r['peak_gib']:.1f} |")
    for n, p in sorted(probes.items()):
        lines.append(f"\nProbe L={p['L']} N={n}: generator {p['gen']['s']} s ({p['gen']['tflops_per_gpu']} TFLOP/s), "
                     f"critic {p['critic']['s']} s ({p['critic']['tflops_per_gpu']} TFLOP/s).")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="LABEL=dmd_step.json, in table order")
    parser.add_argument("--probes", nargs="+", default=[])
    parser.add_argument("--references", nargs="+", default=[], help="logs with dmd_step --reference lines")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = {label: load_run(Path(path)) for label, path in (a.split("=", 1) for a in args.runs)}
    probes = load_probes(args.probes)
    rows = table_rows(runs, probes, logged_references(args.references))
    Path(args.out).write_text(json.dumps({"probes": probes, "rows": rows}, indent=1))
    print(markdown(rows, probes))


if __name__ == "__main__":
    main()
