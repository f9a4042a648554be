"""RUN/eval/: what distill/evaluate.py writes, and how it (and export --step best) reads it back.

    RUN/eval/reference/   reference.json (what made it: clips, teacher, sampler; its id),
                          latents.safetensors (video [N,C,F,H,W], audio [N,L,A] float32, clip order),
                          NNN_S.mp4 and contact_sheet.png of the decoded reference; for a guided
                          fine-tune's run also start_latents.safetensors (its start: the same
                          teacher, noise and steps without guidance)
    RUN/eval/step-N/      NNN_S.mp4, contact_sheet.png, latents.safetensors (the student's),
                          metrics.json, written last: a step is done when it holds the current
                          reference's id (a remade reference makes every step due again)
    RUN/eval/metrics.jsonl  one row per evaluation, in order (distill/metrics.py's log)
    RUN/eval/best.json    the best step by BEST_RULE, the ranking, the reference id

The best checkpoint also gets a KEEP file in RUN/checkpoints/step-N/ (distill/checkpoint.py's
prune leaves such a checkpoint), so that `export.py --step best` still finds it after the trainer
has moved on; the KEEP file of a former best is removed, and the trainer prunes it as usual.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distill import checkpoint
from precompute.fileio import atomic_write

EVAL_DIR = "eval"
REFERENCE_DIR = "reference"
REFERENCE_FILE = "reference.json"
LATENTS_FILE = "latents.safetensors"
START_LATENTS_FILE = "start_latents.safetensors"   # a guided fine-tune's evaluation: its start, unguided
METRICS_FILE = "metrics.json"
BEST_FILE = "best.json"
CONTACT_SHEET = "contact_sheet.png"
BEST_RULE = ("lowest score (distill/eval_metrics.py: distance of the checkpoint's samples to the cached 50-step "
             "teacher reference, lower is closer) among the checkpoints evaluated against the current reference; "
             "ties go to the earlier step")


def eval_root(run: Path) -> Path:
    return Path(run) / EVAL_DIR


def step_eval_dir(run: Path, step: int) -> Path:
    return eval_root(run) / f"step-{step:06d}"


def reference_dir(run: Path) -> Path:
    return eval_root(run) / REFERENCE_DIR


def step_number(step_dir: Path) -> int:
    """RUN/checkpoints/step-000300 -> 300."""
    return int(Path(step_dir).name.removeprefix("step-"))


def spec_id(spec: dict) -> str:
    """A short stable id of what made a reference (its canonical JSON's sha256)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------- latents

def save_latents(path: Path, names: list[str], latents: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Clips stacked in `names` order (every clip of a set has one latent shape)."""
    video = torch.stack([latents[n][0].float().cpu() for n in names]).contiguous()
    audio = torch.stack([latents[n][1].float().cpu() for n in names]).contiguous()
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"video": video, "audio": audio}, str(partial), metadata={"names": json.dumps(names)})
    partial.replace(path)


def load_latents(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(path))
    return tensors["video"], tensors["audio"]


# --------------------------------------------------------------------------------------- reference

def read_reference_spec(run: Path) -> dict | None:
    """The cached reference's record (None when there is none, or its latents are missing)."""
    folder = reference_dir(run)
    if not (folder / REFERENCE_FILE).is_file() or not (folder / LATENTS_FILE).is_file():
        return None
    return json.loads((folder / REFERENCE_FILE).read_text())


def write_reference(run: Path, spec: dict, names: list[str], latents: dict, extra: dict) -> str:
    """Latents first, the record last (the record is what says a reference exists). Returns its id."""
    folder = reference_dir(run)
    save_latents(folder / LATENTS_FILE, names, latents)
    reference_id = spec_id(spec)
    atomic_write(folder / REFERENCE_FILE, json.dumps({"id": reference_id, "spec": spec, **extra}, indent=1))
    return reference_id


# --------------------------------------------------------------------------------------- steps

def write_step_result(run: Path, step: int, result: dict) -> None:
    atomic_write(step_eval_dir(run, step) / METRICS_FILE, json.dumps(result, indent=1))


def step_results(run: Path) -> dict[int, dict]:
    """Every finished step evaluation on disk: step -> its metrics.json."""
    out = {}
    for path in sorted(eval_root(run).glob(f"step-*/{METRICS_FILE}")):
        out[step_number(path.parent)] = json.loads(path.read_text())
    return out


def done_steps(run: Path, reference_id: str) -> set[int]:
    return {step for step, r in step_results(run).items() if r.get("reference_id") == reference_id}


# --------------------------------------------------------------------------------------- best

def choose_best(scores: dict[int, float]) -> int | None:
    """BEST_RULE on step -> score: the lowest score, the earlier step on a tie."""
    if not scores:
        return None
    return min(scores, key=lambda step: (scores[step], step))


def update_best(run: Path, reference_id: str) -> dict | None:
    """Rewrite best.json from every step evaluated against `reference_id` and move the KEEP mark."""
    scores = {step: r["metrics"]["score"] for step, r in step_results(run).items() if r.get("reference_id") == reference_id}
    best = choose_best(scores)
    if best is None:
        return None
    record = {"step": best, "score": scores[best], "checkpoint": str(checkpoint.step_dir(run, best)),
              "rule": BEST_RULE, "reference_id": reference_id,
              "ranking": [{"step": s, "score": scores[s]} for s in sorted(scores, key=lambda s: (scores[s], s))]}
    atomic_write(eval_root(run) / BEST_FILE, json.dumps(record, indent=1))
    mark_keep(run, best)
    return record


def mark_keep(run: Path, step: int) -> None:
    for path in (Path(run) / "checkpoints").glob("step-*"):
        keep = path / checkpoint.KEEP_FILE
        if step_number(path) == step:
            if (path / "COMPLETE").exists():
                keep.touch()
        elif keep.exists():
            keep.unlink(missing_ok=True)


def best_step(run: Path) -> int:
    """The step best.json names (export.py --step best); FileNotFoundError when none was chosen yet."""
    path = eval_root(run) / BEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no best checkpoint yet (run distill/evaluate.py on {run} first)")
    return int(json.loads(path.read_text())["step"])
