"""NoiseSchedule against diffusers' DDIMScheduler, and the pure ε / x̂_0 / v helpers."""

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from prefalign.diffusion import (
    NoiseSchedule,
    classifier_free_guidance,
    eps_from_v,
    implied_eps,
    predicted_x0,
    v_target,
    x0_from_v,
)
from prefalign.errors import PrefalignError

SD_CONFIG = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)

BETA_CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="linear", beta_start=0.0002, beta_end=0.03, num_train_timesteps=500),
    SD_CONFIG,
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=333, set_alpha_to_one=False),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 100).tolist(), num_train_timesteps=100),
]


@pytest.mark.parametrize("config", BETA_CONFIGS)
def test_alphas_cumprod_equal_diffusers(config):
    reference = DDIMScheduler(**config)
    schedule = NoiseSchedule.from_config(config)
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod.to(torch.float64))
    assert schedule.final_alpha_cumprod == float(reference.final_alpha_cumprod)
    assert schedule.num_train_timesteps == reference.config.num_train_timesteps


def test_from_scheduler_reads_any_diffusers_scheduler():
    pndm = PNDMScheduler(**{k: v for k, v in SD_CONFIG.items() if k != "clip_sample"}, skip_prk_steps=True)
    schedule = NoiseSchedule.from_scheduler(pndm)
    reference = DDIMScheduler.from_config(pndm.config)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod.double())
    assert schedule.steps_offset == 1 and schedule.timestep_spacing == "leading"
    with pytest.raises(PrefalignError):
        NoiseSchedule.from_scheduler(object())


SPACINGS = [
    dict(timestep_spacing="leading", steps_offset=0),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing"),
    dict(timestep_spacing="linspace"),
]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 3, 7, 10, 50, 999, 1000])
def test_levels_start_with_diffusers_timesteps(spacing, num_steps):
    config = dict(SD_CONFIG, **spacing)
    reference = DDIMScheduler(**config)
    reference.set_timesteps(num_steps)
    schedule = NoiseSchedule.from_config(config)
    if reference.timesteps.max() >= 1000:  # leading + steps_offset at 1000 steps: timestep 1000 does not exist
        with pytest.raises(PrefalignError):
            schedule.levels(num_steps)
        return
    levels = schedule.levels(num_steps)
    assert len(levels) == num_steps + 1
    assert levels[:-1] == reference.timesteps.tolist()
    assert all(a > b for a, b in zip(levels, levels[1:]))
    # the level after the last step follows diffusers' prev = t - T // n (negative → final level -1)
    assert levels[-1] == max(levels[-2] - 1000 // num_steps, -1)
    if spacing["timestep_spacing"] == "leading" or 1000 % num_steps == 0 and spacing["timestep_spacing"] == "trailing":
        # here every diffusers step lands on the next grid point
        assert all(nxt == max(t - 1000 // num_steps, -1) for t, nxt in zip(levels, levels[1:]))


def test_levels_trailing_prev_can_be_level_zero():
    # trailing, 6 steps: last timestep 166, 166 - 1000 // 6 = 0 → diffusers steps to ᾱ_0, not the final level
    assert NoiseSchedule.from_config(dict(timestep_spacing="trailing")).levels(6)[-2:] == [166, 0]


@pytest.mark.parametrize("num_steps", [0, -3, 1001, 2.5])
def test_levels_rejects_bad_num_steps(num_steps):
    with pytest.raises(PrefalignError):
        NoiseSchedule.from_config({}).levels(num_steps)


@pytest.mark.parametrize(
    "bad",
    [
        dict(beta_schedule="sigmoid"),
        dict(prediction_type="sample"),
        dict(timestep_spacing="karras"),
    ],
)
def test_bad_config_raises(bad):
    with pytest.raises(PrefalignError):
        NoiseSchedule.from_config(bad)


def test_bad_config_type_raises():
    with pytest.raises(PrefalignError):
        NoiseSchedule.from_config(["scaled_linear"])


def test_alpha_bar_ints_tensors_and_final_level():
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    assert schedule.alpha_bar(10).dtype == torch.float64
    assert schedule.alpha_bar(10).item() == schedule.alphas_cumprod[10].item()
    assert schedule.alpha_bar(-1).item() == schedule.final_alpha_cumprod
    assert schedule.alpha_bar(-20).item() == schedule.final_alpha_cumprod
    batch = schedule.alpha_bar(torch.tensor([-1, 0, 999]))
    assert batch.dtype == torch.float64
    assert batch.tolist() == [schedule.final_alpha_cumprod, schedule.alphas_cumprod[0].item(), schedule.alphas_cumprod[999].item()]
    assert NoiseSchedule.from_config({}).alpha_bar(-1).item() == 1.0  # set_alpha_to_one default
    with pytest.raises(PrefalignError):
        schedule.alpha_bar(1000)
    with pytest.raises(PrefalignError):
        schedule.alpha_bar(torch.tensor([0.5]))


def test_add_noise_matches_diffusers_per_sample():
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    reference = DDIMScheduler(**SD_CONFIG)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 8, 8, generator=generator)
    eps = torch.randn(3, 3, 8, 8, generator=generator)
    t = torch.tensor([0, 500, 999])
    ours = schedule.add_noise(x0, eps, t)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference.add_noise(x0, eps, t), rtol=0, atol=1e-6)
    # int timestep = the same level for every sample
    torch.testing.assert_close(schedule.add_noise(x0, eps, 500)[1], ours[1], rtol=0, atol=0)


def _sample_tensors(dtype):
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 8, 8, generator=generator, dtype=dtype)
    eps = torch.randn(2, 3, 8, 8, generator=generator, dtype=dtype)
    return x0, eps


@pytest.mark.parametrize("alpha_bar", [0.9991, 0.3, 0.0047, torch.tensor([0.9, 0.05], dtype=torch.float64)])
def test_v_and_eps_conversions_round_trip_in_float64(alpha_bar):
    x0, eps = _sample_tensors(torch.float64)
    a = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1, 1, 1, 1) if torch.is_tensor(alpha_bar) else alpha_bar
    x_t = (a**0.5) * x0 + ((1 - a) ** 0.5) * eps
    v = v_target(x0, eps, alpha_bar)
    for value in (v, eps_from_v(x_t, v, alpha_bar), x0_from_v(x_t, v, alpha_bar)):
        assert value.dtype == torch.float64
    torch.testing.assert_close(eps_from_v(x_t, v, alpha_bar), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0_from_v(x_t, v, alpha_bar), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(predicted_x0(x_t, eps, alpha_bar), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(implied_eps(x_t, x0, alpha_bar), eps, rtol=0, atol=1e-10)


def test_helpers_keep_float32():
    x0, eps = _sample_tensors(torch.float32)
    alpha_bar = torch.tensor(0.5, dtype=torch.float64)
    for fn in (predicted_x0, implied_eps, eps_from_v, x0_from_v, v_target):
        assert fn(x0, eps, alpha_bar).dtype == torch.float32


def test_per_sample_alpha_bar_needs_one_value_per_sample():
    x0, eps = _sample_tensors(torch.float64)
    with pytest.raises(PrefalignError):
        predicted_x0(x0, eps, torch.tensor([0.5, 0.5, 0.5]))


def test_classifier_free_guidance():
    uncond, cond = _sample_tensors(torch.float32)
    assert torch.equal(classifier_free_guidance(uncond, cond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond))


def test_levels_to_ends_exactly_at_t():
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    assert schedule.levels_to(350, 5) == [-1, 70, 140, 210, 280, 350]
    assert schedule.levels_to(3, 4) == [-1, 0, 1, 2, 3]
    with pytest.raises(PrefalignError):
        schedule.levels_to(3, 5)
