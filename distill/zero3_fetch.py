"""One correction to DeepSpeed 0.19.8's ZeRO-3 parameter fetch, applied once by `engines.build_engines`.

Where a parameter's partition group has one rank (one GPU, or a teacher replicated per rank),
ZeRO-3 "gathers" by pointing `param.data` at its own partition (`NoGatherHandle`,
`NoGatherCoalescedHandle` in `deepspeed/runtime/zero/partition_parameters.py`) and then waits with
`current_stream().synchronize()`: a host sync in every module fetch, 30+ per forward pass of a
2-layer Ovi. The wait exists for partitions offloaded to the CPU, whose `.to(device,
non_blocking=True)` is a real copy from a buffer the host may reuse; for a partition already on
the device that call returns the partition itself, there is nothing to wait for, and the stream
orders every later kernel after it anyway. So the wait is skipped exactly then; offloaded
partitions keep DeepSpeed's own wait. Multi-rank groups take another path
(`AllGatherCoalescedHandle`, a stream wait on the collective, no host sync) and are not touched.
"""
from __future__ import annotations

import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero import partition_parameters as pp

_ORIGINAL_WAIT = {}


def partitions_on_device(params) -> bool:
    """True when every parameter's partition already lives on the current accelerator device, so
    making it available moved no bytes."""
    device = torch.device(get_accelerator().current_device_name())
    return all(p.ds_tensor.device == device for p in params)


def _handle_params(handle) -> list:
    if isinstance(handle, pp.NoGatherHandle):
        return [handle._NoGatherHandle__param]
    return list(handle._NoGatherCoalescedHandle__params)


def _mark_available(handle) -> None:
    for param in _handle_params(handle):
        if param.ds_status != pp.ZeroParamStatus.INFLIGHT:
            raise RuntimeError(f"expected param {param.ds_summary()} to be inflight")
        param.ds_status = pp.ZeroParamStatus.AVAILABLE


def _wait_without_host_sync(self, **kwargs) -> None:
    cls = type(self)
    done = f"_{cls.__name__}__complete"
    if getattr(self, done):
        return
    if not partitions_on_device(_handle_params(self)):
        return _ORIGINAL_WAIT[cls](self, **kwargs)
    _mark_available(self)
    setattr(self, done, True)


def skip_single_rank_fetch_sync() -> None:
    """Install the wait above on both single-rank handle classes (idempotent)."""
    for cls in (pp.NoGatherHandle, pp.NoGatherCoalescedHandle):
        if cls not in _ORIGINAL_WAIT:
            _ORIGINAL_WAIT[cls] = cls.wait
            cls.wait = _wait_without_host_sync


def restore_single_rank_fetch_sync() -> None:
    """DeepSpeed's own waits again (tests compare both)."""
    for cls, wait in _ORIGINAL_WAIT.items():
        cls.wait = wait
    _ORIGINAL_WAIT.clear()
