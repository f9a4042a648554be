"""Ovi's prompt rules: the caption style per variant, the engine's conversion regexes, speech tags."""
import pytest

from precompute.prompts import (
    DEFAULT_AUDIO_NEGATIVE,
    DEFAULT_VIDEO_NEGATIVE,
    format_prompt,
    prompt_for_variant,
    to_audcap,
    to_audio_colon,
)
from precompute.variants import get_variant

SPEECH = "A man in a red coat turns and says <S>We have to leave now.<E> then walks away."
AUDCAP = SPEECH + " <AUDCAP>Deep male voice, rain on the street.<ENDAUDCAP>"
AUDIO_COLON = SPEECH + " Audio: Deep male voice, rain on the street."


def test_audio_colon_to_audcap():
    assert to_audcap(AUDIO_COLON) == AUDCAP


def test_audcap_to_audio_colon():
    assert to_audio_colon(AUDCAP) == AUDIO_COLON


def test_conversion_is_a_no_op_on_the_target_style():
    assert to_audcap(AUDCAP) == AUDCAP
    assert to_audio_colon(AUDIO_COLON) == AUDIO_COLON
    assert to_audcap(SPEECH) == SPEECH == to_audio_colon(SPEECH)


def test_speech_tags_are_left_verbatim_both_ways():
    for converted in (to_audcap(AUDIO_COLON), to_audio_colon(AUDCAP)):
        assert converted.startswith(SPEECH)
        assert converted.count("<S>") == converted.count("<E>") == 1


def test_720_rule_takes_everything_after_audio_colon_across_lines():
    # The engine's 720 regex is DOTALL and greedy: a multi-line caption is wrapped whole.
    assert to_audcap("A dog. Audio:\n  barking,\nwind") == "A dog. <AUDCAP>barking,\nwind<ENDAUDCAP>"


def test_960_rule_converts_each_audcap_span():
    assert to_audio_colon("<AUDCAP>a<ENDAUDCAP> x <AUDCAP>b<ENDAUDCAP>") == "Audio: a x Audio: b"


@pytest.mark.parametrize(
    "variant, expected",
    [("720x720_5s", AUDCAP), ("tiny", AUDCAP), ("960x960_5s", AUDIO_COLON), ("960x960_10s", AUDIO_COLON)],
)
def test_each_variant_gets_its_style(variant, expected):
    for prompt in (AUDCAP, AUDIO_COLON):
        assert prompt_for_variant(prompt, get_variant(variant)) == expected


@pytest.mark.parametrize("bad", ["", "   ", "\n\t "])
def test_empty_prompt_is_rejected(bad):
    with pytest.raises(ValueError, match="empty"):
        format_prompt(bad, "audcap")


def test_unknown_style_and_non_string_are_rejected():
    with pytest.raises(ValueError, match="style"):
        format_prompt("a cat", "markdown")
    with pytest.raises(ValueError, match="string"):
        format_prompt(None, "audcap")


def test_default_negatives_are_ovis():
    assert DEFAULT_VIDEO_NEGATIVE == "jitter, bad hands, blur, distortion"
    assert DEFAULT_AUDIO_NEGATIVE == "robotic, muffled, echo, distorted"
