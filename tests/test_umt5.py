"""umT5 text encoder: golden parity through Wan's .pth path, the full-size key manifest, strict
loading errors, Wan's tokenizer contract, and the batch-max padding fast path."""
import dataclasses
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from precompute.encoders.umt5 import (  # noqa: E402
    EOS_ID,
    PAD_ID,
    TIED_EMBEDDING_KEY,
    UMT5_TINY,
    UMT5_XXL,
    TextEncoder,
    assign_weights,
    TokenizedPrompts,
    build_encoder_model,
    build_tiny_tokenizer,
    check_state_dict,
    clean_prompt,
    convert_wan_state_dict,
    encode_tokens,
    load_encoder_model,
    load_hf_folder,
    load_tokenizer,
    load_wan_checkpoint,
    tokenize,
    wan_expected_shapes,
)

ATOL, RTOL = 2e-5, 1e-5  # golden/README.md §5


@pytest.fixture(scope="module")
def golden_tensors(golden):
    return load_file(golden / "umt5_tiny.safetensors")


@pytest.fixture(scope="module")
def wan_tiny_state(golden_tensors):
    return {k[len("weights."):]: v for k, v in golden_tensors.items() if k.startswith("weights.")}


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory, wan_tiny_state):
    path = tmp_path_factory.mktemp("umt5") / "models_t5_umt5-tiny-enc.pth"
    torch.save(wan_tiny_state, path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_pth):
    return load_encoder_model(tiny_pth, UMT5_TINY, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


# ---------------------------------------------------------------------------------------------
# parity with Wan's T5Encoder


@pytest.mark.parametrize("case", ["batch2", "long"])
def test_golden_parity_through_wan_pth(golden, golden_tensors, tiny_model, case):
    meta = json.loads((golden / "umt5_tiny.json").read_text())["cases"][case]
    tokens = TokenizedPrompts(ids=golden_tensors[f"inputs.{case}.ids"], mask=golden_tensors[f"inputs.{case}.mask"])

    with torch.no_grad():
        encoder_out = tiny_model(input_ids=tokens.ids, attention_mask=tokens.mask).last_hidden_state
    torch.testing.assert_close(encoder_out, golden_tensors[f"outputs.{case}.encoder_out"], atol=ATOL, rtol=RTOL)

    contexts = encode_tokens(tiny_model, tokens)
    assert [c.shape[0] for c in contexts] == meta["seq_lens"]
    for i, context in enumerate(contexts):
        torch.testing.assert_close(context, golden_tensors[f"outputs.{case}.context.{i}"], atol=ATOL, rtol=RTOL)


def test_wan_pth_keeps_embedding_tied_and_casts(tiny_pth, wan_tiny_state):
    model = load_wan_checkpoint(tiny_pth, UMT5_TINY, dtype=torch.bfloat16)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert model.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(model.shared.weight, wan_tiny_state["token_embedding.weight"].bfloat16(), atol=0, rtol=0)


def test_hf_folder_loads_the_same_model(tmp_path, tiny_model, golden_tensors):
    tiny_model.save_pretrained(tmp_path / "hf")
    reloaded = load_hf_folder(tmp_path / "hf")
    assert reloaded.config._attn_implementation == "eager"
    tokens = TokenizedPrompts(ids=golden_tensors["inputs.batch2.ids"], mask=golden_tensors["inputs.batch2.mask"])
    for a, b in zip(encode_tokens(reloaded, tokens), encode_tokens(tiny_model, tokens)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# full size, on the meta device


def test_full_size_key_manifest_on_meta(golden):
    raw = json.loads((golden / "umt5_full_keys.json").read_text())
    manifest = {k: v for k, v in raw.items() if not k.startswith("_")}
    assert len(manifest) == 242

    # Our Wan-side table is the manifest, key for key, in order.
    assert list(wan_expected_shapes(UMT5_XXL).items()) == [(k, tuple(shape)) for k, (shape, _) in manifest.items()]

    wan_state = {k: torch.empty(shape, dtype=torch.bfloat16, device="meta") for k, (shape, _) in manifest.items()}
    hf_state = convert_wan_state_dict(wan_state, "manifest")
    assert len(hf_state) == 243 and hf_state[TIED_EMBEDDING_KEY] is hf_state["shared.weight"]

    model = build_encoder_model(UMT5_XXL, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(hf_state, expected, "manifest")  # same 243 keys, same shapes
    assign_weights(model, hf_state)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == raw["_param_count"]["total"] == 5_680_910_336


# ---------------------------------------------------------------------------------------------
# bad checkpoints name the key and the file


def _save_pth(path, state):
    torch.save(state, path)
    return path


def test_pth_missing_key_is_named(tmp_path, wan_tiny_state):
    state = {k: v for k, v in wan_tiny_state.items() if k != "blocks.1.ffn.fc2.weight"}
    path = _save_pth(tmp_path / "missing.pth", state)
    with pytest.raises(ValueError, match=r"missing.pth.*missing key.*blocks\.1\.ffn\.fc2\.weight"):
        load_wan_checkpoint(path, UMT5_TINY)


def test_pth_unexpected_key_is_named(tmp_path, wan_tiny_state):
    path = _save_pth(tmp_path / "extra.pth", {**wan_tiny_state, "blocks.0.attn.q.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match=r"extra.pth.*unexpected key.*blocks\.0\.attn\.q\.bias"):
        load_wan_checkpoint(path, UMT5_TINY)


def test_pth_wrong_shape_is_named(tmp_path, wan_tiny_state):
    key = "blocks.0.pos_embedding.embedding.weight"  # [buckets, heads] = [32, 4]
    path = _save_pth(tmp_path / "shape.pth", {**wan_tiny_state, key: torch.zeros(32, 5)})
    with pytest.raises(ValueError, match=rf"shape.pth.*{re.escape(key)}.*\(32, 5\).*\(32, 4\)"):
        load_wan_checkpoint(path, UMT5_TINY)


def test_pth_for_the_wrong_config_fails(tiny_pth):
    with pytest.raises(ValueError, match=r"token_embedding\.weight|missing key"):
        load_wan_checkpoint(tiny_pth, UMT5_XXL)


def test_truncated_pth_names_the_file(tmp_path, tiny_pth):
    data = tiny_pth.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_wan_checkpoint(path, UMT5_TINY)


def test_absent_files_and_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_wan_checkpoint(tmp_path / "nope.pth", UMT5_TINY)
    (tmp_path / "empty_hf").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_hf"):
        load_hf_folder(tmp_path / "empty_hf")
    with pytest.raises(FileNotFoundError, match="no_tokenizer"):
        load_tokenizer(tmp_path / "no_tokenizer")


def test_hf_folder_wrong_shape_is_named(tmp_path, tiny_model):
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    tiny_model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    weights["encoder.final_layer_norm.weight"] = torch.ones(31)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"encoder\.final_layer_norm\.weight"):
        load_hf_folder(folder)


# ---------------------------------------------------------------------------------------------
# tokenizer contract


def test_clean_prompt_is_wans_whitespace_clean():
    assert clean_prompt("  a\n\t b   c  ") == "a b c"
    assert clean_prompt("salt &amp;amp; pepper") == "salt & pepper"
    # With tags in the text ftfy leaves entities alone; Wan's two html.unescape calls do the work.
    assert clean_prompt("<S>salt &amp;amp; pepper<E>") == "<S>salt & pepper<E>"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy repairs mojibake


def test_tiny_tokenizer_has_umt5_ids(tiny_tokenizer):
    assert (tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.unk_token_id) == (0, 1, 2)
    assert 150 <= len(tiny_tokenizer) <= UMT5_TINY.vocab_size
    ids = tiny_tokenizer("A man says <S>hello<E> <AUDCAP>rain<ENDAUDCAP> \u00fc\u4e2d")["input_ids"]
    assert ids[-1] == EOS_ID and max(ids) < UMT5_TINY.vocab_size and EOS_ID not in ids[:-1]


def test_tiny_tokenizer_is_deterministic(tmp_path, tiny_tokenizer):
    again = build_tiny_tokenizer(tmp_path / "again")
    text = "The train arrives; a dog barks twice."
    assert again(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_tokenize_pads_truncates_and_appends_eos(tiny_tokenizer):
    text_len = 16
    tokens = tokenize(tiny_tokenizer, ["a cat", "word " * 40], text_len)
    assert tokens.ids.shape == tokens.mask.shape == (2, text_len)
    short, long = tokens.lengths
    assert long == text_len and tokens.ids[1, -1] == EOS_ID  # truncated, EOS kept last
    assert tokens.ids[0, short - 1] == EOS_ID and (tokens.ids[0, short:] == PAD_ID).all()
    assert tokens.mask[0, :short].all() and not tokens.mask[0, short:].any()


def test_tokenize_cleans_first(tiny_tokenizer):
    messy = tokenize(tiny_tokenizer, ["  salt &amp;amp;\n pepper "], 16)
    clean = tokenize(tiny_tokenizer, ["salt & pepper"], 16)
    assert torch.equal(messy.ids, clean.ids)


def test_tokenize_rejects_a_bare_string(tiny_tokenizer):
    with pytest.raises(ValueError, match="list of strings"):
        tokenize(tiny_tokenizer, "a cat", 16)


# ---------------------------------------------------------------------------------------------
# the encoder end to end


PROMPTS = [
    "A cat jumps onto the table. <AUDCAP>glass breaking<ENDAUDCAP>",
    "A girl says <S>I told you it would work.<E> " * 3,  # longer than text_len: truncated
    "rain",
]


def test_encode_returns_trimmed_rows_and_their_ids(tiny_model, tiny_tokenizer):
    encoder = TextEncoder(tiny_model, tiny_tokenizer, text_len=32)
    out = encoder.encode_with_ids(PROMPTS)
    tokens = encoder.tokenize(PROMPTS)
    assert [c.shape for c in out.contexts] == [(n, UMT5_TINY.d_model) for n in tokens.lengths]
    assert out.contexts[1].shape[0] == 32
    for ids, row, n in zip(out.text_ids, tokens.ids, tokens.lengths):
        assert ids.dtype == torch.int32  # precompute/shards.py stores text_ids as int32
        assert torch.equal(ids.long(), row[:n]) and ids[-1] == EOS_ID and PAD_ID not in ids.tolist()
    for a, b in zip(encoder.encode(PROMPTS), out.contexts):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("text_len", [48, 128])  # the long prompt is truncated at 48, not at 128
def test_batch_max_padding_equals_text_len_padding(tiny_model, tiny_tokenizer, text_len):
    full = TextEncoder(tiny_model, tiny_tokenizer, text_len=text_len).encode_with_ids(PROMPTS)
    fast_encoder = TextEncoder(tiny_model, tiny_tokenizer, text_len=text_len, pad_to_longest=True)
    width = fast_encoder.tokenize(PROMPTS).ids.shape[1]
    assert width == max(len(ids) for ids in full.text_ids) and (width < text_len or text_len == 48)
    fast = fast_encoder.encode_with_ids(PROMPTS)
    for a, b in zip(fast.text_ids, full.text_ids):
        assert torch.equal(a, b)
    for a, b in zip(fast.contexts, full.contexts):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # float32 reduction order only


def test_encoder_refuses_a_tokenizer_larger_than_its_vocabulary(tiny_tokenizer):
    model = build_encoder_model(dataclasses.replace(UMT5_TINY, vocab_size=64), device="cpu")
    with pytest.raises(ValueError, match="vocabulary"):
        TextEncoder(model, tiny_tokenizer, text_len=16)
