"""bench/inference.py runs (tiny models, CPU), and the fast Wan2.2 VAE decode options it times
compute the frame-by-frame decode's numbers: chunked calls (frame 0 alone or inside the first chunk),
channels-last layout, the official golden output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.inference import parse_variant
from bench.launching import pythonpath_with
from precompute.encoders.wan_vae import DecodeOptions, WanVideoVAE, denormalize_latent
from precompute.encoders import wan_vae_modules
from precompute.encoders.wan_vae_modules import WanVAEConfig, WanVAEModel, decode_chunks

REPO = Path(__file__).resolve().parents[1]
DECODED_TOL = dict(atol=1e-7, rtol=1e-5)   # tests/test_wan_vae.py's tolerance against the official code


@pytest.fixture(scope="module")
def vae() -> WanVideoVAE:
    return WanVideoVAE.tiny(seed=0)


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    return torch.randn(1, 48, 7, 3, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def per_frame(vae, latent) -> torch.Tensor:
    return vae.decode(latent, clamp=False)


# ----------------------------------------------------------------------------- chunked decode

def test_decode_chunks():
    assert decode_chunks(31, 5) == [(0, 1)] + [(i, i + 5) for i in range(1, 31, 5)]
    assert decode_chunks(7, 3, first_alone=False) == [(0, 3), (3, 6), (6, 7)]
    assert decode_chunks(7, 1) == decode_chunks(7, 1, first_alone=False) == [(i, i + 1) for i in range(7)]
    assert decode_chunks(1, 4) == [(0, 1)]
    assert decode_chunks(3, 8, first_alone=False) == [(0, 3)]
    with pytest.raises(ValueError):
        decode_chunks(5, 0)
    with pytest.raises(ValueError):
        DecodeOptions(chunk=0)


@pytest.mark.parametrize("conv_as_2d", [False, True], ids=["conv3d", "conv2d_taps"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last"])
@pytest.mark.parametrize("first_alone", [True, False], ids=["frame0_alone", "frame0_in_chunk"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7])
def test_chunked_decode_equals_frame_by_frame(vae, latent, per_frame, chunk, first_alone, channels_last, conv_as_2d):
    out = vae.decode(latent, clamp=False, options=DecodeOptions(chunk, first_alone, channels_last, conv_as_2d))
    assert out.shape == per_frame.shape == (1, 3, 1 + 4 * 6, 48, 64)
    torch.testing.assert_close(out, per_frame, **DECODED_TOL)
    vae.decode(latent, options=DecodeOptions())   # back to contiguous weights for the next case


def test_default_decode_is_bitwise_the_frame_by_frame_loop(vae, latent, per_frame):
    """The default options are the official loop (one latent frame per call, NCDHW, eager)."""
    model = vae.model
    mu = denormalize_latent(latent, vae.latent_mean, vae.latent_inv_std)
    with torch.no_grad():
        x = model.conv2(mu)
        cache = {}
        frames = [model.decoder(x[:, :, i:i + 1], cache, first_chunk=i == 0) for i in range(x.shape[2])]
        from precompute.encoders.wan_vae_modules import unpatchify
        ref = unpatchify(torch.cat(frames, dim=2)).float()
    assert torch.equal(per_frame, ref)


@pytest.mark.parametrize("conv_as_2d", [False, True], ids=["conv3d", "conv2d_taps"])
def test_32bit_splits_keep_the_numbers(vae, latent, per_frame, monkeypatch, conv_as_2d):
    """Convs and per-frame ops larger than MAX_ELEMENTS are cut along time; forced here at tiny size."""
    calls = []
    monkeypatch.setattr(wan_vae_modules, "MAX_ELEMENTS", 24 * 16 * 24 * 3)
    monkeypatch.setattr(torch.nn.Conv3d, "forward", lambda self, x: calls.append(x.shape[2]) or self._conv_forward(
        x, self.weight, self.bias))
    out = vae.decode(latent, clamp=False, options=DecodeOptions(7, True, True, conv_as_2d))
    torch.testing.assert_close(out, per_frame, **DECODED_TOL)
    if not conv_as_2d:
        assert len(calls) > 100 and min(calls) < max(calls)    # the long chunks were cut
    vae.decode(latent, options=DecodeOptions())


def test_first_chunk_keeps_the_temporal_cache_start(vae, latent, per_frame):
    """In a multi-frame first chunk, the frame after frame 0 must see zeros (not frame 0) in the
    temporal upsamplers: decoding frames 0..1 together equals decoding them one by one, and
    differs from what frame 1 gives when frame 0 is fed as its temporal past."""
    two = vae.decode(latent[:, :, :2], clamp=False, options=DecodeOptions(chunk=2, first_alone=False))
    torch.testing.assert_close(two, per_frame[:, :, :5], **DECODED_TOL)
    # a decoder that (wrongly) treated frames 0..1 as a regular chunk would double frame 0 too
    model = vae.model
    mu = denormalize_latent(latent[:, :, :2], vae.latent_mean, vae.latent_inv_std)
    with torch.no_grad():
        wrong = model.decoder(model.conv2(mu), {}, first_chunk=False)
    assert wrong.shape[2] == 8 != two.shape[2]


def test_chunked_decode_matches_official_golden(golden: Path):
    fixture = load_file(golden / "wan22_vae_tiny.safetensors")
    weights = {k[len("weights."):]: v for k, v in fixture.items() if k.startswith("weights.")}
    model = WanVAEModel(WanVAEConfig.tiny())
    model.load_state_dict(weights, strict=True)
    vae = WanVideoVAE(model)
    latent = fixture["outputs.latent_normalized"][None]
    for options in (DecodeOptions(2), DecodeOptions(3, first_alone=False), DecodeOptions(2, False, True),
                    DecodeOptions(3, True, True, True)):
        out = vae.decode(latent, clamp=False, options=options)[0]
        torch.testing.assert_close(out, fixture["outputs.decoded_unclamped"], **DECODED_TOL)


def test_channels_last_weights_round_trip(vae):
    before = {k: v.clone() for k, v in vae.model.state_dict().items()}
    vae.model.decoder_memory_format(True)
    conv = vae.model.decoder.upsamples[0].upsamples[0].residual[2]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) and not conv.weight.is_contiguous()
    resample = vae.model.decoder.upsamples[0].upsamples[-1].resample[1]
    assert resample.weight.is_contiguous(memory_format=torch.channels_last)
    vae.model.decoder_memory_format(False)
    assert all(p.is_contiguous() for p in vae.model.parameters())
    after = vae.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- the script

def test_parse_variant():
    assert parse_variant("c1", None) == ("c1", dict(chunk=1, first_alone=True, channels_last=False, conv_as_2d=False,
                                                    benchmark=False, compile=False))
    name, opts = parse_variant("best+compile", "c10+bench+cl+2d")
    assert name == "c10+bench+cl+2d+compile"
    assert opts == dict(chunk=10, first_alone=True, channels_last=True, conv_as_2d=True, benchmark=True, compile=True)
    assert parse_variant("c2+fa0", None)[1]["first_alone"] is False
    with pytest.raises(ValueError):
        parse_variant("c2+fast", None)
    with pytest.raises(ValueError):
        parse_variant("best", None)


def test_smoke_run_writes_results(tmp_path):
    out = tmp_path / "res" / "inference.json"
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO)}
    proc = subprocess.run([sys.executable, "bench/inference.py", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["variant"] == "tiny" and r["device"] == "cpu"
    rows = r["decode_variants"]
    assert [row["variant"] for row in rows][:2] == ["c1", "c2+fa0+cl"] and rows[2]["variant"].endswith("+2d")
    assert all(row["seconds"] > 0 and row["max_abs_diff_vs_first"] < 1e-6 for row in rows)
    assert r["best_decode"] in {row["variant"] for row in rows}
    for key in ("e2e_student", "e2e_teacher"):
        e2e = r[key]
        assert set(e2e["stages_s"]) == {"dit", "video_decode", "audio_decode", "to_host"}
        assert e2e["total_s"] == pytest.approx(sum(e2e["stages_s"].values()), rel=1e-6)
        assert sum(e2e["shares"].values()) == pytest.approx(1.0)
        assert e2e["frames"] == [17, 32, 32, 3]
    assert r["e2e_teacher"]["forward_passes"] == 2 * r["teacher_steps_run"] == 4
    assert r["e2e_teacher"]["extrapolated_to_steps"] == 50
    s = r["summary"]
    assert s["forward_pass_ratio"] == 25
    assert s["dit_speedup"] > 0 and s["e2e_speedup"] > 0
    assert "DiT speed-up" in proc.stdout and "| c2+fa0+cl |" in proc.stdout
