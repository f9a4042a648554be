"""launch/precompute.sbatch and launch/distill.sbatch on a real one-node Slurm (Debian's slurm-wlm:
munged, slurmctld, slurmd started by tests/slurm_cluster.py under a temporary folder, listening on
127.0.0.1 only), 2 CPU ranks each:
  * precompute (tiny encoders): preempted after its first finished shard, requeued, and the second
    attempt skips the finished shards and writes the rest;
  * distill (tiny config, on that dataset): preempted mid-run, checkpoints, requeued, resumes from
    `latest`, finishes with every step logged;
  * evaluate (1 task, on a finished tiny run): evaluates every checkpoint and ends by itself once
    the run's final checkpoint is done.
Skips, saying why, where Slurm cannot run on this machine (install it with .ci/install_slurm.sh)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clips import make_tiny_manifest
from launcher import REPO
from slurm_cluster import SlurmCluster, SlurmUnavailable

MAX_STEPS, SAVE_EVERY = 10, 2


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    # the munge socket path must stay under 108 characters (AF_UNIX); pytest's tmp paths do
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        cluster.start()
    except SlurmUnavailable as why:
        pytest.skip(f"Slurm cannot start here: {why}")
    yield cluster
    cluster.stop()


def job_env(tmp: Path, **extra: str) -> dict[str, str]:
    """What the sbatch scripts read: 2 CPU workers on the one node, this interpreter, logs under tmp."""
    return {"GPUS_PER_NODE": "2", "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable, "LOG_ROOT": str(tmp / "logs"),
            "OVI_DMD_ROOT": str(REPO), "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ovi_dmd_torch_ext")),
            **extra}


def submit(slurm, script: str, tmp: Path, env: dict, *args: str, options: tuple[str, ...] = ()) -> tuple[int, Path, Path]:
    out_file, err_file = tmp / f"{Path(script).stem}.out", tmp / f"{Path(script).stem}.err"
    # The node has no GPUs (no gres): the test drops the script's --gpus-per-node, keeps the rest.
    job = slurm.sbatch("--gpus-per-node=0", f"--output={out_file}", f"--error={err_file}", *options, script, *args,
                       cwd=REPO, env=env)
    return job, out_file, err_file


def report(slurm, job, out_file: Path, err_file: Path) -> str:
    return (f"job: {slurm.job(job)}\n--- {out_file.name} ---\n{out_file.read_text()[-6000:] if out_file.exists() else ''}"
            f"\n--- {err_file.name} ---\n{err_file.read_text()[-4000:] if err_file.exists() else ''}\n{slurm.logs()}")


def preempt_and_finish(slurm, job: int, started, what: str) -> None:
    """Wait for `started()`, send what Slurm sends 300 s before the time limit (USR1 to the batch
    shell), then wait for the requeue and for the requeued job to end."""
    def state() -> str:
        return slurm.job(job).get("JobState", "")

    slurm.wait_for(lambda: started() or state() in ("FAILED", "COMPLETED", "CANCELLED"), timeout=150, what=what)
    assert state() == "RUNNING", f"job left RUNNING before the preemption signal ({state()})"
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))
    slurm.wait_for(lambda: int(slurm.job(job).get("Restarts", "0")) >= 1, timeout=90, what="the requeue")
    # Slurm holds a requeued batch job for 120 s (EligibleTime = requeue + 120 s, reason BeginTime)
    # so the node can clean up; release it early to keep the test short. It is still Slurm that
    # starts the requeued job, with the same script and arguments. Wait for the node to be idle
    # and a few seconds more: slurmd refuses a launch whose credential dates from the same second
    # as the kill ("Job N already killed, do not launch batch job").
    slurm.wait_for(lambda: state() == "PENDING" and slurm.node_state().startswith("idle"), timeout=60,
                   what="the requeued job pending on an idle node")
    time.sleep(3)
    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
    slurm.wait_for(lambda: state() in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
                   timeout=150, what="the requeued job to finish")


@pytest.fixture(scope="module")
def precompute_job(slurm, tmp_path_factory):
    """launch/precompute.sbatch, 2 ranks, tiny encoders, one sample per shard; preempted (requeued at
    once) as soon as the first shard is finished. Its dataset feeds the distill test."""
    tmp = tmp_path_factory.mktemp("slurm_precompute")
    manifest = make_tiny_manifest(tmp, 3)
    data = tmp / "data"
    env = job_env(tmp, MANIFEST=str(manifest), DATA=str(data), VARIANT="tiny")
    job, out_file, err_file = submit(slurm, "launch/precompute.sbatch", tmp, env, "--samples-per-shard", "1")
    try:
        preempt_and_finish(slurm, job, lambda: any((data / "shards").glob("*.tar")), "the first finished shard")
    except (TimeoutError, AssertionError) as err:
        raise AssertionError(f"{err}\n{report(slurm, job, out_file, err_file)}") from None
    return {"job": job, "data": data, "out": out_file, "err": err_file, "logs": tmp / "logs"}


def test_precompute_preempted_requeued_and_skips_finished_shards(slurm, precompute_job):
    job, data = precompute_job["job"], precompute_job["data"]
    why = report(slurm, job, precompute_job["out"], precompute_job["err"])
    info = slurm.job(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", why
    text = precompute_job["out"].read_text()
    assert "preemption signal (USR1), mode requeue" in text, why
    summary = re.findall(r"encode: (\d+) written, (\d+) skipped \(already done\), (\d+) failed", text)
    # The signal goes out once the first shard is finished; on an idle machine the first attempt can
    # finish its last clips (and print its summary) before the signal lands. Either way the requeued
    # attempt's summary (the last) must skip what the first one finished and complete the dataset.
    assert len(summary) in (1, 2), why
    written, skipped, failed = map(int, summary[-1])
    assert skipped >= 1 and written + skipped == 3 and failed == 0, why
    assert json.loads((data / "dataset.json").read_text()) and len(list((data / "shards").glob("*.tar"))) == 3
    assert not list((data / "shards").glob("*.partial"))


def test_daemons_listen_on_localhost_only(slurm):
    addresses = slurm.listening_addresses()
    assert addresses, "found no listening socket of slurmctld/slurmd (is `ss` installed?)"
    assert all(a.startswith("127.0.0.1:") for a in addresses), addresses


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_distill_preempted_requeued_and_resumed(slurm, precompute_job, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    env = job_env(tmp_path, DATA=str(precompute_job["data"]), OUT=str(run), CONFIG="distill/configs/tiny.yaml",
                  DS_CONFIG="ds_configs/zero3_cpu.json")
    job, out_file, err_file = submit(slurm, "launch/distill.sbatch", tmp_path, env,
                                     "--max-steps", str(MAX_STEPS), "--save-every", str(SAVE_EVERY))
    try:
        # mid-run: a few steps logged, max_steps far away
        preempt_and_finish(slurm, job, lambda: len(metric_steps(run)) >= 3, "the first training steps")
    except (TimeoutError, AssertionError) as err:
        raise AssertionError(f"{err}\n{report(slurm, job, out_file, err_file)}") from None

    def why() -> str:
        return report(slurm, job, out_file, err_file)

    info = slurm.job(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why()
    assert info["Restarts"] == "1", why()

    text = out_file.read_text()
    attempts = re.findall(r"=== \S+ job \d+ attempt (\d+):", text)
    assert attempts[0] == "0" and "1" in attempts, why()
    assert "preemption signal (USR1)" in text, why()
    assert "step exited 0 after the preemption signal; requeueing" in text, why()  # the trainers saved and exited 0
    saved = re.search(r"preemption signal: saved at step (\d+)", text)
    assert saved, why()
    resumed = re.search(r"resumed from \S*step-(\d+) at step (\d+)", text)
    assert resumed and resumed.group(1).lstrip("0") == saved.group(1) == resumed.group(2), why()
    assert (logs / f"ovi-distill-{job}" / "attempt-0").is_dir() and (logs / f"ovi-distill-{job}" / "attempt-1").is_dir()
    per_rank = list((logs / f"ovi-distill-{job}" / "attempt-1").rglob("stdout.log"))
    assert len(per_rank) == 2, per_rank

    # Step numbers: no step missing, none beyond the end; a step after the last checkpoint may repeat.
    steps = metric_steps(run)
    assert sorted(set(steps)) == list(range(MAX_STEPS)), steps
    assert steps[-1] == MAX_STEPS - 1
    n = int(saved.group(1))
    assert 0 < n < MAX_STEPS, why()
    assert steps[-(MAX_STEPS - n):] == list(range(n, MAX_STEPS)), steps  # the resumed run went on from n

    final = run / "checkpoints" / f"step-{MAX_STEPS:06d}"
    assert (final / "COMPLETE").exists() and (run / "checkpoints" / "latest").read_text() == final.name
    assert json.loads((final / "trainer.json").read_text())["step"] == MAX_STEPS


def test_evaluate_watches_the_run_and_ends_after_its_final_checkpoint(slurm, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A dog runs along the beach. <AUDCAP>waves, barking<ENDAUDCAP>\n"
                       "A red ball rolls. <AUDCAP>a soft thud<ENDAUDCAP>\n")
    env = job_env(tmp_path, OUT=str(run), PROMPTS=str(prompts))
    # the test node has 2 CPUs and little memory: the script's 8 CPUs and 160 GB are dropped too
    job, out_file, err_file = submit(slurm, "launch/evaluate.sbatch", tmp_path, env, "--poll-s", "1",
                                     options=("--cpus-per-task=1", "--mem=0"))
    try:
        slurm.wait_for(lambda: slurm.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                       timeout=300, what="the evaluator to finish")
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{report(slurm, job, out_file, err_file)}") from None
    why = report(slurm, job, out_file, err_file)
    assert slurm.job(job)["JobState"] == "COMPLETED", why
    text = out_file.read_text()
    assert "evaluated 3 checkpoint(s) [3, 6, 9]" in text and "the run's final step 9 is evaluated" in text, why
    assert json.loads((run / "eval" / "best.json").read_text())["step"] in (3, 6, 9)
