"""OviFusion against the official implementation's golden outputs, plus its contracts."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from distill.models import OviFusion
from distill.models.rope import apply_rope, audio_angles, rope_tables, video_angles

CASES = ["i2v", "t2v", "i2v_slg1", "batch2", "audio_only", "video_only"]
FILES = {"ovi_fusion_tiny": 1e-5, "ovi_fusion_tiny_sensitive": 1e-4}  # atol from the golden README


@pytest.fixture(scope="module")
def golden_ovi(golden):
    meta = json.loads((golden / "ovi_fusion_tiny.json").read_text())
    return meta, {name: load_file(str(golden / f"{name}.safetensors")) for name in FILES}


def load_golden_model(meta, tensors) -> OviFusion:
    model = OviFusion.from_ovi_configs(meta["tiny_video_config"], meta["tiny_audio_config"]).eval()
    model.load_state_dict({k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}, strict=True)
    return model


def run_case(model, tensors, case: dict, i: int, **overrides):
    pick = lambda names: tensors[names[i]][None] if names else None
    kwargs = dict(first_frame_clean=case.get("first_frame_is_clean", False), skip_block=case.get("slg_layer") or None)
    kwargs.update(overrides)
    with torch.no_grad():
        return model(pick(case["vid"]), pick(case["audio"]), tensors[case["t"]][i:i + 1],
                     pick(case["vid_context"]), pick(case["audio_context"]), **kwargs)


@pytest.mark.parametrize("fname", list(FILES))
@pytest.mark.parametrize("case_name", CASES)
def test_golden_parity(golden_ovi, fname, case_name):
    meta, files = golden_ovi
    tensors, case = files[fname], meta["cases"][case_name]
    model = load_golden_model(meta, tensors)
    for i in range(len(case["vid"] or case["audio"])):  # batch2: per sample (different lengths)
        video, audio = run_case(model, tensors, case, i)
        for out, names in ((video, case["outputs"]["video"]), (audio, case["outputs"]["audio"])):
            assert (out is None) == (not names)
            if out is not None:
                torch.testing.assert_close(out[0], tensors[names[i]], atol=FILES[fname], rtol=1e-4)


def test_batched_forward_equals_per_sample(golden_ovi):
    meta, files = golden_ovi
    tensors = files["ovi_fusion_tiny_sensitive"]
    model = load_golden_model(meta, tensors)
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(3, 48, 2, 4, 6, generator=g), torch.randn(3, 10, 20, generator=g)
    text_v, text_a = torch.randn(3, 16, 40, generator=g), torch.randn(3, 9, 40, generator=g)
    t = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        bv, ba = model(video, audio, t, text_v, text_a, first_frame_clean=True)
        for i in range(3):
            v, a = model(video[i:i + 1], audio[i:i + 1], t[i:i + 1], text_v[i:i + 1], text_a[i:i + 1], first_frame_clean=True)
            torch.testing.assert_close(bv[i:i + 1], v, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ba[i:i + 1], a, atol=1e-5, rtol=1e-5)


def test_i2v_frame0_tokens_get_t0(golden_ovi):
    """first_frame_clean gives latent frame 0's tokens t = 0 (time embedding equal to the official
    per-token e), every other token t, the audio tower t; same as explicit per-token timesteps."""
    meta, files = golden_ovi
    tensors = files["ovi_fusion_tiny_sensitive"]
    model = load_golden_model(meta, tensors)
    case = meta["cases"]["i2v"]
    vid = tensors[case["vid"][0]][None]
    with torch.no_grad():
        state = model.video_model.prepare(vid, tensors[case["t"]].float(), tensors[case["vid_context"][0]][None], True)
    e_ref = tensors["intermediates.i2v.video.e"]       # [1, 18, dim]; frame 0 = first 2x3 tokens
    assert state.split == 6
    torch.testing.assert_close(state.e[:, 0:1].expand(1, 6, -1), e_ref[:, :6], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.e[:, 1:2].expand(1, 12, -1), e_ref[:, 6:], atol=1e-5, rtol=1e-4)
    t_tok = torch.full((1, 18), float(tensors[case["t"]][0]))
    t_tok[:, :6] = 0
    clean = run_case(model, tensors, case, 0)
    explicit = run_case(model, tensors, case, 0, first_frame_clean=False, t_video=t_tok)
    uniform = run_case(model, tensors, case, 0, first_frame_clean=False)
    torch.testing.assert_close(clean[0], explicit[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clean[1], explicit[1], atol=1e-5, rtol=1e-5)
    assert (clean[0] - uniform[0]).abs().max() > 1e-2


def test_slg_skips_exactly_one_block(golden_ovi):
    """skip_block=k equals a model with block k removed from both towers, and differs from no skip."""
    meta, files = golden_ovi
    tensors = files["ovi_fusion_tiny_sensitive"]
    model = load_golden_model(meta, tensors)
    case = meta["cases"]["t2v"]
    for k in range(model.cfg.video.num_layers):
        shorter = copy.deepcopy(model)
        for tower in (shorter.video_model, shorter.audio_model):
            del tower.blocks[k]
        shorter.cfg = type(model.cfg)(*(type(c)(**{**c.__dict__, "num_layers": c.num_layers - 1})
                                         for c in (model.cfg.video, model.cfg.audio)))
        skipped = run_case(model, tensors, case, 0, skip_block=k)
        reference = run_case(shorter, tensors, case, 0)
        full = run_case(model, tensors, case, 0)
        for a, b, c in zip(skipped, reference, full):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
            assert (a - c).abs().max() > 1e-2


def test_activation_checkpointing_same_gradients():
    model = OviFusion.from_variant("tiny").train()
    g = torch.Generator().manual_seed(1)
    video, audio = torch.randn(2, 48, 3, 4, 4, generator=g), torch.randn(2, 12, 20, generator=g)
    text = torch.randn(2, 8, model.cfg.video.text_dim, generator=g)
    t = torch.tensor([300.0, 800.0])

    def grads(checkpointing: bool):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        v, a = model(video, audio, t, text, text, first_frame_clean=True)
        ((v ** 2).mean() + (a ** 2).mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and all(g.abs().sum() > 0 for g in plain.values() if g.numel() > 1)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rope_tables_match_float64_reference():
    """The per-step path uses cached float32 tables; its error against float64 complex rotation."""
    head_dim, grid = 128, (31, 22, 22)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 31 * 22 * 22, 2, head_dim, generator=g, dtype=torch.float64)
    angles = video_angles(head_dim, *grid)
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    cos, sin = rope_tables("video", head_dim, grid, "cpu")
    err = (apply_rope(x.float(), cos, sin).double() - ref).abs().max().item()
    assert err < 2e-4, f"float32 RoPE error {err:.2e} vs float64 (inputs ~N(0,1), positions up to 30)"
    # bf16 inputs: the rotation error stays far below bf16's own rounding (~4e-3 relative).
    bf = apply_rope(x.to(torch.bfloat16), cos, sin).double()
    assert ((bf - ref).abs().max() / ref.abs().max()).item() < 1e-2
    # audio: only the first 22 pairs rotate, with frequencies scaled by 0.19676
    a = audio_angles(head_dim, 157, 0.19676)
    assert torch.all(a[:, 22:] == 0) and torch.allclose(a[1, :22], 0.19676 * video_angles(head_dim, 2, 1, 1)[1, :22])


def test_bf16_path_runs_close_to_reference(golden_ovi):
    meta, files = golden_ovi
    tensors = files["ovi_fusion_tiny"]
    model = load_golden_model(meta, tensors).to(torch.bfloat16)
    video, audio = run_case(model, tensors, meta["cases"]["i2v"], 0)
    assert video.dtype == torch.bfloat16
    torch.testing.assert_close(video[0].float(), tensors["outputs_bf16ref.i2v.video.0"], atol=1e-2, rtol=0)
    torch.testing.assert_close(audio[0].float(), tensors["outputs_bf16ref.i2v.audio.0"], atol=1e-2, rtol=0)


def test_full_size_keys_and_shapes_on_meta(golden):
    expected = {k: v for k, v in json.loads((golden / "ovi_fusion_full_keys.json").read_text()).items() if not k.startswith("_")}
    for name in ("720x720_5s", "960x960_5s", "960x960_10s"):
        with torch.device("meta"):
            model = OviFusion.from_variant(name)
        state = model.state_dict()
        assert list(state) == list(expected) and len(state) == 2073
        assert {k: list(v.shape) for k, v in state.items()} == {k: shape for k, (shape, _) in expected.items()}
        assert sum(p.numel() for p in model.parameters()) == 11_660_753_108
        assert not list(model.buffers())


def test_from_ovi_configs_rejects_bad_config(golden):
    meta = json.loads((golden / "ovi_fusion_tiny.json").read_text())
    with pytest.raises(ValueError, match="unknown Ovi config field"):
        OviFusion.from_ovi_configs({**meta["tiny_video_config"], "bogus": 1}, meta["tiny_audio_config"])
    with pytest.raises(ValueError, match="qk_norm"):
        OviFusion.from_ovi_configs({**meta["tiny_video_config"], "qk_norm": False}, meta["tiny_audio_config"])


def test_tiny_variant_is_deterministic():
    a, b = OviFusion.from_variant("tiny"), OviFusion.from_variant("tiny")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert a.cfg.video.text_len == 32 and a.cfg.video.text_dim == 32


@pytest.mark.parametrize("bias", [True, False])
def test_channel_last_conv1d_is_the_convolution(bias):
    """The audio stem's unfolded-window matmul equals torch's Conv1d (fp32: rounding only), in the
    output and in every gradient, and keeps nn.Conv1d's parameter names and shapes (checkpoint keys)."""
    from distill.models.layers import ChannelLastConv1d
    torch.manual_seed(0)
    ours = ChannelLastConv1d(12, 40, kernel_size=7, padding=3, bias=bias).double()
    reference = copy.deepcopy(ours)
    x = torch.randn(3, 29, 12, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = ours(x)
    out_ref = torch.nn.functional.conv1d(x_ref.transpose(1, 2), reference.weight, reference.bias, padding=3).transpose(1, 2)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    if bias:
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad)
    assert [name for name, _ in ours.named_parameters()] == (["weight", "bias"] if bias else ["weight"])
    assert ours.weight.shape == (40, 12, 7)


@pytest.mark.parametrize("kwargs", [{"stride": 2}, {"dilation": 2}, {"groups": 2}, {"padding": "same"}])
def test_channel_last_conv1d_refuses_what_it_does_not_compute(kwargs):
    from distill.models.layers import ChannelLastConv1d
    with pytest.raises(ValueError, match="stride 1"):
        ChannelLastConv1d(4, 8, kernel_size=3, **kwargs)


def test_audio_stem_bench_agrees_with_torch_conv1d(tmp_path):
    """bench/audio_stem.py (CPU, a narrow stem): both paths run and give the same stem."""
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "audio_stem.json"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "bench/audio_stem.py"), "--dim", "32", "--batch", "1", "--repeats", "1",
                    "--dtype", "float32", "--device", "cpu", "--out", str(out)], check=True, cwd=repo)
    (row,) = json.loads(out.read_text())
    assert row["tokens"] == 157 and row["dim"] == 32 and row["unfolded_matmul_ms"] > 0 and row["torch_conv1d_ms"] > 0
    assert row["max_abs_diff_out_rel"] < 1e-5 and row["max_abs_diff_input_grad_rel"] < 1e-5
