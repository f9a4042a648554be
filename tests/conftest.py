"""Shared pytest fixtures: where the golden fixtures live, and a scratch directory."""
import os
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
