"""Export the student as one safetensors file with Ovi's own key names (bf16), a drop-in for
Ovi's `model.safetensors` and for `OviFusion`:

    python distill/export.py --checkpoint RUN_DIR --out student.safetensors [--raw] [--step N | --step best]

By default the EMA weights (fp32 shards saved by every rank) are stitched back together;
`--raw` takes the generator's fp32 master weights from its DeepSpeed checkpoint instead.
`--step best` takes the checkpoint distill/evaluate.py chose (RUN_DIR/eval/best.json).
Runs offline on one CPU process; needs only the checkpoint directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from distill import checkpoint
from distill.dmd import PAIR_GUIDANCE
from distill.eval_store import best_step
from distill.models import OviFusion, variant_config
from distill.models.loading import check_header, expected_entries, read_header, save_ovi_checkpoint


def find_step(run_or_step: Path, step: int | None) -> Path:
    run_or_step = Path(run_or_step)
    if (run_or_step / "COMPLETE").exists():
        return run_or_step
    if step is not None:
        path = checkpoint.step_dir(run_or_step, step)
        if not (path / "COMPLETE").exists():
            raise FileNotFoundError(f"{path}: no complete checkpoint at step {step}")
        return path
    path = checkpoint.latest(run_or_step)
    if path is None:
        raise FileNotFoundError(f"{run_or_step}: no complete checkpoint (looked for checkpoints/*/COMPLETE)")
    return path


def ema_state(step_path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 tensors from the per-rank EMA shards: ZeRO-3 partitions are contiguous slices
    of the flattened parameter in rank order, padded at the end of the last one."""
    files = sorted((step_path / "ema").glob("rank-*.pt"))
    if not files:
        raise FileNotFoundError(f"{step_path / 'ema'}: no EMA shards (was ema.enabled false? use --raw)")
    ranks = [torch.load(f, weights_only=False) for f in files]
    world = ranks[0]["world"]
    if len(ranks) != world or [r["rank"] for r in ranks] != list(range(world)):
        raise ValueError(f"{step_path / 'ema'}: expected shards of ranks 0..{world - 1}, found {len(ranks)} files")
    state = {}
    for i, name in enumerate(ranks[0]["names"]):
        flat = torch.cat([r["shards"][i].reshape(-1) for r in ranks])
        state[name] = flat[: ranks[0]["numel"][i]].view(ranks[0]["shape"][i])
    return state


def raw_state(step_path: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(step_path / "generator"), tag=checkpoint.ENGINE_TAG)


GUIDED_SAMPLES = "guided_samples"  # metadata of a guided fine-tune's export: the guidance of its pairs


def guided_samples_of(path: str | Path) -> dict | None:
    """The guidance of the pairs a checkpoint was fine-tuned on (a guided fine-tune's export), else
    None (the official checkpoints, a DMD student, plain flow training). Reads the header only."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[GUIDED_SAMPLES]) if GUIDED_SAMPLES in meta else None


def export(run_or_step: Path, out: Path, raw: bool = False, step: int | None = None) -> Path:
    step_path = find_step(run_or_step, step)
    config = json.loads((step_path / "trainer.json").read_text())["config"]
    state = raw_state(step_path) if raw else ema_state(step_path)
    with torch.device("meta"):
        model = OviFusion(variant_config(config["model"]["variant"], config["model"].get("num_layers")))
    dmd = config.get("dmd", {})
    meta = {"source": str(step_path), "weights": "raw" if raw else "ema", "variant": config["model"]["variant"],
            "format": "ovi-fusion",  # and the sampler the student was trained for, read back by distill/sample.py
            **({"student_sigmas": json.dumps(list(dmd["student_sigmas"]))} if dmd.get("student_sigmas") else {}),
            **({"renoise": dmd["renoise"]} if dmd.get("renoise") else {})}
    if config.get("objective") == "flow" and config.get("data", {}).get("pairs"):
        meta[GUIDED_SAMPLES] = json.dumps({k: dmd.get(k) for k in PAIR_GUIDANCE})  # checked by the trainer
    path = save_ovi_checkpoint(state, out, dtype=torch.bfloat16, metadata=meta)
    check_header(path, read_header(path), expected_entries(model))  # the exact official key set and shapes
    return path


def parse_step(run: Path, step: str | None) -> int | None:
    if step is None:
        return None
    if step == "best":
        return best_step(run)
    try:
        return int(step)
    except ValueError:
        raise ValueError(f"--step {step!r}: expected a step number or 'best'") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory (uses checkpoints/latest) or a step-N directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--raw", action="store_true", help="export the raw generator instead of its EMA")
    parser.add_argument("--step", help="a training step, or 'best' (the evaluator's choice in RUN_DIR/eval/best.json)")
    args = parser.parse_args(argv)
    try:
        step = parse_step(Path(args.checkpoint), args.step)
        path = export(Path(args.checkpoint), Path(args.out), args.raw, step)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
