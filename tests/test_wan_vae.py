"""Wan2.2 VAE: golden parity with the official code, checkpoint loading, causality, input checks."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from precompute.encoders.wan_vae import CheckpointError, WanVideoVAE, build_on_meta, latent_constants
from precompute.encoders.wan_vae_modules import WanVAEConfig, WanVAEModel, parameter_count

LATENT_TOL = dict(atol=2e-6, rtol=1e-5)
DECODED_TOL = dict(atol=1e-7, rtol=1e-5)


@pytest.fixture(scope="module")
def fixture(golden: Path) -> dict[str, torch.Tensor]:
    return load_file(golden / "wan22_vae_tiny.safetensors")


@pytest.fixture(scope="module")
def golden_weights(fixture) -> dict[str, torch.Tensor]:
    return {k[len("weights."):]: v for k, v in fixture.items() if k.startswith("weights.")}


@pytest.fixture(scope="module")
def vae(golden_weights) -> WanVideoVAE:
    model = WanVAEModel(WanVAEConfig.tiny())
    model.load_state_dict(golden_weights, strict=True)
    return WanVideoVAE(model)


@pytest.fixture(scope="module")
def clip_latent(vae, fixture) -> torch.Tensor:
    return vae.encode(fixture["inputs.video"][None])


# ----------------------------------------------------------------------------- golden parity

def test_raw_posterior_mean_matches_official(vae, fixture):
    mu = vae.model.encode(fixture["inputs.video"][None])
    torch.testing.assert_close(mu[0], fixture["outputs.latent_raw_mu"], **LATENT_TOL)


def test_normalised_latent_matches_official(clip_latent, fixture):
    z = clip_latent
    assert z.shape == (1, 48, 3, 2, 3) and z.dtype == torch.float32
    torch.testing.assert_close(z[0], fixture["outputs.latent_normalized"], **LATENT_TOL)


def test_decode_matches_official(vae, fixture):
    latent = fixture["outputs.latent_normalized"][None]
    torch.testing.assert_close(vae.decode(latent, clamp=False)[0], fixture["outputs.decoded_unclamped"],
                               **DECODED_TOL)
    torch.testing.assert_close(vae.decode(latent)[0], fixture["outputs.decoded"], **DECODED_TOL)


def test_decode_clamps_to_unit_range(fixture):
    vae = WanVideoVAE.tiny(seed=0)
    with torch.no_grad():   # RMS norms make the decoder scale-invariant, so push the output bias instead
        vae.model.decoder.head[2].bias.copy_(torch.linspace(-3, 3, 12))
    latent = fixture["outputs.latent_normalized"][None]
    unclamped, clamped = vae.decode(latent, clamp=False), vae.decode(latent)
    assert unclamped.min() < -1 and unclamped.max() > 1
    torch.testing.assert_close(clamped, unclamped.clamp(-1, 1), atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["BCHW", "BC1HW"])
def test_image_path_matches_official(vae, fixture, layout):
    image = fixture["inputs.image"][None]                      # [1,3,1,H,W]
    z = vae.encode_image(image[:, :, 0] if layout == "BCHW" else image)
    torch.testing.assert_close(z[0], fixture["outputs.image_latent_normalized"], **LATENT_TOL)
    torch.testing.assert_close(vae.decode(z, clamp=False)[0], fixture["outputs.image_decoded_unclamped"],
                               **DECODED_TOL)


def test_latent_constants_are_bit_exact(fixture):
    mean, inv_std = latent_constants()
    assert torch.equal(mean, fixture["constants.latent_mean"])
    assert torch.equal(inv_std, fixture["constants.latent_inv_std"])


def test_tiny_is_the_fixture_construction(golden, golden_weights):
    spec = json.loads((golden / "wan22_vae_tiny.json").read_text())["tiny_config"]["WanVAE_"]
    cfg = WanVAEConfig.tiny()
    assert (cfg.dim, cfg.dec_dim, cfg.z_dim, list(cfg.dim_mult), cfg.num_res_blocks, list(cfg.temporal_downsample)) == (
        spec["dim"], spec["dec_dim"], spec["z_dim"], spec["dim_mult"], spec["num_res_blocks"], spec["temperal_downsample"])
    tiny = WanVideoVAE.tiny(seed=0).model.state_dict()
    assert sorted(tiny) == sorted(golden_weights)
    assert all(torch.equal(tiny[k], v) for k, v in golden_weights.items())   # same seeded N(0, 0.02) init
    assert not torch.equal(WanVideoVAE.tiny(seed=1).model.encoder.conv1.weight, tiny["encoder.conv1.weight"])


# ----------------------------------------------------------------------------- full-size structure

def test_full_size_state_dict_equals_official_manifest(golden):
    manifest = json.loads((golden / "wan22_vae_full_keys.json").read_text())
    expected = {k: v for k, v in manifest.items() if not k.startswith("_")}
    model = build_on_meta(WanVAEConfig.real())
    got = {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in model.state_dict().items()}
    assert list(got) == list(expected)                      # same keys, same order
    assert got == {k: [list(s), d] for k, (s, d) in expected.items()}
    assert parameter_count(model) == manifest["_param_count"]["total"] == 704_688_668
    assert parameter_count(model.encoder) == manifest["_param_count"]["encoder"]
    assert parameter_count(model.decoder) == manifest["_param_count"]["decoder"]


# ----------------------------------------------------------------------------- checkpoint loading

def _save(state: dict, tmp_path: Path) -> Path:
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save(state, path)
    return path


def test_from_file_loads_official_format(golden_weights, fixture, tmp_path):
    path = _save(dict(golden_weights), tmp_path)
    vae = WanVideoVAE.from_file(path, config=WanVAEConfig.tiny())
    loaded = vae.model.state_dict()
    assert sorted(loaded) == sorted(golden_weights)
    assert all(torch.equal(loaded[k], v) for k, v in golden_weights.items())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in vae.model.parameters())
    z = vae.encode_image(fixture["inputs.image"][None])
    torch.testing.assert_close(z[0], fixture["outputs.image_latent_normalized"], **LATENT_TOL)


def test_from_file_casts_to_requested_dtype(golden_weights, tmp_path):
    vae = WanVideoVAE.from_file(_save(dict(golden_weights), tmp_path), dtype=torch.bfloat16,
                                config=WanVAEConfig.tiny())
    assert {p.dtype for p in vae.model.parameters()} == {torch.bfloat16}


def _missing(sd):
    del sd["decoder.head.2.bias"]
    return "decoder.head.2.bias"


def _unexpected(sd):
    sd["decoder.head.3.weight"] = torch.zeros(1)
    return "decoder.head.3.weight"


def _wrong_shape(sd):
    sd["encoder.middle.1.to_qkv.weight"] = sd["encoder.middle.1.to_qkv.weight"][:-1].clone()
    return "encoder.middle.1.to_qkv.weight"


def _wrong_dtype(sd):
    sd["conv2.weight"] = sd["conv2.weight"].half()
    return "conv2.weight"


@pytest.mark.parametrize("corrupt", [_missing, _unexpected, _wrong_shape, _wrong_dtype])
def test_bad_state_dict_names_file_and_key(golden_weights, tmp_path, corrupt):
    state = dict(golden_weights)
    key = corrupt(state)
    path = _save(state, tmp_path)
    with pytest.raises(CheckpointError) as err:
        WanVideoVAE.from_file(path, config=WanVAEConfig.tiny())
    assert key in str(err.value) and str(path) in str(err.value)


def test_truncated_file_names_file(golden_weights, tmp_path):
    path = _save(dict(golden_weights), tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="Wan2.2_VAE.pth"):
        WanVideoVAE.from_file(path, config=WanVAEConfig.tiny())


def test_random_bytes_names_file(tmp_path):
    path = tmp_path / "Wan2.2_VAE.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                     .numpy().tobytes())
    with pytest.raises(CheckpointError, match="Wan2.2_VAE.pth"):
        WanVideoVAE.from_file(path, config=WanVAEConfig.tiny())


def test_wrapped_checkpoint_is_refused(golden_weights, tmp_path):
    path = _save({"state_dict": dict(golden_weights)}, tmp_path)
    with pytest.raises(CheckpointError, match="state_dict"):
        WanVideoVAE.from_file(path, config=WanVAEConfig.tiny())


def test_missing_file_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        WanVideoVAE.from_file(tmp_path / "nope.pth", config=WanVAEConfig.tiny())


# ----------------------------------------------------------------------------- causality

def test_first_latent_frame_is_the_first_pixel_frame_alone(vae, fixture, clip_latent):
    # bitwise: the shards store the clip latent and use its frame 0 as the i2v condition
    assert torch.equal(clip_latent[:, :, :1], vae.encode_image(fixture["inputs.video"][None, :, 0]))


def test_latent_frames_do_not_see_the_future(vae, fixture, clip_latent):
    changed = fixture["inputs.video"][None].clone()
    changed[:, :, 5:] = -changed[:, :, 5:]          # only the last 4-frame chunk
    z, z_changed = clip_latent, vae.encode(changed)
    torch.testing.assert_close(z_changed[:, :, :2], z[:, :, :2], atol=0, rtol=0)
    assert (z_changed[:, :, 2] - z[:, :, 2]).abs().max() > 1e-3


def test_decoded_frames_do_not_see_the_future(vae, fixture):
    latent = fixture["outputs.latent_normalized"][None]
    changed = latent.clone()
    changed[:, :, 2] = 0.0
    x, x_changed = vae.decode(latent, clamp=False), vae.decode(changed, clamp=False)
    torch.testing.assert_close(x_changed[:, :, :5], x[:, :, :5], atol=0, rtol=0)   # 1 + 4 frames from latents 0, 1
    assert (x_changed[:, :, 5:] - x[:, :, 5:]).abs().max() > 1e-4


def test_batch_items_are_independent(vae, fixture, clip_latent):
    video = fixture["inputs.video"][None]
    z = vae.encode(torch.cat([video, video.flip(-1)]))
    torch.testing.assert_close(z[:1], clip_latent, **LATENT_TOL)
    torch.testing.assert_close(z[1:], vae.encode(video.flip(-1)), **LATENT_TOL)


def test_bfloat16_model_runs_close_to_float32(vae, golden_weights, fixture, tmp_path):
    vae_bf16 = WanVideoVAE.from_file(_save(dict(golden_weights), tmp_path), dtype=torch.bfloat16,
                                     config=WanVAEConfig.tiny())
    z = vae_bf16.encode(fixture["inputs.video"][None])
    assert z.dtype == torch.float32
    torch.testing.assert_close(z[0], fixture["outputs.latent_normalized"], atol=5e-2, rtol=0)
    x = vae_bf16.decode(z)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 9, 32, 48)


# ----------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("shape, message", [
    ((3, 9, 32, 48), r"\[B,3,F,H,W\]"),
    ((1, 4, 9, 32, 48), r"\[B,3,F,H,W\]"),
    ((1, 3, 8, 32, 48), "4k\\+1"),
    ((1, 3, 9, 40, 48), "multiples of 16"),
    ((1, 3, 9, 32, 24), "multiples of 16"),
])
def test_encode_rejects_bad_video(vae, shape, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))


def test_encode_rejects_integer_video(vae):
    with pytest.raises(ValueError, match="float"):
        vae.encode(torch.zeros(1, 3, 1, 32, 32, dtype=torch.uint8))


def test_encode_image_rejects_a_clip(vae):
    with pytest.raises(ValueError, match="image"):
        vae.encode_image(torch.zeros(1, 3, 5, 32, 32))


@pytest.mark.parametrize("shape", [(48, 3, 2, 3), (1, 16, 3, 2, 3)])
def test_decode_rejects_bad_latent(vae, shape):
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.zeros(shape))
