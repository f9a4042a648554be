"""The evaluation prompt set: a text file (one prompt per line, as distill/sample.py reads it) or a
JSON-lines file whose rows are {"prompt": "...", "image": "first_frame.png"} ("image" optional,
relative to the file's folder), so one set can mix text-to-video and image-to-video prompts.

Read in two stages: the file's shape first (existence, encoding, JSON, image files), before the
run's variant is known (a --watch started before the first checkpoint); the captions in the
variant's style once it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distill.sample import SampleError, caption_for_variant, read_prompt_lines
from precompute.variants import Variant


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    image: Path | None
    where: str          # file:line, for messages


def read_eval_prompts(path: Path) -> list[EvalPrompt]:
    """Every prompt of the file; SampleError naming the file (and line) for anything wrong."""
    lines = read_prompt_lines(path)
    if path.suffix != ".jsonl":
        return [EvalPrompt(text, None, f"{path}:{number}") for number, text in lines]
    prompts = []
    for number, line in lines:
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SampleError(f"{where}: not a JSON object ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SampleError(f'{where}: expected {{"prompt": "...", "image": optional path}}')
        unknown = sorted(set(row) - {"prompt", "image"})
        if unknown:
            raise SampleError(f"{where}: unknown field(s) {', '.join(unknown)}")
        image = None
        if row.get("image") is not None:
            image = Path(row["image"]) if Path(row["image"]).is_absolute() else path.parent / row["image"]
            if not image.is_file():
                raise SampleError(f"{where}: image {image}: no such file")
        prompts.append(EvalPrompt(row["prompt"].strip(), image, where))
    return prompts


def captions(prompts: list[EvalPrompt], variant: Variant) -> list[str]:
    """Each prompt as the variant's umT5 sees it (audio caption style)."""
    return [caption_for_variant(p.text, variant, p.where) for p in prompts]
