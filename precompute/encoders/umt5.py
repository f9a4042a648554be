"""The frozen umT5-XXL text encoder as Wan2.2 and Ovi run it, on transformers' `UMT5EncoderModel`.

Contract (spec/data.md §2, golden/README.md §5): clean the prompt (ftfy, double html-unescape,
whitespace), tokenize with EOS, pad + truncate to `text_len`, run the encoder with the mask, and
return each prompt's rows cut to its true length (pieces + EOS). The DiT zero-pads them again.

Weights load from either a Hugging Face folder (config.json + weights) or Wan's own
`models_t5_umt5-xxl-enc-bf16.pth`, a plain state dict under Wan's key names that we rename to
transformers' names. `attn_implementation="eager"` is what makes the two bit-exact (the golden
measured sdpa at up to 3.6e-6 fp32 / 0.06 bf16 away).
"""
from __future__ import annotations

import html
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ftfy
import torch
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from precompute.checkpoints import preview, check_state_dict, read_torch_state_dict

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
TIED_EMBEDDING_KEY = "encoder.embed_tokens.weight"  # the same tensor as shared.weight


# ----------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class UMT5EncoderConfig:
    """Shape of the encoder. Defaults are umT5-XXL as Wan builds it (`umt5_xxl(encoder_only=True)`)."""

    vocab_size: int = 256_384
    d_model: int = 4096
    d_kv: int = 64            # head dim; Wan's dim_attn = num_heads * d_kv
    d_ff: int = 10_240
    num_layers: int = 24
    num_heads: int = 64
    num_buckets: int = 32
    max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"  # tanh-GELU gate, as Wan's T5FeedForward
    eps: float = 1e-6

    def to_hf(self) -> UMT5Config:
        return UMT5Config(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_kv=self.d_kv,
            d_ff=self.d_ff,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            feed_forward_proj=self.feed_forward_proj,
            layer_norm_epsilon=self.eps,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            attn_implementation="eager",
        )


UMT5_XXL = UMT5EncoderConfig()
# The golden fixture's tiny model (golden/umt5_tiny.json "tiny_config").
UMT5_TINY = UMT5EncoderConfig(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def build_encoder_model(config: UMT5EncoderConfig, device: str | torch.device = "meta",
                        dtype: torch.dtype | None = None) -> UMT5EncoderModel:
    """An eager-attention `UMT5EncoderModel`; on "meta" it allocates nothing (weights come later)."""
    with torch.device(device):
        model = UMT5EncoderModel(config.to_hf())
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Wan's .pth -> transformers names

# Wan's T5Encoder key -> UMT5EncoderModel key (golden/umt5_tiny.json "hf_transformers"); no tensor
# changes shape. gate.0 is the GELU branch (wi_0), fc1 the linear one (wi_1).
_WAN_TO_HF: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"token_embedding\.weight", "shared.weight"),
        (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
        (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
        (r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
         r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
        (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
        (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
        (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
        (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
        (r"norm\.weight", "encoder.final_layer_norm.weight"),
    )
)


def wan_key_to_hf(key: str) -> str | None:
    """The transformers name of a Wan T5Encoder key, or None if the key is not Wan's."""
    for pattern, replacement in _WAN_TO_HF:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return None


def convert_wan_state_dict(wan_state: Mapping[str, Tensor], source: str | Path) -> dict[str, Tensor]:
    """Rename Wan's keys to transformers' and add the tied input embedding (same tensor, no copy).

    Raises ValueError naming `source` and the key for a key Wan's encoder does not have.
    """
    unknown = [key for key in wan_state if wan_key_to_hf(key) is None]
    if unknown:
        raise ValueError(f"{source}: unexpected key(s) for Wan's umT5 encoder: {preview(unknown)}")
    hf_state = {wan_key_to_hf(key): tensor for key, tensor in wan_state.items()}
    if "shared.weight" in hf_state:
        hf_state[TIED_EMBEDDING_KEY] = hf_state["shared.weight"]
    return hf_state


def wan_expected_shapes(config: UMT5EncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every key of Wan's T5Encoder state dict with its shape, in Wan's order (no buffers)."""
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    shapes: dict[str, tuple[int, ...]] = {"token_embedding.weight": (config.vocab_size, d)}
    for i in range(config.num_layers):
        block = f"blocks.{i}"
        shapes |= {
            f"{block}.norm1.weight": (d,),
            f"{block}.attn.q.weight": (inner, d),
            f"{block}.attn.k.weight": (inner, d),
            f"{block}.attn.v.weight": (inner, d),
            f"{block}.attn.o.weight": (d, inner),
            f"{block}.norm2.weight": (d,),
            f"{block}.ffn.gate.0.weight": (ff, d),
            f"{block}.ffn.fc1.weight": (ff, d),
            f"{block}.ffn.fc2.weight": (d, ff),
            f"{block}.pos_embedding.embedding.weight": (config.num_buckets, config.num_heads),
        }
    shapes["norm.weight"] = (d,)
    return shapes


def load_wan_checkpoint(path: str | Path, config: UMT5EncoderConfig = UMT5_XXL,
                        dtype: torch.dtype | None = None) -> UMT5EncoderModel:
    """Wan's `models_t5_umt5-xxl-enc-bf16.pth` (or any T5Encoder state dict of shape `config`).

    The model is built on the meta device and the checkpoint tensors are assigned into it, so the
    only copy of the weights is the (memory-mapped) file's, or one cast copy when `dtype` differs.
    """
    path = Path(path)
    wan_state = read_torch_state_dict(path, what="umT5 checkpoint")
    check_state_dict(wan_state, wan_expected_shapes(config), path, what="Wan's umT5 encoder")  # errors in the file's own key names
    hf_state = convert_wan_state_dict(wan_state, path)
    model = build_encoder_model(config, device="meta")
    if dtype is not None:
        cast: dict[int, Tensor] = {}
        for tensor in hf_state.values():  # the tied pair is one tensor: cast it once
            cast.setdefault(id(tensor), tensor.to(dtype))
        hf_state = {key: cast[id(tensor)] for key, tensor in hf_state.items()}
    return assign_weights(model, hf_state)


def assign_weights(model: UMT5EncoderModel, hf_state: Mapping[str, Tensor]) -> UMT5EncoderModel:
    """Adopt `hf_state`'s tensors as the (meta-built) model's parameters, without copying."""
    model.load_state_dict(hf_state, strict=True, assign=True)
    # assign=True gives shared and encoder.embed_tokens separate Parameters; make them one again
    model.tie_weights()
    return model.eval()


def load_hf_folder(folder: str | Path, dtype: torch.dtype | None = None) -> UMT5EncoderModel:
    """A transformers folder (config.json + weights), e.g. google/umt5-xxl or a Diffusers text_encoder.

    The decoder half of a full T5 checkpoint is dropped by transformers; anything else the encoder
    lacks, or a weight it has but the folder does not, is an error.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"umT5 folder {folder} has no config.json")
    try:
        model, info = UMT5EncoderModel.from_pretrained(
            folder, attn_implementation="eager", dtype=dtype, local_files_only=True,
            # report wrong shapes back to us instead of raising without the key's name
            output_loading_info=True, ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{folder}: cannot load the umT5 encoder: {err}") from err
    missing = sorted(set(info["missing_keys"]) - {TIED_EMBEDDING_KEY})
    unexpected = sorted(key for key in info["unexpected_keys"] if not key.startswith(("decoder.", "lm_head.")))
    mismatched = sorted(f"{key} (file {tuple(got)}, model {tuple(want)})" for key, got, want in info["mismatched_keys"])
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", mismatched)):
        if keys:
            raise ValueError(f"{folder}: {what} key(s): {preview(keys)}")
    return model.eval()


def load_encoder_model(path: str | Path, config: UMT5EncoderConfig = UMT5_XXL,
                       dtype: torch.dtype | None = None) -> UMT5EncoderModel:
    """A folder loads as transformers weights (its config.json wins), a file as Wan's .pth."""
    path = Path(path)
    return load_hf_folder(path, dtype) if path.is_dir() else load_wan_checkpoint(path, config, dtype)


# ----------------------------------------------------------------------------------------------
# tokenizer


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: fix mojibake, unescape html twice, collapse whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """google/umt5-xxl's tokenizer files from a local folder (never the hub)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"tokenizer folder {folder} cannot be loaded: {err}") from err
    if tokenizer.pad_token_id != PAD_ID or tokenizer.eos_token_id != EOS_ID:
        raise ValueError(
            f"tokenizer folder {folder}: pad/eos ids are {tokenizer.pad_token_id}/{tokenizer.eos_token_id}, "
            f"umT5 uses {PAD_ID}/{EOS_ID}"
        )
    return tokenizer


# A few dozen Ovi-style captions: enough pieces for a ~200-token unigram vocabulary, and the tags
# (<S>, <E>, <AUDCAP>, Audio:) appear so tiny-pipeline prompts tokenize to more than characters.
_TINY_CORPUS = (
    "A man in a red coat walks along a rainy street at night.",
    "A woman sits by the window and reads a book while the sun sets.",
    "Two children run across a green field chasing a small brown dog.",
    "A chef chops onions in a busy kitchen, steam rising from the pots.",
    "The camera slowly pans over a quiet lake surrounded by tall pine trees.",
    "An old car drives down a dusty road under a bright blue sky.",
    "A cat jumps onto the table and knocks over a glass of water.",
    "A young musician plays the guitar on a stage with warm lights.",
    "Waves crash against the rocks as seagulls fly over the beach.",
    "A crowd cheers in a stadium as the players walk onto the field.",
    "A girl looks at the camera and says <S>I told you it would work.<E>",
    "A man in a suit turns to his friend and says <S>We have to leave now.<E>",
    "An old woman smiles and says <S>Welcome home, my dear.<E> then hugs him.",
    "A teacher points at the board and says <S>Please open your books.<E>",
    "A boy shouts <S>Look at that!<E> and points at the sky.",
    "<AUDCAP>Soft rain, distant traffic, footsteps on wet stone.<ENDAUDCAP>",
    "<AUDCAP>Clear female voice, calm tone, quiet room.<ENDAUDCAP>",
    "<AUDCAP>Loud crowd noise, whistles, an announcer on a speaker.<ENDAUDCAP>",
    "<AUDCAP>Acoustic guitar music, gentle applause.<ENDAUDCAP>",
    "<AUDCAP>Ocean waves, wind, seagulls calling.<ENDAUDCAP>",
    "Audio: a dog barks twice, wind in the trees.",
    "Audio: deep male voice, slight echo, rain on the roof.",
    "Audio: kitchen sounds, knives on a cutting board, sizzling oil.",
    "Audio: engine humming, gravel under the tires, birds singing.",
    "Audio: glass breaking, a cat meows, a door closes.",
    "jitter, bad hands, blur, distortion",
    "robotic, muffled, echo, distorted",
    "The sound of thunder rolls over the hills while lightning flashes.",
    "A robot walks through a bright futuristic city full of people.",
    "A painter adds blue and yellow colors to a large canvas.",
    "The train arrives at the station and the doors open slowly.",
    "A baby laughs while her father makes funny faces.",
    "Snow falls on a small village in the mountains at dawn.",
    "A dancer spins across the wooden floor in a white dress.",
    "Fireworks explode above the river as the people watch in silence.",
    "A scientist looks into a microscope in a quiet laboratory.",
    "A horse gallops along the shore, kicking up water and sand.",
    "Close-up of hands typing quickly on a keyboard, 4K, cinematic.",
    "Wide shot, golden hour, the city skyline, slow motion.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and quotes \"like this\" or 'this'; (brackets) & symbols: % $ # @ ! ? -",
)


def build_tiny_tokenizer(folder: str | Path, vocab_size: int = 256) -> PreTrainedTokenizerBase:
    """Train a tiny unigram sentencepiece model offline and save it as a transformers T5 tokenizer.

    Same id layout as umT5 (pad 0, eos 1, unk 2, EOS appended, no BOS, no sentinel ids), all ids
    < `vocab_size`, so it pairs with `UMT5_TINY`. Deterministic: the corpus is fixed and the
    trainer runs on one thread. Returns the tokenizer loaded back from `folder`.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS), model_writer=model_proto, model_type="unigram",
        vocab_size=vocab_size, hard_vocab_limit=False,  # the corpus may support fewer pieces
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, normalization_rule_name="identity",  # no charsmap to carry over
        num_threads=1, minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model_proto.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    (folder / "spiece.model").write_bytes(model_proto.getvalue())  # the source, for reference
    return load_tokenizer(folder)


# ----------------------------------------------------------------------------------------------
# encoding


@dataclass(frozen=True)
class TokenizedPrompts:
    ids: Tensor   # [B, L] int64: pieces, EOS, then PAD
    mask: Tensor  # [B, L] int64: 1 on pieces + EOS

    @property
    def lengths(self) -> list[int]:
        return self.mask.gt(0).sum(dim=1).tolist()


@dataclass(frozen=True)
class EncodedPrompts:
    contexts: list[Tensor]  # per prompt [L_i, d_model], the rows the DiT gets (before zero-padding)
    text_ids: list[Tensor]  # per prompt [L_i] int32 (the shard's dtype), the ids of those rows, ending with EOS


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], text_len: int,
             pad_to_longest: bool = False) -> TokenizedPrompts:
    """Wan's tokenizer call. `pad_to_longest` pads to the batch's longest prompt instead of
    `text_len`; the real rows come out the same (spec/data.md §2.2) at a fraction of the cost."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    batch = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="longest" if pad_to_longest else "max_length",
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return TokenizedPrompts(ids=batch["input_ids"].long(), mask=batch["attention_mask"].long())


@torch.inference_mode()
def encode_tokens(model: UMT5EncoderModel, tokens: TokenizedPrompts) -> list[Tensor]:
    """Wan's `T5EncoderModel.__call__` after tokenizing: masked forward, then each row cut to its length."""
    device = model.get_input_embeddings().weight.device
    hidden = model(input_ids=tokens.ids.to(device), attention_mask=tokens.mask.to(device)).last_hidden_state
    # clone: each context owns its storage (no hidden reference to the padded batch when stored)
    return [row[:n].clone() for row, n in zip(hidden, tokens.lengths)]


class TextEncoder:
    """Prompts in, per-prompt umT5 contexts `[L_i, d_model]` (and their token ids) out."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = 512,
                 pad_to_longest: bool = False):
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the encoder's vocabulary is {model.config.vocab_size}"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.pad_to_longest = pad_to_longest

    @classmethod
    def from_pretrained(cls, weights: str | Path, tokenizer_folder: str | Path, *, text_len: int = 512,
                        config: UMT5EncoderConfig = UMT5_XXL, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", pad_to_longest: bool = False) -> TextEncoder:
        """`weights`: Wan's .pth (shaped by `config`) or a transformers folder."""
        tokenizer = load_tokenizer(tokenizer_folder)
        model = load_encoder_model(weights, config, dtype).to(device)
        return cls(model, tokenizer, text_len=text_len, pad_to_longest=pad_to_longest)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
        return tokenize(self.tokenizer, prompts, self.text_len, self.pad_to_longest)

    def encode_with_ids(self, prompts: Sequence[str]) -> EncodedPrompts:
        tokens = self.tokenize(prompts)
        contexts = encode_tokens(self.model, tokens)
        text_ids = [row[:n].to(torch.int32) for row, n in zip(tokens.ids, tokens.lengths)]
        return EncodedPrompts(contexts=contexts, text_ids=text_ids)

    def encode(self, prompts: Sequence[str]) -> list[Tensor]:
        return self.encode_with_ids(prompts).contexts
