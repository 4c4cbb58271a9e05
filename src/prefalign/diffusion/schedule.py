"""The VP noise schedule ᾱ_t and the pure ε / x̂_0 / v conversions (METHODS.md, "Notation").

Conventions
-----------
* Levels are integers t = 0..T-1 (T = ``num_train_timesteps``); level ``-1`` (any negative level) is
  the "final" level after the last sampling step, whose ᾱ is ``final_alpha_cumprod`` (1.0 when the
  diffusers config has ``set_alpha_to_one=True``, else ᾱ_0) — exactly as diffusers' DDIMScheduler.
* ``alphas_cumprod`` is computed the way diffusers computes it (float32 betas, float32 cumprod) and
  then stored as float64, so it is bit-identical to ``DDIMScheduler(**config).alphas_cumprod``.
* Every helper computes its scalar coefficients (√ᾱ, √(1−ᾱ), …) in float64 and casts them to the
  dtype of the tensor argument, so float64 inputs stay float64 end to end and float32 stays float32.
  An ``alpha_bar`` argument may be a python float, a 0-d tensor, or a tensor of shape [B] (one level
  per sample), which is broadcast over the non-batch dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from prefalign.errors import PrefalignError

AlphaBar = Union[float, Tensor]
Timestep = Union[int, Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# Defaults of diffusers.DDIMScheduler.__init__ for the keys this module reads.
_DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
    "clip_sample": True,
    "clip_sample_range": 1.0,
}


# --------------------------------------------------------------------------------------------------
# Beta schedules (diffusers' DDIMScheduler.__init__, reproduced in float32 for bit-equality)
# --------------------------------------------------------------------------------------------------


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Glide cosine schedule: β_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), 0.999), ᾱ(t) = cos²((t+0.008)/1.008·π/2).

    Returns float32 [T], as diffusers' ``betas_for_alpha_bar``.
    """

    def alpha_bar_fn(time: float) -> float:
        return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar_fn((i + 1) / num_train_timesteps) / alpha_bar_fn(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift/scale √ᾱ so that ᾱ_{T−1} = 0 (diffusers' implementation)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def betas_from_config(config: Mapping[str, Any]) -> Tensor:
    """β_t (float32 [T]) from a diffusers scheduler config, exactly as ``DDIMScheduler.__init__``."""
    cfg = {**_DDIM_DEFAULTS, **dict(config)}
    num_train_timesteps = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(np.asarray(cfg["trained_betas"]), dtype=torch.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], num_train_timesteps, dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = (
            torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, num_train_timesteps, dtype=torch.float32)
            ** 2
        )
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise PrefalignError(
            f"unknown beta_schedule {cfg['beta_schedule']!r} in the scheduler config; "
            f"use one of {', '.join(BETA_SCHEDULES)} or give trained_betas"
        )
    if cfg["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


# --------------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class NoiseSchedule:
    """ᾱ_t of a VP diffusion (x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε) plus the DDIM timestep-grid settings.

    Build it with :meth:`from_config` / :meth:`from_scheduler`; ``alphas_cumprod`` is float64 [T].
    ``clip_sample_range`` (from diffusers' ``clip_sample``/``clip_sample_range``; None = no clipping)
    clamps x̂_0 to [−r, r] inside every DDIM/BDIA jump, as ``DDIMScheduler.step`` does (ε stays the
    model's). Pixel-space models need it: with a cosine schedule ᾱ_999 ≈ 2e-9, so x̂_0 at the top
    level amplifies ε errors ~2e4×. Dynamic thresholding (``thresholding``) is not supported.
    """

    alphas_cumprod: Tensor  # float64 [T]
    final_alpha_cumprod: float
    num_train_timesteps: int
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample_range: Optional[float] = None

    def __post_init__(self) -> None:
        self.alphas_cumprod = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).reshape(-1)
        if self.alphas_cumprod.numel() != self.num_train_timesteps:
            raise PrefalignError(
                f"the schedule has {self.alphas_cumprod.numel()} alphas_cumprod values but "
                f"num_train_timesteps={self.num_train_timesteps}; make them agree"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise PrefalignError(
                f"prediction_type {self.prediction_type!r} is not supported; use one of {', '.join(PREDICTION_TYPES)}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise PrefalignError(
                f"timestep_spacing {self.timestep_spacing!r} is not supported; "
                f"use one of {', '.join(TIMESTEP_SPACINGS)}"
            )
        self.final_alpha_cumprod = float(self.final_alpha_cumprod)
        self.steps_offset = int(self.steps_offset)

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """From a diffusers scheduler config dict; ᾱ equals ``diffusers.DDIMScheduler(**config)``'s.

        Keys read (diffusers' DDIMScheduler defaults otherwise): beta_schedule, beta_start, beta_end,
        num_train_timesteps, trained_betas, rescale_betas_zero_snr, set_alpha_to_one, steps_offset,
        timestep_spacing, prediction_type, clip_sample, clip_sample_range. Other keys are ignored.
        """
        if not isinstance(config, Mapping):
            raise PrefalignError(
                f"a scheduler config must be a dict (got {type(config).__name__}); "
                "pass scheduler.config or use NoiseSchedule.from_scheduler(scheduler)"
            )
        cfg = {**_DDIM_DEFAULTS, **dict(config)}
        betas = betas_from_config(cfg)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32 [T], as diffusers
        final = 1.0 if cfg["set_alpha_to_one"] else float(alphas_cumprod[0])
        return cls(
            alphas_cumprod=alphas_cumprod.to(torch.float64),
            final_alpha_cumprod=final,
            num_train_timesteps=int(alphas_cumprod.numel()),
            prediction_type=str(cfg["prediction_type"]),
            timestep_spacing=str(cfg["timestep_spacing"]),
            steps_offset=int(cfg["steps_offset"]),
            clip_sample_range=float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None,
        )

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """From any diffusers scheduler object (reads its ``.config``)."""
        config = getattr(scheduler, "config", None)
        if config is None:
            raise PrefalignError(
                f"{type(scheduler).__name__} has no .config; pass a diffusers scheduler or use from_config(dict)"
            )
        return cls.from_config(dict(config))

    # ---- ᾱ lookup ---------------------------------------------------------------------------------

    def alpha_bar(self, t: Timestep) -> Tensor:
        """ᾱ_t (float64) at integer level(s) t; t < 0 is the final level (``final_alpha_cumprod``).

        t: python int → 0-d tensor; int tensor of any shape → float64 tensor of that shape (on t's device).
        """
        if isinstance(t, Tensor):
            if t.is_floating_point() or t.is_complex():
                raise PrefalignError("timesteps must be integers (a LongTensor); round them before calling alpha_bar")
            self._check_level_range(int(t.max()) if t.numel() else -1)
            table = self.alphas_cumprod.to(t.device)
            final = torch.full_like(t, 0, dtype=torch.float64) + self.final_alpha_cumprod
            return torch.where(t < 0, final, table[t.clamp(min=0).long()])
        t = int(t)
        self._check_level_range(t)
        if t < 0:
            return torch.tensor(self.final_alpha_cumprod, dtype=torch.float64)
        return self.alphas_cumprod[t].clone()

    def _check_level_range(self, t_max: int) -> None:
        if t_max >= self.num_train_timesteps:
            raise PrefalignError(
                f"timestep {t_max} is outside the schedule (0..{self.num_train_timesteps - 1}); "
                "use a level below num_train_timesteps"
            )

    # ---- grids ------------------------------------------------------------------------------------

    def timesteps(self, num_steps: int) -> list[int]:
        """diffusers' ``DDIMScheduler.set_timesteps(num_steps).timesteps`` (descending), as python ints."""
        self._check_num_steps(num_steps)
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            grid = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            grid = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + self.steps_offset
        else:  # trailing
            grid = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
        return [int(t) for t in grid]

    def levels(self, num_steps: int) -> list[int]:
        """Descending DDIM grid [t_N, …, t_1, t_0] (length num_steps+1); step i goes levels[i] → levels[i+1].

        The first num_steps entries are diffusers' ``set_timesteps(num_steps).timesteps``. The last entry is
        diffusers' level after the final step, t_last − T//num_steps, with every negative value written −1
        (the final level, ᾱ = final_alpha_cumprod). Interior steps go to the next grid point. That equals
        diffusers' rule prev = t − T//num_steps for "leading" spacing, and for "trailing" when num_steps
        divides T. **Deviation**: for "linspace" (and "trailing" with num_steps not dividing T) diffusers'
        t − T//num_steps does not land on the grid; we step to the next grid point instead.
        """
        grid = self.timesteps(num_steps)
        if any(a <= b for a, b in zip(grid, grid[1:])):
            raise PrefalignError(
                f"{num_steps} steps with timestep_spacing={self.timestep_spacing!r} give repeated timesteps; "
                "use fewer steps"
            )
        if grid[-1] >= self.num_train_timesteps or grid[0] >= self.num_train_timesteps:
            raise PrefalignError(
                f"steps_offset={self.steps_offset} pushes the grid past timestep {self.num_train_timesteps - 1}; "
                "use a smaller steps_offset"
            )
        last = grid[-1] - self.num_train_timesteps // num_steps
        return grid + [max(last, -1)]

    def levels_to(self, t: int, num_steps: int) -> list[int]:
        """Ascending grid [−1, …, t] of num_steps steps that ends exactly at level t (exact InPO inversion).

        Levels are round(k·t/num_steps) for k = 1..num_steps, preceded by the final level −1.
        """
        t = int(t)
        if not 0 <= t < self.num_train_timesteps:
            raise PrefalignError(f"level {t} is outside 0..{self.num_train_timesteps - 1}; pick a valid timestep")
        if not 1 <= num_steps <= t + 1:
            raise PrefalignError(f"cannot reach level {t} in {num_steps} distinct steps; use 1..{t + 1} steps")
        upper = [int(round(k * t / num_steps)) for k in range(1, num_steps + 1)]
        if num_steps == t + 1:
            upper = list(range(0, t + 1))
        return [-1] + upper

    def _check_num_steps(self, num_steps: int) -> None:
        if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= self.num_train_timesteps:
            raise PrefalignError(
                f"num_steps must be an integer in 1..{self.num_train_timesteps} (got {num_steps!r})"
            )

    # ---- forward process --------------------------------------------------------------------------

    def add_noise(self, x0: Tensor, eps: Tensor, t: Timestep) -> Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (METHODS "Notation"); t int or LongTensor [B] (per sample)."""
        alpha_bar_t = self.alpha_bar(t)
        sqrt_alpha, sqrt_one_minus = _coefficients(alpha_bar_t, x0, lambda a: (a.sqrt(), (1 - a).sqrt()))
        return sqrt_alpha * x0 + sqrt_one_minus * eps  # [B, ...]


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """Cast a float64 coefficient (0-d or [B]) to like's dtype/device, shaped [B, 1, …] to broadcast on like."""
    if values.dim() == 1 and like.dim() >= 1:
        if values.shape[0] not in (1, like.shape[0]):
            raise PrefalignError(
                f"got {values.shape[0]} per-sample alpha_bar values for a batch of {like.shape[0]}; "
                "give one value per sample or a scalar"
            )
        values = values.reshape(-1, *([1] * (like.dim() - 1)))
    elif values.dim() > 1:
        raise PrefalignError(f"alpha_bar must be a scalar or a [B] tensor, got shape {tuple(values.shape)}")
    return values.to(device=like.device, dtype=like.dtype)


def _coefficients(alpha_bar: AlphaBar, like: Tensor, formula) -> tuple[Tensor, ...]:
    """Evaluate ``formula(ᾱ)`` in float64, then cast each result to like's dtype/device, shaped to broadcast.

    ᾱ: float, 0-d tensor, or [B] tensor (→ [B, 1, …, 1] against like [B, …]).
    """
    alpha = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return tuple(_broadcast(c, like) for c in formula(alpha))


def predicted_x0(x_t: Tensor, eps: Tensor, alpha_bar_t: AlphaBar) -> Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t (METHODS "Notation")."""
    inv_sqrt_alpha, sqrt_one_minus = _coefficients(alpha_bar_t, x_t, lambda a: (1 / a.sqrt(), (1 - a).sqrt()))
    return (x_t - sqrt_one_minus * eps) * inv_sqrt_alpha


def implied_eps(x_t: Tensor, x0: Tensor, alpha_bar_t: AlphaBar) -> Tensor:
    """ε = (x_t − √ᾱ_t·x_0) / √(1−ᾱ_t) (METHODS §3): the noise for which x_t = √ᾱ x_0 + √(1−ᾱ) ε exactly."""
    sqrt_alpha, inv_sqrt_one_minus = _coefficients(alpha_bar_t, x_t, lambda a: (a.sqrt(), 1 / (1 - a).sqrt()))
    return (x_t - sqrt_alpha * x0) * inv_sqrt_one_minus


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar_t: AlphaBar) -> Tensor:
    """ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t (v-parametrisation, Salimans & Ho 2022; diffusers' DDIM step)."""
    sqrt_alpha, sqrt_one_minus = _coefficients(alpha_bar_t, x_t, lambda a: (a.sqrt(), (1 - a).sqrt()))
    return sqrt_alpha * v + sqrt_one_minus * x_t


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar_t: AlphaBar) -> Tensor:
    """x̂_0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v (v-parametrisation)."""
    sqrt_alpha, sqrt_one_minus = _coefficients(alpha_bar_t, x_t, lambda a: (a.sqrt(), (1 - a).sqrt()))
    return sqrt_alpha * x_t - sqrt_one_minus * v


def v_target(x0: Tensor, eps: Tensor, alpha_bar_t: AlphaBar) -> Tensor:
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (the v-prediction training target; diffusers' ``get_velocity``)."""
    sqrt_alpha, sqrt_one_minus = _coefficients(alpha_bar_t, x0, lambda a: (a.sqrt(), (1 - a).sqrt()))
    return sqrt_alpha * eps - sqrt_one_minus * x0


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float | Tensor) -> Tensor:
    """ε_cfg = ε_u + w·(ε_c − ε_u) (METHODS §6), written ε_c + (w−1)·(ε_c − ε_u) so w = 1 returns ε_c exactly."""
    return eps_cond + (guidance_scale - 1) * (eps_cond - eps_uncond)
