"""DDIM steps, the DDIM sampler and the stochastic-DDIM log-density (METHODS.md "Notation", §4).

All samplers take ``eps_fn(x_t, t) -> ε``: the ε prediction at integer level t (CFG and v→ε conversion
are the caller's job; see :func:`prefalign.diffusion.schedule.classifier_free_guidance` and
:func:`~prefalign.diffusion.schedule.eps_from_v`). With ``clip_sample=False``, ``thresholding=False``
and ``use_clipped_model_output=False``, :func:`ddim_step` is diffusers' ``DDIMScheduler.step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from prefalign.errors import PrefalignError
from prefalign.diffusion.schedule import AlphaBar, NoiseSchedule, _broadcast, _coefficients, predicted_x0

EpsFn = Callable[[Tensor, int], Tensor]
StepCallback = Callable[[int, int, Tensor, Tensor], None]


def clipped_x0(x_t: Tensor, eps: Tensor, alpha_bar_t: AlphaBar, clip_range: Optional[float] = None) -> Tensor:
    """x̂_0(x_t, t), clamped to [−clip_range, clip_range] when given (diffusers' ``clip_sample``)."""
    x0_hat = predicted_x0(x_t, eps, alpha_bar_t)
    return x0_hat if clip_range is None else x0_hat.clamp(-clip_range, clip_range)


def ddim_jump(
    x_s: Tensor, eps: Tensor, alpha_bar_s: AlphaBar, alpha_bar_u: AlphaBar, clip_range: Optional[float] = None
) -> Tensor:
    """D_{s→u}(x_s) = √ᾱ_u·x̂_0(x_s, s) + √(1−ᾱ_u)·ε (METHODS "Notation"); u < s samples, u > s inverts.

    x_s, eps: [B, ...]; returns [B, ...] in x_s's dtype. ``clip_range`` clamps x̂_0 (see
    :class:`NoiseSchedule.clip_sample_range`); D stays a function of x_s alone, so BDIA stays exact.
    """
    x0_hat = clipped_x0(x_s, eps, alpha_bar_s, clip_range)
    sqrt_alpha_u, sqrt_one_minus_u = _coefficients(alpha_bar_u, x_s, lambda a: (a.sqrt(), (1 - a).sqrt()))
    return sqrt_alpha_u * x0_hat + sqrt_one_minus_u * eps


def ddim_sigma(alpha_bar_t: AlphaBar, alpha_bar_prev: AlphaBar, eta: float) -> Tensor:
    """σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)) (DDIM eq. 16; METHODS §4). float64, shape of ᾱ."""
    alpha_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    alpha_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    return eta * variance.clamp(min=0).sqrt()


def ddim_step(
    x_t: Tensor,
    eps: Tensor,
    alpha_bar_t: AlphaBar,
    alpha_bar_prev: AlphaBar,
    eta: float = 0.0,
    noise: Optional[Tensor] = None,
    clip_range: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One DDIM step t → prev (DDIM eq. 12): returns (x_prev, mean, sigma).

        mean   = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev−σ_t²)·ε
        x_prev = mean + σ_t·noise

    x_t, eps, noise: [B, ...]. sigma (= :func:`ddim_sigma`) is cast to x_t's dtype and shaped to broadcast
    against x_t (0-d, or [B, 1, …] for per-sample ᾱ). ``noise`` is required when σ > 0. With η = 0 the
    result is bit-identical to ``ddim_jump(x_t, eps, ᾱ_t, ᾱ_prev)``.
    """
    sigma64 = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)  # float64, 0-d or [B]
    alpha_prev64 = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    direction64 = (1 - alpha_prev64 - sigma64**2).clamp(min=0).sqrt()
    x0_hat = clipped_x0(x_t, eps, alpha_bar_t, clip_range)
    mean = _broadcast(alpha_prev64.sqrt(), x_t) * x0_hat + _broadcast(direction64, x_t) * eps  # [B, ...]
    sigma = _broadcast(sigma64, x_t)
    if eta == 0:
        return mean, mean, sigma
    if noise is None:
        raise PrefalignError("ddim_step with eta > 0 needs `noise` (a standard-normal tensor shaped like x_t)")
    return mean + sigma * noise, mean, sigma


def ddim_sample(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    noises: Optional[Sequence[Tensor]] = None,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """DDIM sampling over ``schedule.levels(num_steps)`` (DDIM eq. 12), one eps_fn call per step.

    x_T: [B, ...] at level levels[0]. For η > 0 the noise of step i is ``noises[i]`` if given, else
    ``torch.randn(x.shape, generator=generator, dtype=x.dtype)`` (drawn on the generator's device).
    ``callback(step_index, t, x_t, x_prev)`` runs after every step. Returns x_0 [B, ...].
    """
    levels = schedule.levels(num_steps)
    if noises is not None and len(noises) != num_steps:
        raise PrefalignError(f"got {len(noises)} noise tensors for {num_steps} steps; give one per step")
    x = x_T
    for step_index, (t, t_prev) in enumerate(zip(levels[:-1], levels[1:])):
        eps = eps_fn(x, t)
        noise = None
        if eta > 0:
            noise = noises[step_index] if noises is not None else standard_normal_like(x, generator)
        x_prev, _, _ = ddim_step(
            x, eps, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), eta, noise, schedule.clip_sample_range
        )
        if callback is not None:
            callback(step_index, t, x, x_prev)
        x = x_prev
    return x


def standard_normal_like(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """N(0, I) shaped and typed like x, drawn with ``torch.randn(x.shape, generator=generator, dtype=x.dtype)``.

    Drawn on the generator's device (x's device when there is none), then moved to x's device,
    so a CPU generator gives the same numbers whatever device x lives on.
    """
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def ddim_log_prob(x_prev: Tensor, mean: Tensor, sigma: Tensor | float) -> Tensor:
    """log N(x_prev; mean, σ²I) per sample, **mean over elements** (DDPO convention, METHODS §4).

        log p = mean_{C,H,W}[ −(x_prev − mean)²/(2σ²) − log σ − ½·log 2π ]

    x_prev, mean: [B, ...]; sigma: scalar or broadcastable (as returned by :func:`ddim_step`). Returns [B].
    x_prev is not detached (DDPO detaches the stored sample; do so in the caller if needed).
    """
    sigma = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device)
    if bool((sigma <= 0).any()):
        raise PrefalignError("log-probabilities need a stochastic step (sigma > 0): sample with eta > 0")
    log_density = -((x_prev - mean) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, log_density.dim())))  # [B]
