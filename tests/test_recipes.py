"""The shipped recipes load and fit together: each Ovi DMD recipe queries its guided fine-tune without
CFG (dmd.guidance: samples), and the fine-tune is made on pairs of the same guidance and modes."""
from pathlib import Path

import pytest
import yaml

from distill.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "distill" / "configs"
ANY_FILE = f"model.checkpoint={__file__}"   # the recipes name checkpoints that exist on a cluster, not here
OVI = sorted(p.stem for p in CONFIGS.glob("ovi_*.yaml") if not p.stem.endswith("_guided"))


def test_every_recipe_loads():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert "tiny.yaml" in names and len(OVI) == 3, names
    for path in CONFIGS.glob("*.yaml"):
        load_config(str(path), [ANY_FILE])


@pytest.mark.parametrize("name", OVI)
def test_ovi_dmd_recipe_and_its_guided_finetune_agree(name):
    dmd = load_config(str(CONFIGS / f"{name}.yaml"), [ANY_FILE])
    guided = load_config(str(CONFIGS / f"{name}_guided.yaml"), [ANY_FILE])
    assert (dmd.objective, guided.objective) == ("dmd", "flow")
    assert dmd.dmd.guidance == "samples"
    # the anchor on stage 1's pairs, which both stages take on the command line (the trainer refuses a
    # weight without pairs): the same pairs, so the same guidance and modes as the fine-tune's
    assert dmd.dmd.regression_weight == 0.1 and dmd.dmd.renoise == "implied"
    assert dmd.data.pairs is None and guided.data.pairs is None
    assert dmd.model.variant == guided.model.variant
    for field in ("cfg_video", "cfg_audio", "slg_block"):   # the pairs' guidance, checked by the trainer
        assert getattr(dmd.dmd, field) == getattr(guided.dmd, field)
    assert dmd.data.i2v_ratio == guided.data.i2v_ratio    # the fine-tune covers every mode DMD draws
    assert guided.ema.enabled   # its export is the EMA (the README's command has no --raw)
    checkpoint = lambda recipe: yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())["model"]["checkpoint"]
    assert "_guided" in checkpoint(name) and "_guided" not in checkpoint(f"{name}_guided")
