"""A real one-node Slurm for tests: munged, slurmctld and slurmd from Debian's slurm-wlm, run as
the current user (root) with every file under one temporary directory and every socket on
127.0.0.1. Nothing in /etc is touched; clients find the cluster through $SLURM_CONF.

    cluster = SlurmCluster(tmp_dir, cpus=2)
    cluster.start()            # raises SlurmUnavailable(reason) where Slurm cannot run here
    cluster.sbatch(script, ...) / cluster.job(job_id) / cluster.wait_for(...)
    cluster.stop()             # kills only the three daemons it started

Config choices: proctrack/linuxproc + task/none (no cgroups needed in a container),
select/cons_tres with CR_CPU, no accounting, JobRequeue=1, CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
(so the daemons bind to SlurmctldHost/NodeAddr = 127.0.0.1 instead of every interface).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")
NODE = "ovinode"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be brought up on this machine; the message says why."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"({path} missing)"


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 4096):
        self.root = Path(root)
        self.cpus, self.memory_mb = cpus, memory_mb
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.procs: dict[str, subprocess.Popen] = {}

    # environment -----------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: what every client command (and job) needs."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    # bring-up --------------------------------------------------------------------------------
    def start(self, timeout: float = 40) -> None:
        missing = [b for b in BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (run .ci/install_slurm.sh: apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to launch jobs; this test runs as uid %d" % os.geteuid())
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except SlurmUnavailable:
            self.stop()
            raise
        except Exception as err:  # anything else while bringing it up is also "cannot run here"
            self.stop()
            raise SlurmUnavailable(f"{type(err).__name__}: {err}") from err

    def _daemon_path(self, name: str) -> str:
        return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        cmd = [self._daemon_path(cmd[0]), *cmd[1:]]
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                               f"--seed-file={d / 'munged.seed'}"])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None:
                raise SlurmUnavailable("munged exited: " + _tail(self.root / "munged.stdout") + _tail(d / "munged.log"))
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged did not create its socket within 10 s")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=ovitest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'logs' / 'slurmctld.log'}
SlurmdLogFile={r / 'logs' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            for name in ("slurmctld", "slurmd"):
                if self.procs[name].poll() is not None:
                    raise SlurmUnavailable(f"{name} exited ({self.procs[name].returncode}): "
                                           + _tail(self.root / f"{name}.stdout") + _tail(self.root / "logs" / f"{name}.log"))
            state = self.node_state() or state
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"node {NODE} not idle after {timeout:.0f} s (state {state!r}); slurmctld log: "
                               + _tail(self.root / "logs" / "slurmctld.log") + " slurmd log: " + _tail(self.root / "logs" / "slurmd.log"))

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def listening_addresses(self) -> list[str]:
        """Local addresses of the daemons' listening TCP sockets (to check they are on 127.0.0.1)."""
        pids = {str(p.pid) for p in self.procs.values()}
        out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout if shutil.which("ss") else ""
        return [line.split()[3] for line in out.splitlines()[1:] if any(f"pid={pid}," in line for pid in pids)]

    # jobs ------------------------------------------------------------------------------------
    def sbatch(self, *args: str, cwd: Path | None = None, env: dict | None = None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once it is forgotten."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    def logs(self) -> str:
        return ("--- slurmctld.log ---\n" + _tail(self.root / "logs" / "slurmctld.log", 4000)
                + "\n--- slurmd.log ---\n" + _tail(self.root / "logs" / "slurmd.log", 4000))

    # tear-down -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel what is left of our jobs, then stop slurmd, slurmctld and munged (only those we started)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", str(os.geteuid()), check=False, timeout=10)
            time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
