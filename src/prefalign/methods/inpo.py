"""DDIM-InPO (Lu et al., CVPR 2025; METHODS.md §3): DPO's loss, scored not at fresh noise but at the
DDIM inversion of each image, with the noise that latent implies as the target:

    x_t^* = Invert(x_0^*, up to t)                          * ∈ {w, l}; no gradients
    ε^*   = (x_t^* − √ᾱ_t·x_0^*) / √(1−ᾱ_t)                 so x_t^* = √ᾱ_t x_0^* + √(1−ᾱ_t) ε^* exactly
    Δ     = (e_θ(x_t^w, ε^w) − e_ref(x_t^w, ε^w)) − (e_θ(x_t^l, ε^l) − e_ref(x_t^l, ε^l))
    loss  = −log σ(−(β/2)·Δ)

Two inversion variants (``inversion``), every choice also a separate option:

- ``exact`` (this project's default): invert exactly to t on the grid ``schedule.levels_to(t, n)``
  that ends at t, n = ⌈(t+1)·N/T⌉ steps (N = ``inversion_steps``, default 10: the density of the
  reference's coarse grid, so on average ~N/2 extra no-grad passes per image), η = 0, optionally
  BDIA exact inversion (``bdia_gamma``); the latent is at level t.
- ``reference`` (the released train.py): N = 10 coarse steps of the sampling grid, stopping at the grid
  point nearest above t (``stop_rule``; the latent's level can differ from t by up to one grid step,
  the model is still scored at t: ``score_timestep``), a stochastic term 0.1·σ_DDIM·N(0, I) after
  each step (``stochastic_scale``), winner and loser not sharing that noise (``share_noise``).

Both invert with the **policy** network by default (no gradients; ``inversion_network``). With the
frozen reference network for inversion the inversions can be cached (``cache_inversions``): the
latent of (image, prompt, level) never changes then. β defaults to 2000 (SD1.5, shapes) / 5000 (SDXL).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from prefalign.backbones.base import Conditioning
from prefalign.diffusion.ddim import ddim_jump, ddim_sigma
from prefalign.diffusion.inversion import inversion_levels
from prefalign.diffusion.schedule import NoiseSchedule, implied_eps
from prefalign.errors import PrefalignError
from prefalign.methods.base import (
    LossOutput,
    Method,
    MethodConfig,
    PreferenceBatch,
    Target,
    TrainingModels,
    denoising_target,
    pair_latents,
    rand_per_sample,
    randint_per_sample,
)
from prefalign.methods.dpo import dpo_loss, pair_errors

BatchedEpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x [n, ...], t [n], rows [n]) -> ε [n, ...]


# --------------------------------------------------------------------------------------------------
# The equations
# --------------------------------------------------------------------------------------------------


def inpo_target(x_t: Tensor, x0: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """ε^* = (x_t − √ᾱ_t·x_0) / √(1−ᾱ_t) (METHODS.md §3). x_t, x0 [B, ...]; ᾱ_t scalar or [B] (float64
    coefficients). Then x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε^* holds to rounding."""
    return implied_eps(x_t, x0, alpha_bar_t)


def exact_grid(schedule: NoiseSchedule, t: int, density: int) -> list[int]:
    """Ascending levels [−1, …, t] ending exactly at t, with n = ⌈(t+1)·density/T⌉ ≥ 1 steps."""
    steps = max(1, min(t + 1, math.ceil((t + 1) * density / schedule.num_train_timesteps)))
    return schedule.levels_to(t, steps)


def reference_grid(schedule: NoiseSchedule, t: int, steps: int, stop_rule: str) -> list[int]:
    """The coarse sampling grid (``steps`` steps) ascending, cut at t by ``stop_rule`` (METHODS.md §3:
    the grid point nearest above t)."""
    return inversion_levels(schedule, steps, up_to_t=t, stop_rule=stop_rule)


def _model_level(level: int) -> int:
    return max(int(level), 0)


@torch.no_grad()
def batched_ddim_invert(
    eps_fn: BatchedEpsFn,
    x0: Tensor,
    grids: Sequence[Sequence[int]],
    schedule: NoiseSchedule,
    *,
    stochastic_scale: float = 0.0,
    noise_generators: Sequence[torch.Generator] | None = None,
    eps_timestep: str = "source",
) -> Tensor:
    """DDIM inversion of each sample along its own ascending grid (METHODS.md §3), batched over the
    samples still inverting: step k evaluates ε once for every sample with more than k steps.

    x0: [B, ...]; grids[i] = [t_0, …, t_n] of sample i. Sample by sample this equals
    ``prefalign.diffusion.ddim_invert(…, levels=grids[i])`` (same ε timestep rule, the schedule's x̂_0
    clipping, the stochastic term
    stochastic_scale·σ_DDIM(u→s, η=1)·N(0, I) drawn from ``noise_generators[i]``). Returns [B, ...]."""
    clip = getattr(schedule, "clip_sample_range", None)  # x̂_0 clamping, as every DDIM jump of the library
    x = x0.clone()
    longest = max(len(g) - 1 for g in grids)
    for k in range(longest):
        active = [i for i, g in enumerate(grids) if len(g) - 1 > k]
        source = torch.tensor([grids[i][k] for i in active])
        dest = torch.tensor([grids[i][k + 1] for i in active])
        model_t = (source if eps_timestep == "source" else dest).clamp(min=0)
        index = torch.tensor(active, device=x.device)
        x_active = x[index]
        eps = eps_fn(x_active, model_t.to(x.device), index)
        alpha_s, alpha_u = schedule.alpha_bar(source), schedule.alpha_bar(dest)  # float64 [n]
        x_next = ddim_jump(x_active, eps, alpha_s, alpha_u, clip)
        if stochastic_scale > 0:
            sigma = ddim_sigma(alpha_u, alpha_s, 1.0)  # [n]
            noise = torch.stack([torch.randn(x.shape[1:], generator=noise_generators[i], dtype=x.dtype) for i in active])
            shaped = (stochastic_scale * sigma).reshape(-1, *([1] * (x.dim() - 1))).to(device=x.device, dtype=x.dtype)
            x_next = x_next + shaped * noise.to(x.device)
        x[index] = x_next
    return x


@torch.no_grad()
def batched_bdia_invert(eps_fn: BatchedEpsFn, x0: Tensor, grids: Sequence[Sequence[int]], schedule: NoiseSchedule, gamma: float) -> Tensor:
    """BDIA exact inversion (METHODS.md §5) of each sample along its own grid; returns z_N [B, ...]
    (the top of the pair (z_N, z_{N−1}) of ``prefalign.diffusion.bdia_invert``):

        z_1 = D_{0→1}(z_0);   z_{i+1} = (z_{i−1} − D_{i→i−1}(z_i))/γ + D_{i→i+1}(z_i)
    """
    if not gamma > 0:
        raise PrefalignError(f"BDIA inversion divides by gamma; use gamma > 0 (got {gamma})")
    clip = getattr(schedule, "clip_sample_range", None)
    previous, current = x0.clone(), x0.clone()
    longest = max(len(g) - 1 for g in grids)
    for k in range(longest):
        active = [i for i, g in enumerate(grids) if len(g) - 1 > k]
        index = torch.tensor(active, device=x0.device)
        level = torch.tensor([grids[i][k] for i in active])
        up = torch.tensor([grids[i][k + 1] for i in active])
        z = current[index]
        eps = eps_fn(z, level.clamp(min=0).to(x0.device), index)
        alpha_i, alpha_up = schedule.alpha_bar(level), schedule.alpha_bar(up)
        jump_up = ddim_jump(z, eps, alpha_i, alpha_up, clip)
        if k == 0:
            z_next = jump_up  # the plain first DDIM inversion step
        else:
            down = torch.tensor([grids[i][k - 1] for i in active])
            jump_down = ddim_jump(z, eps, alpha_i, schedule.alpha_bar(down), clip)
            z_next = (previous[index] - jump_down) / gamma + jump_up
        previous[index] = z
        current[index] = z_next
    return current


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class InPOConfig(MethodConfig):
    """DDIM-InPO options (METHODS.md §3). ``None`` values follow the chosen ``inversion`` variant."""

    inversion: Literal["exact", "reference"] = Field("exact", description="exact (default) or the released code's inversion")
    beta: float | None = Field(None, gt=0, description="β; default 5000 for SDXL, 2000 otherwise (reference)")
    inversion_steps: int = Field(10, ge=1, description="steps of the coarse grid (reference) / grid density per T (exact)")
    inversion_network: Literal["policy", "reference"] = Field("policy", description="network that inverts (no gradients)")
    stochastic_scale: float | None = Field(None, ge=0, description="s·σ_DDIM·N(0,I) after each inversion step; exact 0, reference 0.1")
    share_noise: bool = Field(False, description="winner and loser share the stochastic inversion noise (reference: no)")
    stop_rule: Literal["at_or_above", "below"] = Field("at_or_above", description="reference variant: grid point at/above t, or below t")
    eps_timestep: Literal["source", "target"] = Field("source", description="ε of an inversion step evaluated at the source or target level")
    bdia_gamma: float | None = Field(None, gt=0, description="exact variant: BDIA exact inversion with this γ (None: DDIM)")
    score_timestep: Literal["sampled", "inverted"] = Field("sampled", description="score at the sampled t or at the latent's level")
    inversion_guidance_scale: float = Field(1.0, ge=0, description="classifier-free guidance of the inverting network")
    prompt_dropout: float = Field(0.2, ge=0, le=1, description="share of captions replaced by the empty prompt")
    cache_inversions: bool = Field(False, description="cache latents (needs inversion_network=reference: a frozen inverter)")
    cache_size: int = Field(100_000, ge=1, description="most cached latents (least recently used are dropped)")
    target: Target = Field("native", description="native: the network's own target (v for v-models); epsilon: ε")

    @model_validator(mode="after")
    def _check(self) -> InPOConfig:
        if self.cache_inversions and self.inversion_network != "reference":
            raise ValueError("cache_inversions needs inversion_network=reference (the policy changes every step)")
        if self.bdia_gamma is not None and self.inversion != "exact":
            raise ValueError("bdia_gamma applies to the exact inversion variant only")
        return self

    def resolved_stochastic_scale(self) -> float:
        if self.stochastic_scale is not None:
            return self.stochastic_scale
        return 0.1 if self.inversion == "reference" else 0.0


class InPO(Method):
    """DDIM-InPO on preference pairs (METHODS.md §3)."""

    name = "inpo"
    config_class = InPOConfig
    headline_metric = "implicit_accuracy"

    def __init__(self, config: InPOConfig | None = None):
        super().__init__(config)
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self.cache_hits = 0
        self.cache_lookups = 0
        self.inversion_calls = 0

    def beta(self, kind: str) -> float:
        if self.config.beta is not None:
            return self.config.beta
        return 5000.0 if kind.startswith("sdxl") else 2000.0

    def grid(self, schedule: NoiseSchedule, t: int) -> list[int]:
        config: InPOConfig = self.config
        if config.inversion == "exact":
            return exact_grid(schedule, t, config.inversion_steps)
        return reference_grid(schedule, t, config.inversion_steps, config.stop_rule)

    def invert(self, models: TrainingModels, x0: Tensor, cond: Conditioning, grids: list[list[int]], generators: list[torch.Generator]) -> Tensor:
        """Latents of x0 [n, ...] along their grids with the configured network, without gradients."""
        config: InPOConfig = self.config
        backbone = models.backbone

        def run(network) -> Tensor:
            uncond = None
            if config.inversion_guidance_scale != 1.0:
                uncond = network.empty_conditioning(len(cond)).to(network.device)

            def eps_fn(x: Tensor, t: Tensor, rows: Tensor) -> Tensor:
                self.inversion_calls += 1
                sub = cond[rows]
                return network.predict_eps(
                    x, t, sub, config.inversion_guidance_scale, None if uncond is None else uncond[rows]
                )

            if config.bdia_gamma is not None:
                return batched_bdia_invert(eps_fn, x0, grids, backbone.schedule, config.bdia_gamma)
            return batched_ddim_invert(
                eps_fn, x0, grids, backbone.schedule, stochastic_scale=config.resolved_stochastic_scale(),
                noise_generators=generators, eps_timestep=config.eps_timestep,
            )

        with torch.no_grad():
            if config.inversion_network == "reference":
                with models.reference() as reference:
                    return run(reference)
            return run(backbone)

    def inverted_latents(
        self, models: TrainingModels, x0: Tensor, cond: Conditioning, grids: list[list[int]], keys: list[tuple], generators: list[torch.Generator]
    ) -> Tensor:
        """Inversions of x0 [n, ...], from the cache where allowed."""
        if not self.config.cache_inversions:
            return self.invert(models, x0, cond, grids, generators)
        out: list[Tensor | None] = []
        for key in keys:
            self.cache_lookups += 1
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
            out.append(hit)
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:
            rows = torch.tensor(missing, device=x0.device)
            fresh = self.invert(models, x0[rows], cond[rows], [grids[i] for i in missing], [generators[i] for i in missing])
            for j, i in enumerate(missing):
                out[i] = fresh[j]
                self._cache[keys[i]] = fresh[j].detach().cpu()
                if len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        return torch.stack([v.to(device=x0.device, dtype=x0.dtype) for v in out])

    def loss(self, batch: PreferenceBatch, models: TrainingModels) -> LossOutput:
        config: InPOConfig = self.config
        backbone = models.backbone
        schedule = backbone.schedule
        size = len(batch)
        t = randint_per_sample(batch.rng.per_sample("t"), schedule.num_train_timesteps)  # [B], shared by w and l
        dropped = rand_per_sample(batch.rng.per_sample("dropout")) < config.prompt_dropout
        prompts = ["" if bool(d) else p for p, d in zip(batch.prompts, dropped)]  # as drop_prompts
        x0 = pair_latents(backbone, batch.images_w, batch.images_l)  # [2B, C, h, w]
        cond = backbone.encode_prompts(prompts)
        cond = Conditioning.cat([cond, cond])  # [2B]

        grids = [self.grid(schedule, int(level)) for level in t]  # B grids; winner and loser share t
        grids = grids + grids  # [2B]
        if config.share_noise:
            noise_w = batch.rng.per_sample("inversion_noise")
            noise_l = batch.rng.per_sample("inversion_noise")
        else:
            noise_w = batch.rng.per_sample("inversion_noise_w")
            noise_l = batch.rng.per_sample("inversion_noise_l")
        rows = [int(r) for r in batch.rows]
        keys = [("w", r, bool(d), g[-1]) for r, d, g in zip(rows, dropped, grids[:size])]
        keys += [("l", r, bool(d), g[-1]) for r, d, g in zip(rows, dropped, grids[:size])]
        x_t = self.inverted_latents(models, x0, cond, grids, keys, noise_w + noise_l)  # [2B, ...]

        if config.score_timestep == "inverted":
            score_t = torch.tensor([max(g[-1], 0) for g in grids])
        else:
            score_t = torch.cat([t, t])
        score_t = score_t.to(backbone.device)  # [2B]
        eps_star = inpo_target(x_t, x0, schedule.alpha_bar(score_t))  # [2B, ...]
        target = denoising_target(schedule, x0, eps_star, score_t, config.target)
        errors = pair_errors(models, x_t, score_t, cond, target, config.target)
        loss, inside = dpo_loss(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, self.beta(backbone.kind))
        level_gap = torch.tensor([abs(max(g[-1], 0) - int(level)) for g, level in zip(grids[:size], t)], dtype=torch.float32)
        metrics = {
            "loss": loss.detach(),
            "implicit_accuracy": (inside > 0).float().mean(),
            "inversion_steps": float(sum(len(g) - 1 for g in grids) / len(grids)),
            "level_gap": level_gap.mean(),
            **errors.metrics(),
        }
        if config.cache_inversions:
            metrics["cache_hit_rate"] = self.cache_hits / max(1, self.cache_lookups)
        return LossOutput(loss, metrics)
