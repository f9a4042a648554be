"""Shared pytest fixtures: where the golden fixtures live, a tiny dataset and a tiny DMD run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def golden_root() -> Path:
    """The official-implementation fixtures: $OVI_DMD_GOLDEN, else ../shared/golden beside the repo."""
    env = os.environ.get("OVI_DMD_GOLDEN")
    return Path(env) if env else REPO.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    root = golden_root()
    if not (root / "README.md").exists():
        pytest.fail(f"golden fixtures not found at {root}; set OVI_DMD_GOLDEN to the shared/golden folder")
    return root


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """Small convs and matmuls on the shared 2-core box run up to ~20x slower with 2 intra-op
    threads than with 1 (measured on the tiny VAE and vocoder)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Shards written by precompute/encode.py (tiny seeded encoders) from 4 real clips."""
    from clips import make_tiny_manifest
    root = tmp_path_factory.mktemp("tiny_data")
    manifest = make_tiny_manifest(root, 4)
    subprocess.run([sys.executable, "precompute/encode.py", "--manifest", str(manifest),
                    "--shards", str(root / "data"), "--variant", "tiny"], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    return root / "data"


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    """A real 2-rank DMD run of 9 steps with checkpoints at steps 3, 6 and 9. Read-only: copy it
    to change it (tests/test_train.py compares against it, tests/test_evaluate.py evaluates a copy)."""
    from launcher import TINY_SCHEDULES, train_tiny
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    train_tiny(tiny_dataset, run, "--max-steps", "9", *TINY_SCHEDULES)
    return run
