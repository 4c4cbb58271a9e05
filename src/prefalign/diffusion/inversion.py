"""DDIM inversion (METHODS.md §3) and BDIA exact inversion (METHODS.md §5).

Grids. Sampling grids are descending ``schedule.levels(num_steps)`` = [t_N, …, t_0]; inversion walks the
same grid ascending, [t_0, t_1, …, t_N], where t_0 is the image level (−1, the "final" level of the
sampler, for diffusers grids). Whenever a network evaluation happens at the image level (the first
inversion step), ``eps_fn`` receives timestep ``max(t_0, 0)`` = 0, the nearest level the model knows.

BDIA index convention (z_i lives at level t_i, i = 0..N; one eps_fn call per update, made at z_i):

    sampling   z_N = x_T;  z_{N−1} = D_{N→N−1}(z_N)                             (plain DDIM, 1 call)
               z_{i−1} = γ·z_{i+1} − γ·D_{i→i+1}(z_i) + D_{i→i−1}(z_i),  i = N−1, …, 1   (N−1 calls)
    inversion  z_1 = D_{0→1}(z_0)                                              (plain DDIM, ε at z_0)
               z_{i+1} = (z_{i−1} − D_{i→i−1}(z_i))/γ + D_{i→i+1}(z_i),  i = 1, …, N−1   (N−1 calls)
               → returns the pair (z_N, z_{N−1});  N calls in all, as DDIM inversion
    regenerate from (z_N, z_{N−1}): the BDIA update for i = N−1, …, 1 (no plain first step), N−1 calls.

The inversion update at index i is solved exactly by the sampling update at the same i (same z_i, same
ε(z_i, t_i), so the same D values), so regeneration undoes i = N−1, …, 1 in turn and its last update
(i = 1) returns z_0 = γ·z_2 − γ·D_{1→2}(z_1) + D_{1→0}(z_1). The plain first inversion step z_0 → z_1 is
never inverted: it only *defines* z_1, and z_0 is recovered from (z_2, z_1) by the i = 1 update. Hence
regenerate(invert(x_0)) = x_0 up to rounding for any eps_fn, and sampling from noise differs from
regeneration only in its first step (plain DDIM, because there is no z_{N+1}).

Conditioning. Linearised, the inversion recurrence has a neutral mode and a parasitic one that grows
like (−1/γ)^k (the plain first step and any t-dependence excite it). Regeneration damps it back, but the
round-trip error is about machine-ε·max|z_i|: fine for γ = 1 at any N and γ = 0.5 at 10 steps
(~1e-14 in float64), useless for γ = 0.5 at 50 steps (|z_N| ~ 1e13, error ~1e-3). Keep γ^(N−1) ≳ 1e-4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from prefalign.errors import PrefalignError
from prefalign.diffusion.ddim import EpsFn, StepCallback, ddim_jump, ddim_sigma, standard_normal_like
from prefalign.diffusion.schedule import NoiseSchedule

STOP_RULES = ("at_or_above", "below")
EPS_TIMESTEPS = ("source", "target")


# --------------------------------------------------------------------------------------------------
# NFE counting
# --------------------------------------------------------------------------------------------------


class CallCounter:
    """Wraps an ``eps_fn`` and counts its calls in ``.calls`` (network function evaluations, NFE)."""

    def __init__(self, eps_fn: EpsFn) -> None:
        self.eps_fn = eps_fn
        self.calls = 0

    def __call__(self, x_t: Tensor, t: int) -> Tensor:
        self.calls += 1
        return self.eps_fn(x_t, t)


def count_calls(eps_fn: EpsFn) -> CallCounter:
    """``counted = count_calls(eps_fn)``; pass ``counted`` to a sampler, then read ``counted.calls``."""
    return CallCounter(eps_fn)


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------


def _model_timestep(level: int) -> int:
    """Timestep handed to eps_fn for a level: the final level (−1) is evaluated as timestep 0."""
    return max(int(level), 0)


def _checked_levels(schedule: NoiseSchedule, levels: Sequence[int], num_steps: Optional[int]) -> list[int]:
    """Validate an explicit ascending grid [t_0 < t_1 < … < t_N] (t_0 may be −1, the final level)."""
    grid = [int(t) for t in levels]
    if len(grid) < 2:
        raise PrefalignError("an inversion grid needs at least two levels: the image level and one above it")
    if num_steps is not None and num_steps != len(grid) - 1:
        raise PrefalignError(
            f"num_steps={num_steps} but the explicit grid has {len(grid) - 1} steps; pass num_steps=None or agree"
        )
    grid[0] = max(grid[0], -1)
    if any(a >= b for a, b in zip(grid, grid[1:])):
        raise PrefalignError(f"inversion levels must be strictly ascending, got {grid}")
    if grid[1] < 0 or grid[-1] >= schedule.num_train_timesteps:
        raise PrefalignError(
            f"inversion levels must lie in -1..{schedule.num_train_timesteps - 1} with only the first negative, "
            f"got {grid}"
        )
    return grid


def ascending_levels(
    schedule: NoiseSchedule, num_steps: Optional[int], levels: Optional[Sequence[int]] = None
) -> list[int]:
    """[t_0, …, t_N]: the given explicit ascending grid, or ``reversed(schedule.levels(num_steps))``."""
    if levels is not None:
        return _checked_levels(schedule, levels, num_steps)
    if num_steps is None:
        raise PrefalignError("give num_steps or an explicit ascending `levels` grid")
    return list(reversed(schedule.levels(num_steps)))


def inversion_levels(
    schedule: NoiseSchedule,
    num_steps: Optional[int],
    *,
    up_to_t: Optional[int] = None,
    levels: Optional[Sequence[int]] = None,
    stop_rule: str = "at_or_above",
) -> list[int]:
    """The ascending levels :func:`ddim_invert` visits; the last entry is the level of the returned latent.

    up_to_t = None: the whole grid. Otherwise the grid is cut at
      * ``"at_or_above"`` (METHODS §3): the smallest grid level ≥ up_to_t (the top level if none is ≥);
      * ``"below"``: the largest grid level < up_to_t, which is what the released InPO train.py does
        (``timesteps[timesteps < t]``); for up_to_t at or below the first grid level no step is taken.
    """
    grid = ascending_levels(schedule, num_steps, levels)
    if up_to_t is None:
        return grid
    up_to_t = int(up_to_t)
    if not 0 <= up_to_t < schedule.num_train_timesteps:
        raise PrefalignError(f"up_to_t={up_to_t} is outside 0..{schedule.num_train_timesteps - 1}")
    if stop_rule == "at_or_above":
        stop = next((k for k, level in enumerate(grid) if level >= up_to_t), len(grid) - 1)
    elif stop_rule == "below":
        stop = max(k for k, level in enumerate(grid) if level < up_to_t or k == 0)
    else:
        raise PrefalignError(f"stop_rule must be one of {', '.join(STOP_RULES)} (got {stop_rule!r})")
    return grid[: stop + 1]


# --------------------------------------------------------------------------------------------------
# DDIM inversion
# --------------------------------------------------------------------------------------------------


def ddim_invert(
    eps_fn: EpsFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    num_steps: Optional[int],
    *,
    up_to_t: Optional[int] = None,
    levels: Optional[Sequence[int]] = None,
    stochastic_scale: float = 0.0,
    eta_for_noise: float = 1.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
    stop_rule: str = "at_or_above",
    eps_timestep: str = "source",
) -> Tensor:
    """DDIM inversion x_s → x_u = D_{s→u}(x_s) along :func:`inversion_levels` (METHODS §3), 1 call per step.

    x0: [B, ...] at the image level. ε is evaluated at (x_s, s) (``eps_timestep="source"``, the standard
    approximation ε(x_u, u) ≈ ε(x_s, s)); ``"target"`` evaluates at (x_s, u) as diffusers'
    DDIMInverseScheduler pipelines (and InPO's train.py) do. ``stochastic_scale`` > 0 adds
    stochastic_scale·σ·N(0, I) after each step, σ = ddim_sigma(ᾱ_u, ᾱ_s, eta_for_noise) being the DDIM
    σ of the reverse step u → s (InPO reference: 0.1); noise is drawn from ``generator``.
    ``callback(step_index, s, x_s, x_u)`` runs after every step. Returns the latent at the last level of
    ``inversion_levels(...)`` (call it to learn that level).
    """
    if eps_timestep not in EPS_TIMESTEPS:
        raise PrefalignError(f"eps_timestep must be one of {', '.join(EPS_TIMESTEPS)} (got {eps_timestep!r})")
    if stochastic_scale < 0:
        raise PrefalignError(f"stochastic_scale must be >= 0 (got {stochastic_scale})")
    grid = inversion_levels(schedule, num_steps, up_to_t=up_to_t, levels=levels, stop_rule=stop_rule)
    clip = schedule.clip_sample_range
    x = x0
    for step_index, (s, u) in enumerate(zip(grid[:-1], grid[1:])):
        alpha_bar_s, alpha_bar_u = schedule.alpha_bar(s), schedule.alpha_bar(u)
        eps = eps_fn(x, _model_timestep(s if eps_timestep == "source" else u))
        x_next = ddim_jump(x, eps, alpha_bar_s, alpha_bar_u, clip)  # [B, ...]
        if stochastic_scale > 0:
            sigma = float(ddim_sigma(alpha_bar_u, alpha_bar_s, eta_for_noise))
            x_next = x_next + (stochastic_scale * sigma) * standard_normal_like(x_next, generator)
        if callback is not None:
            callback(step_index, s, x, x_next)
        x = x_next
    return x


# --------------------------------------------------------------------------------------------------
# BDIA
# --------------------------------------------------------------------------------------------------


def _bdia_descend(
    eps_fn: EpsFn,
    z_upper: Tensor,
    z_current: Tensor,
    grid: list[int],
    schedule: NoiseSchedule,
    gamma: float,
    callback: Optional[StepCallback],
    first_step_index: int,
) -> Tensor:
    """BDIA sampling updates i = N−1, …, 1 from (z_{N}, z_{N−1}) (METHODS §5, first line); returns z_0.

        z_{i−1} = γ·z_{i+1} − γ·D_{i→i+1}(z_i) + D_{i→i−1}(z_i)
    """
    alpha_bars = [schedule.alpha_bar(t) for t in grid]
    num_steps = len(grid) - 1
    clip = schedule.clip_sample_range
    for offset, i in enumerate(range(num_steps - 1, 0, -1)):
        eps = eps_fn(z_current, _model_timestep(grid[i]))
        jump_up = ddim_jump(z_current, eps, alpha_bars[i], alpha_bars[i + 1], clip)
        jump_down = ddim_jump(z_current, eps, alpha_bars[i], alpha_bars[i - 1], clip)
        z_lower = gamma * z_upper - gamma * jump_up + jump_down  # [B, ...]; γ = 0 gives jump_down exactly
        if callback is not None:
            callback(first_step_index + offset, grid[i], z_current, z_lower)
        z_upper, z_current = z_current, z_lower
    return z_current


def bdia_sample(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: Optional[int],
    gamma: float,
    callback: Optional[StepCallback] = None,
    *,
    levels: Optional[Sequence[int]] = None,
) -> Tensor:
    """BDIA sampling from noise (METHODS §5): plain DDIM first step, then the BDIA update; N calls.

    x_T: [B, ...] at the top level; ``levels`` optionally an explicit ascending grid (as for inversion).
    ``callback(step_index, t_i, z_i, z_{i−1})`` after every step. γ = 0 is exactly ``ddim_sample(eta=0)``.
    """
    grid = ascending_levels(schedule, num_steps, levels)
    top = len(grid) - 1
    clip = schedule.clip_sample_range
    eps = eps_fn(x_T, _model_timestep(grid[top]))
    z_below = ddim_jump(x_T, eps, schedule.alpha_bar(grid[top]), schedule.alpha_bar(grid[top - 1]), clip)
    if callback is not None:
        callback(0, grid[top], x_T, z_below)
    return _bdia_descend(eps_fn, x_T, z_below, grid, schedule, gamma, callback, first_step_index=1)


def bdia_invert(
    eps_fn: EpsFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    num_steps: Optional[int],
    gamma: float,
    *,
    levels: Optional[Sequence[int]] = None,
    callback: Optional[StepCallback] = None,
) -> tuple[Tensor, Tensor]:
    """BDIA exact inversion (METHODS §5): z_1 = D_{0→1}(z_0), then for i = 1..N−1

        z_{i+1} = (z_{i−1} − D_{i→i−1}(z_i)) / γ + D_{i→i+1}(z_i)

    x0: [B, ...]. Returns the pair (z_N, z_{N−1}) for :func:`bdia_regenerate`; exactly N eps_fn calls.
    ``callback(step_index, t_i, z_i, z_{i+1})`` after every step. γ must be > 0 (keep it near 1: 1/γ
    amplifies rounding).
    """
    if not gamma > 0:
        raise PrefalignError(f"BDIA inversion divides by gamma; use gamma > 0 (got {gamma}), ideally near 1")
    grid = ascending_levels(schedule, num_steps, levels)
    alpha_bars = [schedule.alpha_bar(t) for t in grid]
    clip = schedule.clip_sample_range
    eps = eps_fn(x0, _model_timestep(grid[0]))
    z_previous, z_current = x0, ddim_jump(x0, eps, alpha_bars[0], alpha_bars[1], clip)
    if callback is not None:
        callback(0, grid[0], x0, z_current)
    for i in range(1, len(grid) - 1):
        eps = eps_fn(z_current, _model_timestep(grid[i]))
        jump_down = ddim_jump(z_current, eps, alpha_bars[i], alpha_bars[i - 1], clip)
        jump_up = ddim_jump(z_current, eps, alpha_bars[i], alpha_bars[i + 1], clip)
        z_next = (z_previous - jump_down) / gamma + jump_up  # [B, ...]
        if callback is not None:
            callback(i, grid[i], z_current, z_next)
        z_previous, z_current = z_current, z_next
    return z_current, z_previous


def bdia_regenerate(
    eps_fn: EpsFn,
    state_pair: tuple[Tensor, Tensor],
    schedule: NoiseSchedule,
    num_steps: Optional[int],
    gamma: float,
    *,
    levels: Optional[Sequence[int]] = None,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """BDIA sampling continued from the pair (z_N, z_{N−1}) of :func:`bdia_invert`; returns z_0 (N−1 calls).

    Every step is the BDIA update (METHODS §5), including the first and the last (i = 1), so
    ``bdia_regenerate(bdia_invert(x0))`` reproduces x0 up to rounding. Use the same grid and γ as the
    inversion. ``callback(step_index, t_i, z_i, z_{i−1})`` after every step.
    """
    if len(state_pair) != 2:
        raise PrefalignError("state_pair must be the pair (z_N, z_{N-1}) returned by bdia_invert")
    grid = ascending_levels(schedule, num_steps, levels)
    z_top, z_below = state_pair
    return _bdia_descend(eps_fn, z_top, z_below, grid, schedule, gamma, callback, first_step_index=0)
