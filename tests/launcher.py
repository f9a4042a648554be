"""Runs a script on 2 CPU ranks with the real DeepSpeed launcher (gloo), as users launch on GPUs."""
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench.launching import free_port, pythonpath_with, remove_shm_buffers

REPO = Path(__file__).resolve().parents[1]


def _command(script: Path, args: tuple[str, ...], nproc: int, env: dict | None) -> tuple[list[str], dict, int]:
    port = free_port()
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath_with(REPO),
                "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ovi_dmd_torch_ext")),
                **(env or {})}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port),
           str(script), *args]
    return cmd, full_env, port


def run_deepspeed(script: Path, *args: str, nproc: int = 2, timeout: int = 600, check: bool = True,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    cmd, full_env, port = _command(script, args, nproc, env)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode})\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


class Background:
    """A launch that runs while the test does something else (e.g. damages files under it)."""

    def __init__(self, script: Path, *args: str, nproc: int = 2, env: dict | None = None, log: Path):
        cmd, full_env, self.port = _command(script, args, nproc, env)
        self.log_path = log
        self._log = open(log, "w")
        # Its own session, so a hung launch is ended with its ranks (they are the launcher's children).
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)

    def wait(self, timeout: int) -> tuple[int, str]:
        """(exit status, everything it printed); kills the launch if it outlives `timeout`."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
        finally:
            self._log.close()
            remove_shm_buffers(self.port)
        return code, self.log_path.read_text()


# Warmup then cosine for the generator, linear to a floor for the critic: the shared tiny run trains with
# these, so resuming it (tests/test_train.py) checks that both schedules pick up where they were.
TINY_SCHEDULES = ("generator_optim.schedule.warmup_steps=2", "generator_optim.schedule.decay=cosine",
                  "generator_optim.schedule.decay_steps=3", "generator_optim.schedule.min_ratio=0.1",
                  "critic_optim.schedule.decay=linear", "critic_optim.schedule.decay_steps=5",
                  "critic_optim.schedule.min_ratio=0.5")


def train_tiny(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """distill/train.py with the tiny recipe on 2 CPU ranks, a checkpoint every 3 steps."""
    return run_deepspeed(REPO / "distill" / "train.py", "--deepspeed", "ds_configs/zero3_cpu.json", "--config",
                         "distill/configs/tiny.yaml", "--data", str(data), "--out", str(out), "--save-every", "3", *extra)
