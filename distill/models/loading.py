"""Official Ovi checkpoints (`model.safetensors`, `model_960x960.safetensors`,
`model_960x960_10s.safetensors`) in and out.

Loading reads the safetensors header first and checks every key, shape and dtype against the
model before any tensor is read, so a bad file fails fast with the key and the file named.
Two targets: a plain model built on the meta device (tensors are assigned one at a time, so the
weights exist once), and a DeepSpeed ZeRO-3 model built under `zero.Init` (each parameter is
gathered, filled on rank 0 from the memory-mapped file, and re-partitioned).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from precompute.checkpoints import CheckpointError

FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) from the safetensors header, without reading tensor data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file size {size})")
            header = json.loads(f.read(n))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from err
    header.pop("__metadata__", None)
    entries, end = {}, 0
    for key, info in header.items():
        entries[key] = (info["dtype"], tuple(info["shape"]))
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: header promises {8 + n + end} bytes, file has {size}")
    return entries


def expected_entries(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """key -> shape of every parameter and persistent buffer, ZeRO-3 partitioned or not."""
    out = {}
    for key, p in list(model.named_parameters()) + list(model.named_buffers()):
        out[key] = tuple(getattr(p, "ds_shape", p.shape))
    return out


def check_header(path, header: dict, expected: dict) -> None:
    missing = [k for k in expected if k not in header]
    unexpected = [k for k in header if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
        raise CheckpointError(f"{path}: " + "; ".join(parts))
    for key, shape in expected.items():
        dtype, got = header[key]
        if got != shape:
            raise CheckpointError(f"{path}: key {key} has shape {list(got)}, the model expects {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: key {key} has dtype {dtype}; expected one of {sorted(FLOAT_DTYPES)}")


def load_ovi_checkpoint(model: nn.Module, path, dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
    """Strict load into `model` (typically built on the meta device): tensors are read one at a
    time from the memory-mapped file, cast, and assigned in place of the parameters."""
    header = read_header(path)
    check_header(path, header, expected_entries(model))
    state = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in header:
            tensor = f.get_tensor(key)
            state[key] = tensor.to(dtype) if dtype is not None else tensor
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_state_zero3(model: nn.Module, get_tensor, rank: int | None = None) -> nn.Module:
    """Fill a model built under `deepspeed.zero.Init` one parameter at a time: each is gathered,
    written on rank 0 from `get_tensor(key)` (called on rank 0 only), then broadcast and
    re-partitioned by `GatheredParameters(modifier_rank=0)` (modifier_rank=None would silently
    drop the write)."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if rank is None else rank
    for key, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(get_tensor(key).to(param.dtype))
    return model


def load_ovi_checkpoint_zero3(model: nn.Module, path, rank: int | None = None) -> nn.Module:
    """Strict load of an official checkpoint into a ZeRO-3 partitioned model. Every rank checks
    the header (cheap, no tensor data) so a bad file fails on all ranks alike; only rank 0
    reads tensors, from the memory-mapped file."""
    import torch.distributed as dist

    rank = dist.get_rank() if rank is None else rank
    header = read_header(path)
    check_header(path, header, expected_entries(model))
    handle = safe_open(str(path), framework="pt", device="cpu") if rank == 0 else None
    try:
        return load_state_zero3(model, lambda key: handle.get_tensor(key), rank)
    finally:
        del handle


def save_ovi_checkpoint(state: dict[str, torch.Tensor], path, dtype: torch.dtype = torch.bfloat16,
                        metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict with the official key names as one safetensors file (atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
