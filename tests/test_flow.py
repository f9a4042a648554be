"""The flow-matching convention: shift, warp, x0 ⇄ velocity, re-noising, DMD σ sampling."""
import pytest
import torch

from distill.flow import (
    STUDENT_SIGMAS,
    add_noise,
    implied_noise,
    next_student_input,
    sample_score_sigma,
    shift_sigma,
    sigma_from_timestep,
    timestep_from_sigma,
    velocity_from_x0,
    warp_steps,
    x0_from_velocity,
)


def test_student_sigmas_are_the_shift5_warp_of_1000_750_500_250():
    assert STUDENT_SIGMAS == pytest.approx((1.0, 0.9375, 5 / 6, 0.625), abs=1e-15)
    assert warp_steps() == STUDENT_SIGMAS


@pytest.mark.parametrize(
    "shift, expected",
    [(1.0, (1.0, 0.75, 0.5, 0.25)), (3.0, (1.0, 0.9, 0.75, 0.5)), (8.0, (1.0, 0.96, 8 / 9, 8 / 11))],
)
def test_warp_steps_other_shifts(shift, expected):
    assert warp_steps((1000, 750, 500, 250), shift) == pytest.approx(expected, abs=1e-12)


def test_shift_sigma_fixes_endpoints_and_moves_mass_to_high_noise():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = shift_sigma(s, 5.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert torch.all(shifted[1:-1] > s[1:-1])
    assert shift_sigma(0.5, 5.0) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="shift"):
        shift_sigma(0.5, 0.0)


def test_timestep_sigma_maps():
    assert timestep_from_sigma(0.9375) == 937.5
    assert sigma_from_timestep(625.0) == 0.625


@pytest.mark.parametrize("steps", [(1000, 1000, 500), (250, 500), (1001, 500), (0,), ()])
def test_warp_steps_rejects_bad_lists(steps):
    with pytest.raises(ValueError):
        warp_steps(steps)


def test_add_noise_endpoints_and_per_sample_sigma():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, generator=g)
    eps = torch.randn(3, 4, 5, generator=g)
    assert torch.equal(add_noise(x0, eps, 0.0), x0)
    assert torch.equal(add_noise(x0, eps, 1.0), eps)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    batched = add_noise(x0, eps, sigma)
    for b in range(3):
        expected = (1 - sigma[b].item()) * x0[b].double() + sigma[b].item() * eps[b].double()
        torch.testing.assert_close(batched[b], expected.float(), rtol=0, atol=1e-7)


def test_x0_velocity_round_trip():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 48, 3, 4, 6, generator=g)
    eps = torch.randn(2, 48, 3, 4, 6, generator=g)
    sigma = torch.tensor([0.3, 0.95])
    x_t = add_noise(x0, eps, sigma)
    v = eps - x0
    torch.testing.assert_close(x0_from_velocity(x_t, v, sigma), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(velocity_from_x0(x_t, x0, sigma), v, rtol=0, atol=1e-5)
    # a float σ and a 0-dim tensor σ mean the same thing
    torch.testing.assert_close(x0_from_velocity(x_t, v, 0.7), x0_from_velocity(x_t, v, torch.tensor(0.7)))


def test_implied_noise_inverts_add_noise():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 48, 3, 4, 6, generator=g), torch.randn(2, 48, 3, 4, 6, generator=g)
    sigma = torch.tensor([0.25, 0.9])
    torch.testing.assert_close(implied_noise(add_noise(x0, eps, sigma), x0, sigma), eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(implied_noise(add_noise(x0, eps, 1.0), x0, 1.0), eps, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sigma = 0"):
        implied_noise(x0, x0, 0.0)


def test_conversions_keep_the_input_dtype():
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    v = torch.randn(2, 3, dtype=torch.bfloat16)
    assert x0_from_velocity(x, v, 0.5).dtype == torch.bfloat16
    assert add_noise(x, v, torch.tensor([0.2, 0.4])).dtype == torch.bfloat16


def test_bad_sigma_and_shape_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="tensor \\[B\\] with B = 2"):
        x0_from_velocity(x, x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="same shape"):
        add_noise(x, torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        add_noise(x, x, 1.5)
    with pytest.raises(ValueError, match="sigma = 0"):
        velocity_from_x0(x, x, 0.0)


def test_sample_score_sigma_range_shape_and_clamp():
    sigma = sample_score_sigma(20000, torch.Generator().manual_seed(0))
    assert sigma.shape == (20000,) and sigma.dtype == torch.float64
    assert sigma.min() == 0.02 and sigma.max() == 0.98
    # dmd.md §2.2 (shift 5): 9.2 % clamped at 980, median ≈ 833
    assert (sigma == 0.98).double().mean().item() == pytest.approx(0.092, abs=0.01)
    assert sigma.median().item() == pytest.approx(0.833, abs=0.01)
    # every unclamped σ sits on the shifted U{0..999}/1000 grid: invert the shift, get an integer
    inner = sigma[(sigma > 0.02) & (sigma < 0.98)]
    u = inner / (5.0 - 4.0 * inner)
    torch.testing.assert_close(u * 1000, (u * 1000).round(), rtol=0, atol=1e-9)


def test_sample_score_sigma_is_deterministic_under_a_seeded_generator():
    a = sample_score_sigma(64, torch.Generator().manual_seed(7))
    b = sample_score_sigma(64, torch.Generator().manual_seed(7))
    c = sample_score_sigma(64, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_score_sigma_bounds_and_errors():
    sigma = sample_score_sigma(5000, torch.Generator().manual_seed(0), shift=1.0, t_min=100, t_max=200)
    assert sigma.min() == 0.1 and sigma.max() == 0.2
    with pytest.raises(ValueError, match="batch"):
        sample_score_sigma(0, None)
    with pytest.raises(ValueError, match="t_min"):
        sample_score_sigma(4, None, t_min=990, t_max=980)


def test_next_student_input_renoises_with_fresh_or_implied_noise():
    x0, eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.randn(2, 3)
    x_t = add_noise(x0, eps, 0.8)
    x0_hat = torch.randn(2, 3)
    implied = next_student_input(x_t, x0_hat, 0.8, 0.5, "implied", fresh=lambda x: pytest.fail("no draw"))
    torch.testing.assert_close(implied, add_noise(x0_hat, implied_noise(x_t, x0_hat, 0.8), 0.5))
    drawn = torch.ones(2, 3)
    torch.testing.assert_close(next_student_input(x_t, x0_hat, 0.8, 0.5, "fresh", fresh=lambda x: drawn),
                               add_noise(x0_hat, drawn, 0.5))
