"""DDIM inversion and BDIA exact inversion (METHODS.md §3, §5)."""

import pytest
import torch

from prefalign.diffusion import (
    NoiseSchedule,
    bdia_invert,
    bdia_regenerate,
    bdia_sample,
    count_calls,
    ddim_invert,
    ddim_sample,
    inversion_levels,
)
from prefalign.errors import PrefalignError

SHAPE = (2, 3, 8, 8)
SD_CONFIG = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)
SD = NoiseSchedule.from_config(SD_CONFIG)
COSINE = NoiseSchedule.from_config(dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"))


def make_eps_fn(dtype):
    """Deterministic, nonlinear, t-dependent stand-in for a network."""
    weight = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123), dtype=dtype)
    return lambda x, t: torch.tanh(x * weight + t / 1000)


def image(dtype, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def relative_error(value, target):
    return ((value - target).norm() / target.norm()).item()


@pytest.mark.parametrize("schedule", [SD, COSINE], ids=["sd", "cosine"])
@pytest.mark.parametrize("num_steps", [1, 10, 50])
def test_bdia_with_gamma_zero_is_ddim(schedule, num_steps):
    eps_fn = make_eps_fn(torch.float32)
    x_T = image(torch.float32, seed=1)
    ddim = ddim_sample(eps_fn, x_T, schedule, num_steps, eta=0.0)
    bdia = bdia_sample(eps_fn, x_T, schedule, num_steps, gamma=0.0)
    assert (bdia - ddim).abs().max().item() <= 1e-6


@pytest.mark.parametrize("num_steps", [1, 2, 10, 50])
def test_nfe_bdia_invert_equals_ddim_invert(num_steps):
    eps_fn, x0 = make_eps_fn(torch.float64), image(torch.float64)
    seen_ddim, seen_bdia = [], []
    counted_ddim = count_calls(lambda x, t: seen_ddim.append(t) or eps_fn(x, t))
    counted_bdia = count_calls(lambda x, t: seen_bdia.append(t) or eps_fn(x, t))
    ddim_invert(counted_ddim, x0, SD, num_steps)
    pair = bdia_invert(counted_bdia, x0, SD, num_steps, gamma=1.0)
    assert counted_ddim.calls == counted_bdia.calls == num_steps
    # both evaluate at the same levels: the image level (as timestep 0), then t_1 .. t_{N-1}
    assert seen_ddim == seen_bdia == [0] + [t for t in reversed(SD.levels(num_steps)) if t >= 0][:-1]
    counted_sample, counted_regenerate = count_calls(eps_fn), count_calls(eps_fn)
    bdia_sample(counted_sample, pair[0], SD, num_steps, gamma=1.0)
    bdia_regenerate(counted_regenerate, pair, SD, num_steps, gamma=1.0)
    assert counted_sample.calls == num_steps
    assert counted_regenerate.calls == num_steps - 1


# γ = 0.5 only at 10 steps (the BDIA reference setting): the inversion's parasitic mode grows like
# (1/γ)^k, so at 50 steps with γ = 0.5 |z_N| reaches ~1e13 and float64 rounding alone gives ~1e-3.
@pytest.mark.parametrize(
    "schedule,gamma,num_steps",
    [(SD, 1.0, 50), (SD, 0.5, 10), (SD, 0.9, 50), (COSINE, 1.0, 50), (COSINE, 0.5, 10)],
    ids=["sd-1.0-50", "sd-0.5-10", "sd-0.9-50", "cosine-1.0-50", "cosine-0.5-10"],
)
def test_bdia_round_trip_is_exact_in_float64(schedule, gamma, num_steps):
    eps_fn, x0 = make_eps_fn(torch.float64), image(torch.float64)
    pair = bdia_invert(eps_fn, x0, schedule, num_steps, gamma)
    assert pair[0].dtype == torch.float64
    regenerated = bdia_regenerate(eps_fn, pair, schedule, num_steps, gamma)
    assert relative_error(regenerated, x0) <= 1e-9


def test_bdia_round_trip_float32():
    eps_fn, x0 = make_eps_fn(torch.float32), image(torch.float32)
    for gamma, num_steps in [(1.0, 50), (0.5, 10)]:
        pair = bdia_invert(eps_fn, x0, SD, num_steps, gamma)
        regenerated = bdia_regenerate(eps_fn, pair, SD, num_steps, gamma)
        assert regenerated.dtype == torch.float32
        assert relative_error(regenerated, x0) <= 1e-4


def test_plain_ddim_round_trip_is_far_worse_than_bdia(record_property):
    eps_fn, x0 = make_eps_fn(torch.float64), image(torch.float64)
    ddim_error = relative_error(ddim_sample(eps_fn, ddim_invert(eps_fn, x0, SD, 50), SD, 50), x0)
    bdia_error = relative_error(bdia_regenerate(eps_fn, bdia_invert(eps_fn, x0, SD, 50, 1.0), SD, 50, 1.0), x0)
    record_property("ddim_round_trip_rel_error", ddim_error)
    record_property("bdia_round_trip_rel_error", bdia_error)
    print(f"round-trip relative error, 50 steps float64: DDIM {ddim_error:.3e}, BDIA(γ=1) {bdia_error:.3e}")
    assert ddim_error >= 100 * bdia_error
    assert ddim_error > 1e-6  # the approximation ε(x_u, u) ≈ ε(x_s, s) really costs something here


def test_round_trip_on_an_explicit_grid_that_ends_at_t():
    eps_fn, x0 = make_eps_fn(torch.float64), image(torch.float64)
    grid = SD.levels_to(350, 7)
    pair = bdia_invert(eps_fn, x0, SD, None, 1.0, levels=grid)
    assert relative_error(bdia_regenerate(eps_fn, pair, SD, None, 1.0, levels=grid), x0) <= 1e-9


def test_bdia_invert_rejects_non_positive_gamma():
    eps_fn, x0 = make_eps_fn(torch.float64), image(torch.float64)
    for gamma in (0.0, -0.5):
        with pytest.raises(PrefalignError):
            bdia_invert(eps_fn, x0, SD, 10, gamma)


def test_up_to_t_stops_at_nearest_grid_point_at_or_above():
    # SD, 10 steps, ascending grid: [-1, 1, 101, 201, ..., 901]
    assert inversion_levels(SD, 10) == [-1, 1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    assert inversion_levels(SD, 10, up_to_t=350)[-1] == 401
    assert inversion_levels(SD, 10, up_to_t=401)[-1] == 401
    assert inversion_levels(SD, 10, up_to_t=0)[-1] == 1
    assert inversion_levels(SD, 10, up_to_t=999)[-1] == 901  # above the grid: its top
    assert inversion_levels(SD, 10, up_to_t=350, stop_rule="below")[-1] == 301  # InPO train.py
    seen = []
    counted = count_calls(lambda x, t: seen.append(t) or make_eps_fn(torch.float64)(x, t))
    x0 = image(torch.float64)
    latent = ddim_invert(counted, x0, SD, 10, up_to_t=350)
    assert counted.calls == 5 and seen == [0, 1, 101, 201, 301]  # ε at (x_s, s); the image level as t=0
    explicit = ddim_invert(make_eps_fn(torch.float64), x0, SD, None, levels=[-1, 1, 101, 201, 301, 401])
    assert torch.equal(latent, explicit)
    with pytest.raises(PrefalignError):
        ddim_invert(counted, x0, SD, 10, up_to_t=1000)
    with pytest.raises(PrefalignError):
        ddim_invert(counted, x0, SD, None, levels=[-1, 300, 200])


def test_stochastic_scale_changes_result_and_is_seed_reproducible():
    eps_fn, x0 = make_eps_fn(torch.float32), image(torch.float32)

    def invert(scale, seed):
        return ddim_invert(eps_fn, x0, SD, 10, up_to_t=500, stochastic_scale=scale,
                           generator=torch.Generator().manual_seed(seed))

    deterministic = invert(0.0, 0)
    noisy = invert(0.1, 0)
    assert not torch.allclose(noisy, deterministic)
    assert torch.equal(noisy, invert(0.1, 0))
    assert not torch.equal(noisy, invert(0.1, 1))
    assert (noisy - deterministic).abs().max().item() < 1.0  # a small perturbation, not a new sample
    with pytest.raises(PrefalignError):
        invert(-0.1, 0)


def test_invert_eps_timestep_target_convention():
    seen = []
    ddim_invert(lambda x, t: seen.append(t) or torch.zeros_like(x), image(torch.float64), SD, 10,
                up_to_t=350, eps_timestep="target")
    assert seen == [1, 101, 201, 301, 401]


def test_bdia_round_trip_stays_exact_with_clipped_x0():
    """x̂_0 clipping (pixel models) keeps each D a function of z_i alone, so BDIA stays exact, and
    clipping really is active on this trajectory."""
    from prefalign.diffusion import NoiseSchedule, bdia_invert, bdia_regenerate

    config = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", clip_sample=True, clip_sample_range=1.0)
    schedule = NoiseSchedule.from_config(config)
    unclipped = NoiseSchedule.from_config({**config, "clip_sample": False})
    assert schedule.clip_sample_range == 1.0 and unclipped.clip_sample_range is None
    weight = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps_fn = lambda x, t: torch.tanh(x * weight + t / 1000)  # noqa: E731
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    pair = bdia_invert(eps_fn, x0, schedule, 20, 1.0)
    rebuilt = bdia_regenerate(eps_fn, pair, schedule, 20, 1.0)
    assert ((rebuilt - x0).norm() / x0.norm()).item() <= 1e-9
    assert not torch.allclose(pair[0], bdia_invert(eps_fn, x0, unclipped, 20, 1.0)[0])
