"""Fault injection on the real pipeline (issue 18): 2 CPU ranks, the real DeepSpeed launcher, the
tiny recipe on mixed-aspect shards (one clip is the portrait 96x32 bucket that used to give NaN).
Every case is compared with one uninterrupted reference run, and every random choice comes from
FAULT_SEED, so a failure reproduces with the same command.

Faults are injected with OVI_DMD_FAULT (precompute/faults.py): the process SIGKILLs itself at a
named point and step, or pauses there while the test changes files under it.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clips import make_mixed_aspect_manifest, make_tiny_manifest
from distill import checkpoint
from bench.launching import pythonpath_with
from launcher import REPO, Background, run_deepspeed
from precompute.encode import rank_of, read_manifest
from precompute.faults import KILL_MARK
from precompute.variants import get_variant

TRAIN, ENCODE = REPO / "distill" / "train.py", REPO / "precompute" / "encode.py"
FAULT_SEED = 18
MAX_STEPS, SAVE_EVERY = 8, 3          # saves at steps 3, 6 and 8
SAVES = (3, 6)


def _kill_plan(seed: int) -> list[tuple[str, int, int]]:
    """(point, step, rank) for each kill point, drawn from `seed`, in the order they happen: each
    kill lands in the run that resumed after the previous one (a job that crashes again and again)."""
    rng = random.Random(seed)
    anywhere = range(1, MAX_STEPS)
    plan = [
        ("forward", rng.choice(anywhere), rng.randint(0, 1)),
        ("backward", rng.choice(anywhere), rng.randint(0, 1)),
        ("optimizer", rng.choice(anywhere), rng.randint(0, 1)),
        ("save", rng.choice(SAVES), rng.randint(0, 1)),
        ("step_start", rng.choice([s for s in anywhere if s % SAVE_EVERY]), rng.randint(0, 1)),  # between saves
    ]
    # A save of step s happens before step s starts: at one step, the save kill goes first.
    return sorted(plan, key=lambda kill: (kill[1], kill[0] != "save"))


KILLS = _kill_plan(FAULT_SEED)


def train(data: Path, out: Path, *extra: str, env: dict | None = None, check: bool = True):
    return run_deepspeed(TRAIN, *train_args(data, out, *extra), env=env, check=check)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--deepspeed", "ds_configs/zero3_cpu.json", "--config", "distill/configs/tiny.yaml", "--data", str(data),
            "--out", str(out), "--max-steps", str(MAX_STEPS), "--save-every", str(SAVE_EVERY),
            "log.wandb_mode=disabled", *extra]


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # a line torn by a kill
        return None


def logged_rows(run: Path) -> list[dict]:
    return [row for row in map(_parse, (run / "metrics.jsonl").read_text().splitlines()) if row]


def metrics(run: Path) -> dict[int, dict]:
    """The last row logged for each step (a resumed run logs the steps after its checkpoint again)."""
    return {row["step"]: row for row in logged_rows(run)}


def losses(run: Path) -> dict[int, dict]:
    return {step: {k: v for k, v in row.items() if "loss" in k or "grad_norm" in k or "sigma" in k}
            for step, row in metrics(run).items()}


def step_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Six clips in three buckets, one sample per shard (so shards can be damaged one at a time)."""
    root = tmp_path_factory.mktemp("faults_data")
    manifest = make_mixed_aspect_manifest(root / "clips")
    subprocess.run([sys.executable, str(ENCODE), "--manifest", str(manifest), "--shards", str(root / "data"),
                    "--variant", "tiny", "--samples-per-shard", "1"], cwd=REPO, check=True, capture_output=True, timeout=600,
                   env={**os.environ, "PYTHONPATH": pythonpath_with(REPO)})
    return root / "data"


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults_reference") / "run"
    train(dataset, out)
    return out


def test_reference_run_on_mixed_aspects_has_no_skipped_step(reference):
    rows = metrics(reference)
    assert sorted(rows) == list(range(MAX_STEPS))
    assert all(row["finite"] for row in rows.values()), {s: r["finite"] for s, r in rows.items()}
    assert rows[MAX_STEPS - 1]["skipped_nonfinite"] == 0
    assert step_dirs(reference) == ["step-000003", "step-000006", "step-000008"]


def test_kill9_at_five_points_then_resume_is_bit_identical(dataset, reference, tmp_path):
    """Each kill: the launcher ends the job; the same command with --resume continues from the last
    complete checkpoint (a half-written one is removed, never used). At the end every step's losses
    equal the uninterrupted run's, bit for bit."""
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    resume_step, half_written = 0, None
    for fault in [f"kill:{point}:{step}:{rank}" for point, step, rank in KILLS] + [None]:
        where = f"{fault or 'the last resume'} (kills {KILLS}, seed {FAULT_SEED})"
        proc = train(dataset, run, *(["--resume"] if ckpts.exists() else []),
                     env={"OVI_DMD_FAULT": fault} if fault else None, check=fault is None)
        printed = proc.stdout + proc.stderr
        if resume_step:
            assert f"resumed from {ckpts / f'step-{resume_step:06d}'} at step {resume_step}" in printed, f"{where}\n{printed[-3000:]}"
        if half_written:
            assert f"removed {half_written}" in printed, f"{where}: the half-written {half_written.name} was not cleaned up"
        if fault is None:
            break
        _, point, step, rank = fault.split(":")
        step = int(step)
        assert proc.returncode != 0 and f"{KILL_MARK} {point} step {step} rank {rank}" in printed, \
            f"{where}: the kill did not happen there, or the launcher did not end the job\n{printed[-3000:]}"
        assert logged_rows(run)[-1]["step"] == step - 1, f"{where}: the kill did not land in step {step}"
        resume_step = max(s for s in (0, *SAVES) if s < step or (s == step and point != "save"))
        half_written = ckpts / f"step-{step:06d}" if point == "save" else None
        assert half_written is None or not (half_written / "COMPLETE").exists()
    assert losses(run) == losses(reference), f"kills {KILLS} (seed {FAULT_SEED}): losses differ from the reference"
    assert step_dirs(run) == step_dirs(reference), "a half-written checkpoint was left behind"
    assert all((ckpts / name / "COMPLETE").exists() for name in step_dirs(run))


# kind -> (the step damaged, the file, the newest intact checkpoint a fallback takes)
DAMAGES = {
    "truncated_tensor_file": ("step-000008", "generator/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "step-000006"),
    "missing_rank_ema_shard": ("step-000008", "ema/rank-00001.pt", "step-000006"),
    "latest_names_a_missing_step": ("step-000009", "checkpoints/latest", "step-000008"),
}


def damage(run: Path, kind: str) -> str:
    """Damage the reference's last checkpoint; returns the text the error must name."""
    step, rel, _ = DAMAGES[kind]
    ckpts = run / "checkpoints"
    if kind == "truncated_tensor_file":
        file = ckpts / step / rel
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        return str(file)
    if kind == "missing_rank_ema_shard":
        (ckpts / step / rel).unlink()
        return str(ckpts / step / rel)
    (ckpts / "latest").write_text(step)
    return step


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damaged_checkpoint_is_named_or_stepped_over(reference, tmp_path, kind):
    """What --resume decides (checkpoint.plan_resume, run by every rank before any process group):
    stop naming the file, or with the fallback take the newest intact checkpoint and list the damaged one."""
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    named = damage(run, kind)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(named)):
        checkpoint.plan_resume(run, fallback=False)
    plan = checkpoint.plan_resume(run, fallback=True)
    assert plan.path == run / "checkpoints" / DAMAGES[kind][2]
    assert [(path.name, named in why) for path, why in plan.damaged] == [(DAMAGES[kind][0], True)]


def test_damaged_checkpoint_stops_the_job_with_exit_2(reference, dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    named = damage(run, "missing_rank_ema_shard")
    proc = train(dataset, run, "--resume", check=False)
    assert proc.returncode == 2 and named in proc.stderr and "--resume-fallback" in proc.stderr, (proc.returncode, proc.stderr[-3000:])


def test_damaged_checkpoint_fallback_uses_newest_intact_one(reference, dataset, tmp_path):
    """--resume-fallback: steps 6-7 rerun from step-000006 and give the reference's losses."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    named = damage(run, "truncated_tensor_file")
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in (run / "metrics.jsonl").read_text().splitlines()[:6]))
    proc = train(dataset, run, "--resume", "--resume-fallback")
    printed = proc.stdout + proc.stderr
    assert named in printed and f"resumed from {run / 'checkpoints' / 'step-000006'} at step 6" in printed, printed[-3000:]
    assert (run / "checkpoints" / "damaged-step-000008").is_dir(), "the damaged checkpoint was not kept aside"
    assert losses(run) == losses(reference)
    assert (run / "checkpoints" / "latest").read_text() == "step-000008"


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.1)


def test_shards_that_change_under_a_run_and_a_nan_step(dataset, tmp_path):
    """At step 2 one shard is truncated and one deleted: both are named, counted and skipped, and
    training goes on. At step 4 rank 1's critic computes NaN: the step is skipped on both ranks and
    logged with each rank's sample keys. At step 6 every shard is deleted: the job stops with a
    clear error (exit 4), it does not hang."""
    data, gate, run = tmp_path / "data", tmp_path / "gate", tmp_path / "run"
    shutil.copytree(dataset, data)
    shards = sorted((data / "shards").glob("*.tar"))
    truncated, deleted = random.Random(FAULT_SEED).sample(shards, 2)
    job = Background(TRAIN, *train_args(data, run, "--max-steps", "12"), log=tmp_path / "train.log",
                     env={"OVI_DMD_FAULT": "pause:step_start:2:0,nan:forward:4:1,pause:step_start:6:0",
                          "OVI_DMD_FAULT_GATE": str(gate)})
    started = time.monotonic()
    try:
        wait_for(Path(f"{gate}-2.waiting"), timeout=300)
        truncated.write_bytes(truncated.read_bytes()[:700])
        deleted.unlink()
        Path(f"{gate}-2.go").touch()
        wait_for(Path(f"{gate}-6.waiting"), timeout=300)
        for shard in shards:
            shard.unlink(missing_ok=True)
    finally:
        for step in (2, 6):
            Path(f"{gate}-{step}.go").touch()
    code, printed = job.wait(timeout=300)
    assert time.monotonic() - started < 300, "the job did not end promptly"
    for shard in (truncated, deleted):
        assert f"shards/{shard.name}" in printed, f"{shard.name} is not named in the log"
    before_the_loss = metrics(run)[5]
    assert before_the_loss["data/shard_errors"] + before_the_loss["data/corrupt_samples"] >= 2, before_the_loss
    assert [metrics(run)[step]["finite"] for step in range(6)] == [True] * 4 + [False, True]
    keys = {row["key"] for row in pq.read_table(dataset / "index.parquet").to_pylist()}
    held = metrics(run)[4]["skipped_keys"]
    assert len(held) == 2 and all(len(k) == 1 and k[0] in keys for k in held), held
    assert f"warning: step 4 skipped (NaN/Inf loss); its batches held rank 0: {held[0][0]}; rank 1: {held[1][0]}" in printed
    assert code == 4 or "exits with return code = 4" in printed, (code, printed[-3000:])
    assert "took no new sample" in printed, printed[-3000:]


def test_kill9_of_a_precompute_rank_mid_shard_then_rerun(tmp_path):
    """Two samples per shard; the rank with the most clips is killed right after its third sample
    (one finished shard, one half-written). The rerun must finish with every clip exactly once."""
    (tmp_path / "clips").mkdir()
    manifest = make_tiny_manifest(tmp_path / "clips", 8)
    rows = read_manifest(manifest, get_variant("tiny"))
    per_rank = [sum(rank_of(r, 2) == rank for r in rows) for rank in (0, 1)]
    victim = max((0, 1), key=lambda rank: per_rank[rank])
    assert per_rank[victim] >= 3, per_rank
    out = tmp_path / "data"
    args = ["--manifest", str(manifest), "--shards", str(out), "--variant", "tiny", "--samples-per-shard", "2",
            "--decode-workers", "1"]
    killed = run_deepspeed(ENCODE, *args, env={"OVI_DMD_FAULT": f"kill:sample_written:3:{victim}"}, check=False)
    assert killed.returncode != 0 and f"{KILL_MARK} sample_written step 3 rank {victim}" in killed.stdout + killed.stderr, \
        killed.stderr[-3000:]
    assert list((out / "shards").glob(f"{victim}-*.tar.partial")), "the kill did not land mid-shard"

    run_deepspeed(ENCODE, *args)
    assert not list((out / "shards").glob("*.partial")), "a partial tar survived the rerun"
    keys_in_tars = []
    for tar in sorted((out / "shards").glob("*.tar")):
        members = subprocess.run(["tar", "-tf", str(tar)], capture_output=True, text=True, check=True).stdout.split()
        keys_in_tars += [(m.split(".")[0], tar.relative_to(out).as_posix()) for m in members if m.endswith(".json")]
    keys = [k for k, _ in keys_in_tars]
    assert len(keys) == len(set(keys)) == 8, f"a sample was written twice or lost: {sorted(keys)}"
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert sorted((r["key"], r["shard"]) for r in index) == sorted(keys_in_tars), "index.parquet does not list the tars"
    assert json.loads((out / "dataset.json").read_text())["counts"]["samples"] == 8
