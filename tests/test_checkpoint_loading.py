"""Official-format checkpoint loading: strict, on the meta device, and under ZeRO-3 on 2 ranks."""
import json

import pytest
import torch
from safetensors.torch import save_file

from distill.models import CheckpointError, OviFusion, load_ovi_checkpoint, save_ovi_checkpoint
from launcher import REPO, run_deepspeed


@pytest.fixture
def tiny_state():
    return {k: v.clone() for k, v in OviFusion.from_variant("tiny", seed=7).state_dict().items()}


def write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def bad_checkpoints(tmp_path, state) -> dict[str, tuple]:
    """name -> (path, text the error must contain)."""
    missing = dict(state); missing.pop("audio_model.blocks.1.cross_attn.k_fusion.weight")
    extra = {**state, "video_model.freqs": torch.zeros(4)}
    shape = {**state, "video_model.head.head.weight": torch.zeros(191, 64)}
    dtype = {**state, "video_model.blocks.0.modulation.modulation": torch.zeros(1, 6, 64, dtype=torch.int32)}
    good = write(tmp_path / "good.safetensors", state)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x13\x37" * 1000)
    return {
        "missing": (write(tmp_path / "missing.safetensors", missing), "audio_model.blocks.1.cross_attn.k_fusion.weight"),
        "extra": (write(tmp_path / "extra.safetensors", extra), "video_model.freqs"),
        "shape": (write(tmp_path / "shape.safetensors", shape), "video_model.head.head.weight"),
        "dtype": (write(tmp_path / "dtype.safetensors", dtype), "video_model.blocks.0.modulation.modulation"),
        "truncated": (truncated, "truncated"),
        "garbage": (garbage, "garbage.safetensors"),
        "absent": (tmp_path / "absent.safetensors", "absent.safetensors"),
    }


def test_meta_load_is_strict_and_exact(tmp_path, tiny_state):
    path = write(tmp_path / "model.safetensors", tiny_state)
    with torch.device("meta"):
        model = OviFusion.from_variant("720x720_5s").__class__(OviFusion.from_variant("tiny").cfg)
    load_ovi_checkpoint(model, path, dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, tiny_state[k].to(torch.bfloat16)), k


def test_export_round_trip(tmp_path, tiny_state):
    path = save_ovi_checkpoint(tiny_state, tmp_path / "student.safetensors", dtype=torch.bfloat16)
    model = OviFusion(OviFusion.from_variant("tiny").cfg)
    load_ovi_checkpoint(model, path)
    assert all(torch.equal(v, tiny_state[k].bfloat16()) for k, v in model.state_dict().items())


def test_bad_checkpoints_name_the_problem(tmp_path, tiny_state):
    for name, (path, needle) in bad_checkpoints(tmp_path, tiny_state).items():
        model = OviFusion(OviFusion.from_variant("tiny").cfg)
        with pytest.raises(CheckpointError) as info:
            load_ovi_checkpoint(model, path)
        assert needle in str(info.value) and str(path.name) in str(info.value), (name, str(info.value))


def test_zero3_partitioned_load_on_two_ranks(tmp_path, tiny_state):
    good = write(tmp_path / "model.safetensors", tiny_state)
    bad = bad_checkpoints(tmp_path, tiny_state)
    out = tmp_path / "result"
    run_deepspeed(REPO / "tests/distributed/zero3_model_checks.py", "--good", str(good),
                  "--bad", *[str(p) for p, _ in bad.values()], "--out", str(out))
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        assert result["partitioned"], "parameters were not partitioned across the 2 ranks"
        assert result["max_param_diff"] == 0.0
        assert result["forward_diff"] < 1e-5
        for path, needle in bad.values():
            message = result["bad"][str(path)]
            assert message is not None and needle in message, (path, message)
