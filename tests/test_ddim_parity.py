"""ddim_step / ddim_sample against diffusers' DDIMScheduler, and ddim_log_prob against torch.distributions."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from prefalign.diffusion import (
    NoiseSchedule,
    ddim_jump,
    ddim_log_prob,
    ddim_sample,
    ddim_sigma,
    ddim_step,
    eps_from_v,
)
from prefalign.errors import PrefalignError

SHAPE = (2, 3, 8, 8)
SCHEDULES = {
    "sd_leading_offset1": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        clip_sample=False,
    ),
    "cosine_trailing": dict(
        beta_schedule="squaredcos_cap_v2",
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        clip_sample=False,
    ),
    # the shipped pixel-space shapes model: x̂_0 clipped to [-1, 1]
    "cosine_trailing_clipped": dict(
        beta_schedule="squaredcos_cap_v2",
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        clip_sample=True,
        clip_sample_range=1.0,
    ),
}


def make_eps_fn(dtype=torch.float32, kind="tracking"):
    """Deterministic, nonlinear, t-dependent stand-ins for a network.

    "tracking" ≈ x_t plus a nonlinear term, so x̂_0 stays O(1) as with a real model; "tanh" is bounded,
    which makes the trajectory grow (|x| up to ~1e5 on the cosine schedule, whose ᾱ_999 ≈ 2e-9).
    """
    weight = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123), dtype=dtype)
    if kind == "tanh":
        return lambda x, t: torch.tanh(x * weight + t / 1000)
    return lambda x, t: x * (1 + 0.1 * torch.tanh(x * weight + t / 1000))


def diffusers_trajectory(config, eps_fn, x_T, num_steps, eta, noises, float64_table=False):
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(num_steps)
    if float64_table:  # same formulas, coefficients in float64: isolates formula/index parity from rounding
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).double()
    x, states = x_T, []
    for step_index, t in enumerate(scheduler.timesteps):
        eps = eps_fn(x, int(t))
        x = scheduler.step(eps, t, x, eta=eta, variance_noise=noises[step_index]).prev_sample
        states.append(x)
    return states


def our_trajectory(config, eps_fn, x_T, num_steps, eta, noises):
    states = []
    x_0 = ddim_sample(
        eps_fn,
        x_T,
        NoiseSchedule.from_config(config),
        num_steps,
        eta=eta,
        noises=noises,
        callback=lambda i, t, x_t, x_prev: states.append(x_prev),
    )
    assert torch.equal(x_0, states[-1])
    assert x_0.dtype == x_T.dtype
    return states


def scaled_error(ours, reference):
    """max over steps of max-abs difference / max(1, max |reference|) (float rounding scales with |x|)."""
    assert len(ours) == len(reference)
    return max((a - b).abs().max().item() / max(1.0, b.abs().max().item()) for a, b in zip(ours, reference))


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_matches_stock_diffusers_every_step(schedule_name, num_steps, eta):
    """float32, stock diffusers: ≤ 1e-5 per step (relative to max(1, |x|); diffusers rounds √ᾱ to float32)."""
    config = SCHEDULES[schedule_name]
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=generator)
    noises = [torch.randn(SHAPE, generator=generator) for _ in range(num_steps)]
    eps_fn = make_eps_fn()
    reference = diffusers_trajectory(config, eps_fn, x_T, num_steps, eta, noises)
    ours = our_trajectory(config, eps_fn, x_T, num_steps, eta, noises)
    assert len(ours) == num_steps
    worst = scaled_error(ours, reference)
    # With clipping, float32 rounding of √ᾱ near ᾱ_999 ≈ 2e-9 can move x̂_0 across the clip boundary;
    # the float64 test below shows the formulas are identical (≤ 1e-12), so allow 1e-4 here.
    tolerance = 1e-4 if config.get("clip_sample") else 1e-5
    assert worst <= tolerance, f"difference to diffusers {worst:.2e}"


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["tanh", "tracking"])
def test_ddim_sample_matches_diffusers_formulas_in_float64(schedule_name, num_steps, eta, kind):
    """float64 with diffusers' ᾱ table upcast: the same update and indices to ~1e-15 relative."""
    config = SCHEDULES[schedule_name]
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    noises = [torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(num_steps)]
    eps_fn = make_eps_fn(torch.float64, kind)
    reference = diffusers_trajectory(config, eps_fn, x_T, num_steps, eta, noises, float64_table=True)
    ours = our_trajectory(config, eps_fn, x_T, num_steps, eta, noises)
    worst = scaled_error(ours, reference)
    assert worst <= 1e-12, f"difference to diffusers {worst:.2e}"


def test_v_prediction_parity_through_eps_from_v():
    config = dict(SCHEDULES["sd_leading_offset1"], prediction_type="v_prediction")
    schedule = NoiseSchedule.from_config(config)
    assert schedule.prediction_type == "v_prediction"
    v_fn = make_eps_fn()
    generator = torch.Generator().manual_seed(5)
    x_T = torch.randn(SHAPE, generator=generator)
    noises = [torch.randn(SHAPE, generator=generator) for _ in range(10)]
    reference = diffusers_trajectory(config, v_fn, x_T, 10, 1.0, noises)[-1]
    ours = ddim_sample(
        lambda x, t: eps_from_v(x, v_fn(x, t), schedule.alpha_bar(t)), x_T, schedule, 10, eta=1.0, noises=noises
    )
    assert scaled_error([ours], [reference]) <= 1e-5


def test_ddim_step_sigma_and_mean_match_diffusers():
    config = SCHEDULES["sd_leading_offset1"]
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    schedule = NoiseSchedule.from_config(config)
    t, t_prev = 501, 401
    expected = 0.7 * scheduler._get_variance(t, t_prev).double().sqrt()
    sigma = ddim_sigma(schedule.alpha_bar(t), schedule.alpha_bar(t_prev), 0.7)
    assert sigma.dtype == torch.float64
    assert abs(sigma.item() - expected.item()) < 1e-7

    generator = torch.Generator().manual_seed(2)
    x_t, eps, noise = (torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(3))
    x_prev, mean, sigma_cast = ddim_step(x_t, eps, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), 0.7, noise)
    assert x_prev.dtype == mean.dtype == sigma_cast.dtype == torch.float64
    torch.testing.assert_close(x_prev - mean, sigma_cast * noise)
    # η = 0 is the deterministic DDIM jump, bit for bit
    deterministic, _, zero = ddim_step(x_t, eps, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), 0.0)
    assert zero.item() == 0.0
    assert torch.equal(deterministic, ddim_jump(x_t, eps, schedule.alpha_bar(t), schedule.alpha_bar(t_prev)))
    with pytest.raises(PrefalignError):
        ddim_step(x_t, eps, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), 1.0, None)


def test_ddim_sample_generator_is_reproducible_and_float64_stays_float64():
    schedule = NoiseSchedule.from_config(SCHEDULES["cosine_trailing"])
    eps_fn = make_eps_fn(torch.float64)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = ddim_sample(eps_fn, x_T, schedule, 10, eta=1.0, generator=torch.Generator().manual_seed(7))
    second = ddim_sample(eps_fn, x_T, schedule, 10, eta=1.0, generator=torch.Generator().manual_seed(7))
    other = ddim_sample(eps_fn, x_T, schedule, 10, eta=1.0, generator=torch.Generator().manual_seed(8))
    assert first.dtype == torch.float64
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    # the documented draw: torch.randn(x.shape, generator=generator, dtype=x.dtype), once per step
    generator = torch.Generator().manual_seed(7)
    noises = [torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(10)]
    assert torch.equal(first, ddim_sample(eps_fn, x_T, schedule, 10, eta=1.0, noises=noises))
    with pytest.raises(PrefalignError):
        ddim_sample(eps_fn, x_T, schedule, 10, eta=1.0, noises=noises[:3])


def test_ddim_log_prob_matches_normal_mean_over_elements():
    generator = torch.Generator().manual_seed(3)
    mean = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    x_prev = mean + 0.3 * torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    sigma = torch.tensor(0.3, dtype=torch.float64)
    expected = torch.distributions.Normal(mean, sigma).log_prob(x_prev).mean(dim=(1, 2, 3))
    ours = ddim_log_prob(x_prev, mean, sigma)
    assert ours.shape == (SHAPE[0],)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    # per-sample sigma, as ddim_step returns it for per-sample levels
    sigma_per_sample = torch.tensor([0.3, 0.8], dtype=torch.float64).reshape(2, 1, 1, 1)
    expected = torch.distributions.Normal(mean, sigma_per_sample).log_prob(x_prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ddim_log_prob(x_prev, mean, sigma_per_sample), expected, rtol=0, atol=1e-12)
    assert ddim_log_prob(mean, mean, 1.0).tolist() == pytest.approx([-0.5 * math.log(2 * math.pi)] * 2)
    with pytest.raises(PrefalignError):
        ddim_log_prob(x_prev, mean, 0.0)


def test_ddim_log_prob_of_a_real_step():
    schedule = NoiseSchedule.from_config(SCHEDULES["sd_leading_offset1"])
    generator = torch.Generator().manual_seed(4)
    x_t, eps, noise = (torch.randn(SHAPE, generator=generator) for _ in range(3))
    x_prev, mean, sigma = ddim_step(x_t, eps, schedule.alpha_bar(501), schedule.alpha_bar(401), 1.0, noise)
    expected = torch.distributions.Normal(mean, sigma).log_prob(x_prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ddim_log_prob(x_prev, mean, sigma), expected)
