"""The DeepSpeed runner as a subprocess: a free rendezvous port, and the /dev/shm files its CPU
all-reduce leaves behind (used by bench/toyworld.py and tests/launcher.py)."""
import os
import socket
from pathlib import Path


def pythonpath_with(repo: Path) -> str:
    """`repo` first, then whatever PYTHONPATH already holds: packages installed with
    `pip --target` (the GPU image's DeepSpeed, say) must stay importable in the subprocess."""
    return os.pathsep.join([str(repo), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves two 66 MB files per launch in /dev/shm (RAM): a test
    session of ~50 launches would otherwise hold several GB of the machine's memory."""
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        leftover.unlink(missing_ok=True)
