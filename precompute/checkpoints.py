"""Reading and checking official `.pth` state dicts (Wan2.2 VAE, MMAudio VAE, BigVGAN, umT5),
with errors that name the file and the keys. One place for every loader in the project
(`distill.models.loading` reuses `CheckpointError` for the DiT's safetensors files)."""
from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint file that is unreadable or does not match the model; the message names it."""


def read_torch_state_dict(path: str | Path, what: str = "checkpoint", nested_key: str | None = None) -> dict[str, Tensor]:
    """`torch.load(weights_only=True)` a state dict (optionally stored under `nested_key`).
    Zip-format files are memory-mapped so a multi-GB file is not copied into RAM."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # truncated zip, bad pickle, foreign format: all the same to the caller
        raise CheckpointError(f"{path}: cannot read {what} (truncated or corrupt?): {type(err).__name__}: {err}") from err
    if nested_key is not None:
        if not isinstance(obj, Mapping) or nested_key not in obj:
            found = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: expected the state dict under key '{nested_key}', found {found}")
        obj = obj[nested_key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a plain state dict (key -> tensor), got {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors (a wrapped state_dict?): {not_tensors[:8]}")
    return dict(obj)


def preview(keys: Sequence[str], limit: int = 8) -> str:
    return f"{list(keys[:limit])}" + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(state: Mapping[str, Tensor], expected: Mapping[str, Tensor | Sequence[int]], source,
                     what: str = "the model") -> None:
    """Strict check of keys, shapes and (where `expected` holds tensors, e.g. on the meta device)
    dtypes; raises one CheckpointError listing every problem, naming `source` and the keys."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing key(s) ({len(missing)}): {preview(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) ({len(unexpected)}): {preview(unexpected)}")
    for key, ref in expected.items():
        got = state.get(key)
        if got is None:
            continue
        shape = tuple(ref.shape) if isinstance(ref, Tensor) else tuple(ref)
        if tuple(got.shape) != shape:
            problems.append(f"key '{key}': shape {tuple(got.shape)}, expected {shape}")
        elif isinstance(ref, Tensor) and got.dtype != ref.dtype:
            problems.append(f"key '{key}': dtype {got.dtype}, expected {ref.dtype}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match {what}: " + "; ".join(problems))
