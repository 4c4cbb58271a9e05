"""PrefPaint's RL with reward trust (Liu et al., NeurIPS 2024; METHODS.md §4).

DDPO's PPO (:mod:`prefalign.methods.rl`) where each sample's PPO term is weighted by how much the
reward model can be trusted at that sample — the trust factor of the reward's error bound:

    b(z)  = ‖V⁻¹z‖₂ (reference code)  or  √(zᵀV⁻¹z) = ‖z‖_{V⁻¹} (theory)       z: the reward's feature
    γ(z)  = clip(exp(−k·b(z) + β_γ), 1, γ_max)                                  k = 0.05, β_γ = 0.7, γ_max = 2.21
    L     = Σ_i,t  γ_i·max(−A_i·ρ_i,t, −A_i·clip(ρ_i,t, 1 ± ε))

(:func:`prefalign.rewards.prefpaint.trust_gamma`; V = λI + Σ z zᵀ over the reward model's
training features, stored with the reward model). Samples near the reward's training data (small
bound) get up to γ_max× the gradient, far ones 1×. k must be re-tuned when the norm changes (the
two norms differ in scale by ~‖V^{-1/2}‖). ``constant_scale`` replaces γ by a constant (the
paper's ablation; the same as ``ddpo.sample_weight``). Needs a reward model with a confidence
bound (a folder from ``prefalign reward train``). All other options and defaults: ``RLConfig``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from prefalign.errors import PrefalignError
from prefalign.methods.rl import RLConfig, RLMethod
from prefalign.rewards.prefpaint import trust_gamma


class PrefPaintConfig(RLConfig):
    """PrefPaint options: :class:`RLConfig` + the trust factor (defaults: the reference code)."""

    trust_bound: Literal["reference", "theory"] = Field("reference", description="b(z): reference ‖V⁻¹z‖₂ or theory √(zᵀV⁻¹z)")
    trust_k: float = Field(0.05, ge=0, description="k of γ = clip(exp(−k·b + β), 1, γ_max) (reference boundary_alpha 0.05)")
    trust_beta: float = Field(0.7, description="β_γ (reference boundary_beta 0.7)")
    trust_gamma_max: float = Field(2.21, ge=1, description="γ_max (reference 2.21)")
    constant_scale: float | None = Field(None, gt=0, description="ablation: γ ≡ this constant (e.g. 1.4) instead of the trust factor")


class PrefPaint(RLMethod):
    """PrefPaint: PPO weighted by the reward-trust factor γ(z) (METHODS.md §4)."""

    name = "prefpaint"
    config_class = PrefPaintConfig

    def check_scorer(self) -> None:
        if self.config.constant_scale is None and not getattr(self.scorer, "has_confidence", False):
            raise PrefalignError(
                f"prefpaint weights samples by the reward model's confidence bound, but the reward {self.config.reward!r} has none; "
                "pass --reward with a reward model folder (`prefalign reward train`), or use `align ddpo`"
            )

    def score_chunk(self, images: Tensor, captions: list[str], cond: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.config.constant_scale is not None and not getattr(self.scorer, "has_confidence", False):
            return super().score_chunk(images, captions, cond)
        out = self.scorer.score_with_confidence(images, captions, **cond)
        bound = out["bound_reference"] if self.config.trust_bound == "reference" else out["bound"]
        return {"reward": out["reward"], "bound": bound.float()}

    def sample_weights(self, scored: dict[str, Tensor]) -> Tensor:
        config: PrefPaintConfig = self.config
        if config.constant_scale is not None:
            return torch.full_like(scored["reward"], config.constant_scale)
        return trust_gamma(scored["bound"].double(), config.trust_k, config.trust_beta, config.trust_gamma_max).float()
