"""BigVGAN v1 16 kHz vocoder (MMAudio's best_netG.pt) against the official golden run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from precompute.encoders.bigvgan import (
    LEGACY_G, LEGACY_V, PARAM_G, PARAM_V, TINY_VOCODER, Vocoder, VocoderConfig, checkpoint_template,
    kaiser_sinc_filter, random_checkpoint,
)
from precompute.encoders.mmaudio_vae import TINY_VAE, AudioVAE, CheckpointError

WEIGHTS, FOLDED = "weights.", "weights_after_remove_weight_norm."


@pytest.fixture(scope="module")
def fixture(golden):
    return load_file(str(golden / "bigvgan_tiny.safetensors"))


def with_prefix(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def to_legacy(name: str) -> str:
    return name.replace(PARAM_G, LEGACY_G).replace(PARAM_V, LEGACY_V)


@pytest.fixture(scope="module")
def legacy_state(fixture):
    """The golden weights under the names MMAudio's best_netG.pt uses (weight_g / weight_v)."""
    return {to_legacy(k): v for k, v in with_prefix(fixture, WEIGHTS).items()}


@pytest.fixture(scope="module")
def official_file(legacy_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("bigvgan") / "best_netG.pt"
    torch.save({"generator": legacy_state}, path)
    return path


@pytest.fixture(scope="module")
def vocoder(official_file):
    return Vocoder.from_file(official_file, cfg=TINY_VOCODER)


def test_full_size_keys_and_param_count(golden):
    manifest = json.loads((golden / "bigvgan_full_keys.json").read_text())
    as_json = lambda tensors: {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in tensors.items()}

    parametrized = checkpoint_template(VocoderConfig(), naming="parametrized")
    assert list(parametrized) == list(manifest["_state_dict"])
    assert as_json(parametrized) == manifest["_state_dict"]

    legacy = checkpoint_template(VocoderConfig(), naming="legacy")
    assert as_json(legacy) == {to_legacy(k): v for k, v in manifest["_state_dict"].items()}
    filters = [k for k in legacy if k.endswith(".filter")]
    assert filters == manifest["_param_count"]["buffers_in_state_dict"] and len(filters) == 218
    assert len(legacy) == manifest["_param_count"]["num_tensors"] == 784
    params = sum(t.numel() for k, t in legacy.items() if not k.endswith(".filter"))
    assert params == manifest["_param_count"]["total_params_with_weight_norm"] == 112_231_250

    with torch.device("meta"):
        folded = Vocoder(VocoderConfig()).state_dict()
    assert as_json(folded) == manifest["after_remove_weight_norm"]


def test_weight_norm_folding_matches_remove_weight_norm(vocoder, fixture):
    folded = with_prefix(fixture, FOLDED)
    state = vocoder.state_dict()
    assert set(state) == set(folded)
    for key, ref in folded.items():
        torch.testing.assert_close(state[key], ref, atol=1e-6, rtol=1e-5, msg=key)


def test_parametrized_names_load_the_same(fixture, vocoder):
    modern = Vocoder.from_state_dict(with_prefix(fixture, WEIGHTS), TINY_VOCODER).state_dict()
    for key, ref in vocoder.state_dict().items():
        assert torch.equal(modern[key], ref), key


def test_antialias_filter_matches_checkpoint_buffers(fixture):
    ours = kaiser_sinc_filter(0.25, 0.3, 12)
    for key, ref in with_prefix(fixture, WEIGHTS).items():
        if key.endswith(".filter"):
            torch.testing.assert_close(ours, ref, atol=1e-7, rtol=0, msg=key)


@pytest.mark.parametrize("mel_name, wave_name", [
    ("inputs.mel", "outputs.waveform"),
    ("inputs.decoded_mel", "outputs.waveform_from_decoded_mel"),  # Ovi's decode path
])
def test_waveform_matches_golden(vocoder, fixture, mel_name, wave_name):
    mel = fixture[mel_name]
    with torch.no_grad():
        wave = vocoder(mel)
    assert wave.shape == (1, 1, 256 * mel.shape[-1])
    torch.testing.assert_close(wave, fixture[wave_name], atol=1e-4, rtol=0)


def test_ovi_audio_decode_path(golden, vocoder, fixture):
    """latent -> AudioVAE.decode -> vocoder, chaining the two golden runs as Ovi's wrapped_decode does."""
    vae_fixture = load_file(str(golden / "mmaudio_vae_tiny.safetensors"))
    vae_state = {k[len(WEIGHTS):]: v for k, v in vae_fixture.items() if k.startswith(WEIGHTS)}
    vae = AudioVAE.from_state_dict(vae_state, TINY_VAE)
    with torch.no_grad():
        wave = vocoder(vae.decode(vae_fixture["outputs.latent_mean"].transpose(1, 2)))
    torch.testing.assert_close(wave, fixture["outputs.waveform_from_decoded_mel"], atol=1e-4, rtol=0)


def test_tiny_uses_the_golden_init_recipe(legacy_state):
    """Equal draws in checkpoint order prove the key order (bias, g, v per conv) is the official one."""
    ours = random_checkpoint(TINY_VOCODER, seed=0)
    assert set(ours) == set(legacy_state)
    for key, ref in legacy_state.items():
        assert torch.equal(ours[key], ref), key


# ---------------------------------------------------------------------------- bad checkpoints

def bad_files(tmp_path, state):
    """name -> (path, text the error message must contain)."""
    def save(name, obj):
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    missing = dict(state)
    missing.pop("resblocks.4.convs2.1.weight_v")
    good = save("good.pt", {"generator": state})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {
        "missing": (save("missing.pt", {"generator": missing}), "resblocks.4.convs2.1.weight_v"),
        "shape": (save("shape.pt", {"generator": {**state, "ups.2.0.weight_g": torch.ones(8, 1, 1)}}),
                  "ups.2.0.weight_g"),
        "dtype": (save("dtype.pt", {"generator": {**state, "conv_post.bias": state["conv_post.bias"].double()}}),
                  "conv_post.bias"),
        "unwrapped": (save("plain.pt", state), "generator"),
        "truncated": (truncated, "truncated.pt"),
    }


@pytest.mark.parametrize("case", ["missing", "shape", "dtype", "unwrapped", "truncated"])
def test_bad_checkpoint_names_the_problem(tmp_path, legacy_state, case):
    path, needle = bad_files(tmp_path, legacy_state)[case]
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        Vocoder.from_file(path, cfg=TINY_VOCODER)


def test_wrong_mel_shape_is_rejected(vocoder):
    with pytest.raises(ValueError, match=r"\[B, 80, T\]"):
        vocoder(torch.zeros(1, 92, 80))
