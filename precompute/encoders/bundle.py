"""The three frozen encoders of stage 1 (Wan2.2 VAE, MMAudio 16k VAE, umT5) loaded together, with
the identity of the weights that made a dataset (file sha256, recorded in dataset.json and in
every sample's json).

Two sources:
  * real files, named one by one or found in one folder laid out like Ovi's ``ckpts/``::

        DIR/Wan2.2-TI2V-5B/Wan2.2_VAE.pth
        DIR/Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth   (or a transformers folder)
        DIR/Wan2.2-TI2V-5B/google/umt5-xxl/                  (tokenizer folder)
        DIR/MMAudio/ext_weights/v1-16.pth

  * for the ``tiny`` variant with no files: the same code at tiny widths with seeded random
    weights (the tests' and quickstart's default); the tiny tokenizer is trained offline into a
    cache folder.

Every path is checked to exist before any weights are read, and every encoder is loaded before
the caller reads a clip: a bad file stops the run with its name, not an hour into it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from precompute.encoders.mmaudio_vae import AudioVAE
from precompute.encoders.umt5 import UMT5_TINY, UMT5_XXL, TextEncoder, build_encoder_model, build_tiny_tokenizer
from precompute.encoders.wan_vae import WanVideoVAE
from precompute.variants import Variant

TINY_SEED = 0
HASH_CHUNK_BYTES = 8 << 20

# Where each file sits in Ovi's ckpts/ folder (Ovi's download_weights.py layout).
CKPTS_LAYOUT = {
    "wan_vae": "Wan2.2-TI2V-5B/Wan2.2_VAE.pth",
    "t5": "Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth",
    "tokenizer": "Wan2.2-TI2V-5B/google/umt5-xxl",
    "mmaudio_vae": "MMAudio/ext_weights/v1-16.pth",
}


class EncoderFileError(ValueError):
    """An encoder file that is missing, unreadable or the wrong model; the message names it."""


@dataclass(frozen=True)
class EncoderPaths:
    wan_vae: Path | None = None
    mmaudio_vae: Path | None = None
    t5: Path | None = None          # Wan's .pth or a transformers folder
    tokenizer: Path | None = None   # google/umt5-xxl tokenizer folder

    @classmethod
    def from_ckpts_dir(cls, root: str | os.PathLike) -> EncoderPaths:
        root = Path(root)
        return cls(**{name: root / rel for name, rel in CKPTS_LAYOUT.items()})

    def override(self, **paths: str | os.PathLike | None) -> EncoderPaths:
        """These paths with the given (non-None) ones replacing them."""
        return replace(self, **{k: Path(v) for k, v in paths.items() if v is not None})

    @property
    def given(self) -> dict[str, Path]:
        return {name: getattr(self, name) for name in CKPTS_LAYOUT if getattr(self, name) is not None}

    def check(self) -> None:
        """All four given and present; otherwise one error naming every problem."""
        problems = []
        for name in CKPTS_LAYOUT:
            path = getattr(self, name)
            if path is None:
                problems.append(f"{name}: not given (--{name.replace('_', '-')} PATH, or --encoders DIR)")
            elif not path.exists():
                problems.append(f"{name}: {path} does not exist")
            elif name == "tokenizer" and not path.is_dir():
                problems.append(f"{name}: {path} is not a folder")
        if problems:
            raise EncoderFileError("encoder files:\n  " + "\n  ".join(problems))


def sha256_of(path: Path) -> str:
    """sha256 of a file; of a folder, the sha256 over its files' relative names and hashes."""
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_of(file)}\n".encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class EncoderBundle:
    video_vae: WanVideoVAE
    audio_vae: AudioVAE
    text: TextEncoder
    ids: dict[str, str] = field(default_factory=dict)  # encoder name -> "sha256:<hex>" or "tiny-seed<N>"
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(cls, variant: Variant, paths: EncoderPaths | None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None,
             hash_files: bool = True) -> EncoderBundle:
        """The encoders for ``variant``. ``dtype`` is for the video VAE and umT5; the audio VAE
        always runs in float32 (a few ms per clip, and its mel front-end wants the precision).
        ``paths=None`` is only allowed for ``tiny`` (seeded random weights; the tokenizer is
        trained into ``cache_dir``)."""
        device = torch.device(device)
        if paths is None or not paths.given:
            if variant.name != "tiny":
                raise EncoderFileError(f"variant {variant.name} needs the real encoder files: pass --encoders DIR "
                                       f"(Ovi's ckpts/ folder) or --wan-vae/--mmaudio-vae/--t5/--tokenizer")
            if cache_dir is None:
                raise ValueError("the tiny encoders need a cache_dir for their tokenizer")
            return cls.tiny(variant, Path(cache_dir), device, dtype)
        paths.check()
        return cls._from_files(variant, paths, device, dtype, hash_files)

    @classmethod
    def tiny(cls, variant: Variant, cache_dir: Path, device: torch.device, dtype: torch.dtype,
             seed: int = TINY_SEED) -> EncoderBundle:
        """Seeded N(0, 0.02) weights at tiny widths (umT5 d_model 32: what the tiny DiT expects)."""
        video = WanVideoVAE.tiny(seed=seed, device=device, dtype=dtype)
        audio = AudioVAE.tiny(seed=seed).to(device)
        tokenizer = build_tiny_tokenizer(cache_dir / "tiny_tokenizer")
        gen = torch.Generator().manual_seed(seed)
        model = build_encoder_model(UMT5_TINY, device="cpu")
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.normal_(0.0, 0.02, generator=gen)
        text = TextEncoder(model.to(device=device, dtype=dtype), tokenizer, text_len=variant.text_len,
                           pad_to_longest=True)
        ident = f"tiny-seed{seed}"
        return cls(video, audio, text, {name: ident for name in CKPTS_LAYOUT}, device)

    @classmethod
    def _from_files(cls, variant: Variant, paths: EncoderPaths, device: torch.device, dtype: torch.dtype,
                    hash_files: bool) -> EncoderBundle:
        def load(name: str, loader):
            path = getattr(paths, name)
            try:
                return loader(path)
            except EncoderFileError:
                raise
            except Exception as exc:  # each loader names the file; keep which encoder it was for
                raise EncoderFileError(f"{name}: cannot load {path}: {type(exc).__name__}: {exc}") from exc

        video = load("wan_vae", lambda p: WanVideoVAE.from_file(p, device=device, dtype=dtype))
        audio = load("mmaudio_vae", lambda p: AudioVAE.from_file(p, device=device, dtype=torch.float32))
        text = load("t5", lambda p: TextEncoder.from_pretrained(
            p, paths.tokenizer, text_len=variant.text_len, config=UMT5_XXL, dtype=dtype, device=device,
            pad_to_longest=True))
        ids = {name: ("sha256:" + sha256_of(path)) if hash_files else f"path:{path}"
               for name, path in paths.given.items()}
        return cls(video, audio, text, ids, device)

