"""MMAudio 16 kHz audio path: log-mel front-end and the audio VAE against the official golden run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from precompute.encoders.mel import LogMel, MelConfig, mel_constants, num_mel_frames, slaney_mel_filterbank
from precompute.encoders.mmaudio_vae import (
    TINY_VAE, AudioVAE, CheckpointError, MMAudioVAE, VAEConfig, checkpoint_template, num_latent_frames,
    random_checkpoint,
)

WEIGHTS, BAKED = "weights.", "weights_after_remove_weight_norm."


@pytest.fixture(scope="module")
def fixture(golden):
    return load_file(str(golden / "mmaudio_vae_tiny.safetensors"))


def with_prefix(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def official_file(fixture, tmp_path_factory):
    """The golden weights written the way `v1-16.pth` is: a plain torch.save'd state dict."""
    path = tmp_path_factory.mktemp("mmaudio") / "v1-16.pth"
    torch.save(with_prefix(fixture, WEIGHTS), path)
    return path


@pytest.fixture(scope="module")
def vae(official_file):
    return AudioVAE.from_file(official_file, cfg=TINY_VAE)


# ------------------------------------------------------------------------------------------ mel

def test_mel_constants_match_librosa(fixture):
    torch.testing.assert_close(slaney_mel_filterbank(MelConfig()), fixture["constants.mel_basis"], atol=1e-8, rtol=0)
    _, window = mel_constants(MelConfig(), torch.device("cpu"))
    torch.testing.assert_close(window, fixture["constants.hann_window"], atol=0, rtol=0)


def test_mel_matches_golden(fixture):
    mel = LogMel()(fixture["inputs.waveform"])
    torch.testing.assert_close(mel, fixture["outputs.mel"], atol=1e-5, rtol=0)


def test_mel_frames_and_silence():
    for n, frames in ((80_000, 312), (80_384, 314), (80_667, 315)):
        assert num_mel_frames(n) == frames
    mel = LogMel()(torch.zeros(1, 80_384))
    assert mel.shape == (1, 80, 314)
    assert torch.all(mel == -5.0)  # log10 of the 1e-5 floor


def test_mel_clamps_out_of_range_input(fixture):
    wav = fixture["inputs.waveform"]
    loud = LogMel()(wav * 4)
    torch.testing.assert_close(loud, LogMel()((wav * 4).clamp(-1, 1)), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ VAE

def test_full_size_keys_and_param_count(golden):
    manifest = json.loads((golden / "mmaudio_vae_full_keys.json").read_text())
    template = checkpoint_template(VAEConfig())
    expected = {k: v for k, v in manifest.items() if not k.startswith("_")}
    assert list(template) == list(expected)
    assert {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in template.items()} == expected
    with torch.device("meta"):
        model = MMAudioVAE(VAEConfig())
    counts = manifest["_param_count"]
    assert sum(p.numel() for p in model.parameters()) == counts["total_params"] == 171_657_218
    assert sum(p.numel() for p in model.encoder.parameters()) == counts["encoder"]
    assert sum(p.numel() for p in model.decoder.parameters()) == counts["decoder"]


def test_weight_baking_matches_remove_weight_norm(vae, fixture):
    baked = with_prefix(fixture, BAKED)
    state = vae.vae.state_dict()
    assert set(state) == set(baked)
    for key, ref in baked.items():
        torch.testing.assert_close(state[key], ref, atol=1e-7, rtol=1e-6, msg=key)


def test_encode_matches_golden(vae, fixture):
    mel = vae.mel(fixture["inputs.waveform"])
    normalized = (mel - vae.vae.data_mean) / vae.vae.data_std
    torch.testing.assert_close(normalized, fixture["outputs.mel_normalized"], atol=1e-5, rtol=0)
    moments = vae.vae.encode_moments(fixture["outputs.mel"])
    torch.testing.assert_close(moments, fixture["outputs.encoder_moments"], atol=1e-5, rtol=1e-5)

    posterior = vae.posterior(fixture["inputs.waveform"])
    latent = vae.encode(fixture["inputs.waveform"])
    assert latent.shape == (1, 46, 20)  # channel-last: what Ovi's DiT consumes (latent_mean[0].T)
    torch.testing.assert_close(latent, fixture["outputs.latent_mean"].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        posterior.logvar, fixture["outputs.latent_logvar_clamped"].transpose(1, 2), atol=1e-5, rtol=1e-5
    )


def test_decode_matches_golden(vae, fixture):
    latent = fixture["outputs.latent_mean"].transpose(1, 2)
    mel = vae.decode(latent)
    assert mel.shape == (1, 80, 92)
    torch.testing.assert_close(mel, fixture["outputs.decoded_mel"], atol=2e-5, rtol=0)
    raw = vae.vae.decoder(fixture["outputs.latent_mean"])
    torch.testing.assert_close(raw, fixture["outputs.decoder_raw_output"], atol=2e-5, rtol=0)


def test_latent_rate_five_seconds():
    vae = AudioVAE.tiny(seed=0)
    wav = 0.3 * torch.sin(torch.arange(80_384) * 0.05).repeat(2, 1)
    latent = vae.encode(wav)
    assert latent.shape == (2, 157, 20)
    assert vae.encode(wav[:, :-1]).shape == (2, 156, 20)  # 313 mel frames floor to 156 latents
    assert vae.decode(latent).shape == (2, 80, 314)
    assert num_latent_frames(80_384) == 157 and num_latent_frames(80_383) == 156
    assert num_latent_frames(160_667) == 313 and num_latent_frames(160_768) == 314  # spec/data.md §3.3


def test_tiny_uses_the_golden_init_recipe(fixture):
    """N(0, 0.02) drawn in state-dict order: equal draws prove our key order is the official one."""
    ours = random_checkpoint(TINY_VAE, seed=0)
    for key, ref in with_prefix(fixture, WEIGHTS).items():
        if key not in ("data_mean", "data_std"):
            assert torch.equal(ours[key], ref), key


def test_bfloat16_load_bakes_in_float32(official_file, vae, fixture):
    bf16 = AudioVAE.from_file(official_file, dtype=torch.bfloat16, cfg=TINY_VAE)
    bf16_state = bf16.vae.state_dict()
    for key, ref in vae.vae.state_dict().items():
        assert torch.equal(bf16_state[key], ref.to(torch.bfloat16)), key
    latent = bf16.encode(fixture["inputs.waveform"])
    assert latent.dtype == torch.bfloat16
    torch.testing.assert_close(latent.float(), fixture["outputs.latent_mean"].transpose(1, 2), atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------- bad checkpoints

def bad_files(tmp_path, state):
    """name -> (path, text the error message must contain)."""
    def save(name, sd):
        torch.save(sd, tmp_path / name)
        return tmp_path / name

    missing = dict(state)
    missing.pop("decoder.up.1.upsample.conv.weight")
    good = save("good.pth", state)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {
        "missing": (save("missing.pth", missing), "decoder.up.1.upsample.conv.weight"),
        "unexpected": (save("extra.pth", {**state, "encoder.down.0.attn.0.qkv.weight": torch.zeros(36, 12, 1)}),
                       "encoder.down.0.attn.0.qkv.weight"),
        "shape": (save("shape.pth", {**state, "encoder.conv_in.weight": torch.zeros(12, 80, 5)}),
                  "encoder.conv_in.weight"),
        "dtype": (save("dtype.pth", {**state, "data_std": state["data_std"].half()}), "data_std"),
        "truncated": (truncated, "truncated.pth"),
        "nested": (save("nested.pth", {"model": state}), "nested.pth"),
    }


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "dtype", "truncated", "nested"])
def test_bad_checkpoint_names_the_problem(tmp_path, fixture, case):
    path, needle = bad_files(tmp_path, with_prefix(fixture, WEIGHTS))[case]
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        AudioVAE.from_file(path, cfg=TINY_VAE)


def test_absent_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        AudioVAE.from_file(tmp_path / "absent.pth")


def test_bad_inputs_are_rejected(vae):
    with pytest.raises(ValueError, match=r"\[B, L, 20\]"):
        vae.decode(torch.zeros(1, 20, 46))
    with pytest.raises(ValueError, match="too short"):
        vae.encode(torch.zeros(1, 500))
