"""Learning-rate schedules (distill/schedules.py): warmup and decay values, the floor after the
decay, and the recipe-level checks; resume is covered end to end in tests/test_train.py."""
import math

import pytest

from distill.config import ConfigError, load_config
from distill.schedules import LRSchedule, lr_factor


def test_constant_is_one_everywhere():
    assert [lr_factor(LRSchedule(), s, 100) for s in (0, 50, 99, 500)] == [1.0] * 4


def test_warmup_ramps_linearly_to_the_peak():
    s = LRSchedule(warmup_steps=4)
    assert [lr_factor(s, step, 100) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_peak_to_the_floor_over_the_rest_of_the_run():
    s = LRSchedule(warmup_steps=10, decay="cosine", min_ratio=0.1)
    assert lr_factor(s, 10, 110) == pytest.approx(1.0)
    assert lr_factor(s, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5)           # halfway: cos(π/2) = 0
    assert lr_factor(s, 35, 110) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(s, 110, 110) == pytest.approx(0.1)
    values = [lr_factor(s, step, 110) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))                  # never rises after warmup


def test_linear_decay_with_fixed_decay_steps_then_stays_at_the_floor():
    """decay_steps fixed: a run longer than the recipe keeps the recipe's schedule, then holds the floor."""
    s = LRSchedule(decay="linear", decay_steps=100, min_ratio=0.2)
    assert lr_factor(s, 0, 200) == pytest.approx(1.0)
    assert lr_factor(s, 50, 200) == pytest.approx(0.6)
    assert lr_factor(s, 100, 200) == pytest.approx(0.2)
    assert lr_factor(s, 199, 200) == pytest.approx(0.2)
    # the same schedule whatever max_steps is
    assert all(lr_factor(s, step, 100) == lr_factor(s, step, 400) for step in range(100))


@pytest.mark.parametrize("bad, field", [
    (dict(decay="exp"), "decay"), (dict(warmup_steps=-1), "warmup_steps"), (dict(decay_steps=0), "decay_steps"),
    (dict(min_ratio=1.5), "min_ratio"), (dict(warmup_steps=1.5), "warmup_steps"),
])
def test_bad_schedules_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        LRSchedule(**bad)


def test_recipe_schedules_load_per_optimizer_and_bad_values_name_the_section():
    cfg = load_config("distill/configs/tiny.yaml", ["generator_optim.schedule.decay=cosine",
                                                    "generator_optim.schedule.warmup_steps=3",
                                                    "critic_optim.schedule.min_ratio=0.5"])
    assert cfg.generator_optim.schedule == LRSchedule(warmup_steps=3, decay="cosine")
    assert cfg.critic_optim.schedule == LRSchedule(min_ratio=0.5)
    with pytest.raises(ConfigError, match="critic_optim.schedule.*decay must be one of"):
        load_config("distill/configs/tiny.yaml", ["critic_optim.schedule.decay=step"])
    with pytest.raises(ConfigError, match="generator_optim.schedule.bogus"):
        load_config("distill/configs/tiny.yaml", ["generator_optim.schedule.bogus=1"])
