"""Ovi's prompt rules: which audio-caption style each checkpoint expects, and the default negatives.

One combined prompt conditions both towers (spec/ovi.md §4.3): speech inline as `<S>…<E>`, the
audio description either as `<AUDCAP>…<ENDAUDCAP>` (Ovi 1.0: 720x720_5s, and our tiny variant) or
as `Audio: …` (Ovi 1.1: the 960 models). The tags go to T5 verbatim, so the string we encode at
precompute time must be exactly the string the engine would encode at inference time; that is why
the conversion uses the engine's own regexes rather than a smarter parser.
"""
from __future__ import annotations

import re
from typing import Literal

from precompute.variants import Variant

PromptStyle = Literal["audcap", "audio_colon"]
PROMPT_STYLES: tuple[str, ...] = ("audcap", "audio_colon")

DEFAULT_VIDEO_NEGATIVE = "jitter, bad hands, blur, distortion"
DEFAULT_AUDIO_NEGATIVE = "robotic, muffled, echo, distorted"

# The engine's regexes (720 model: DOTALL, greedy to the end; 960 models: no flags, lazy).
_AUDIO_COLON = re.compile(r"Audio:\s*(.*)", re.DOTALL)
_AUDCAP = re.compile(r"<AUDCAP>(.*?)<ENDAUDCAP>")


def to_audcap(prompt: str) -> str:
    """`… Audio: rain` → `… <AUDCAP>rain<ENDAUDCAP>` (what 720x720_5s was trained on)."""
    return _AUDIO_COLON.sub(r"<AUDCAP>\1<ENDAUDCAP>", prompt)


def to_audio_colon(prompt: str) -> str:
    """`… <AUDCAP>rain<ENDAUDCAP>` → `… Audio: rain` (what the 960 models were trained on)."""
    return _AUDCAP.sub(r"Audio: \1", prompt)


def format_prompt(prompt: str, style: str) -> str:
    """The prompt in the caption style `style`; speech `<S>…<E>` and everything else untouched.

    Raises ValueError for a non-string, an empty or whitespace-only prompt (T5 would encode it as a
    lone EOS, a silent, useless training sample), or an unknown style.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"prompt is empty or whitespace only: {prompt!r}")
    if style == "audcap":
        return to_audcap(prompt)
    if style == "audio_colon":
        return to_audio_colon(prompt)
    raise ValueError(f"unknown prompt style {style!r}; choose one of {PROMPT_STYLES}")


def prompt_for_variant(prompt: str, variant: Variant) -> str:
    """The prompt as `variant`'s checkpoint expects it (see `Variant.prompt_style`)."""
    return format_prompt(prompt, variant.prompt_style)
