"""Diffusion-DPO (Wallace et al., CVPR 2024; METHODS.md §1).

For a pair (c, x^w, x^l): one t ~ U{0..T−1} and one ε, shared by winner and loser; with e_θ, e_ref the
per-sample (mean) denoising errors of policy and reference:

    Δ    = (e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)
    loss = −log σ(−(β/2)·Δ)                 mean over pairs; reference passes without gradients

Reference-code choices (github.com/SalesforceAIResearch/DiffusionDPO, train.py), each an option:
β = 5000 (``beta``; the paper used 2000 for SD1.5), 20 % of captions replaced by "" (``prompt_dropout``),
the error measured against the network's native target (v for v-prediction models; ``target``),
t and ε shared within a pair (``share_noise``). AdamW and gradient clipping 1.0 are trainer settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from prefalign.backbones.base import Conditioning
from prefalign.methods.base import (
    LossOutput,
    Method,
    MethodConfig,
    PreferenceBatch,
    Target,
    TrainingModels,
    denoising_target,
    drop_prompts,
    network_output,
    pair_latents,
    per_sample_error,
    rand_per_sample,
    randint_per_sample,
    randn_per_sample,
)


# --------------------------------------------------------------------------------------------------
# The equation
# --------------------------------------------------------------------------------------------------


def dpo_inside_term(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """−(β/2)·Δ with Δ = (e_θ^w − e_ref^w) − (e_θ^l − e_ref^l) (METHODS.md §1). All inputs [B] → [B]."""
    delta = (model_w - ref_w) - (model_l - ref_l)  # [B]
    return -0.5 * beta * delta


def dpo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """loss = mean_pairs −log σ(−(β/2)·Δ) (METHODS.md §1); returns (loss [], inside term [B]).

    The implicit accuracy is ``(inside > 0).float().mean()``."""
    inside = dpo_inside_term(model_w, model_l, ref_w, ref_l, beta)  # [B]
    return -F.logsigmoid(inside).mean(), inside


# --------------------------------------------------------------------------------------------------
# Shared by the DPO family (DPO, RPO, InPO)
# --------------------------------------------------------------------------------------------------


@dataclass
class PairErrors:
    """The four per-sample errors of a batch of pairs, each [B] float32."""

    model_w: Tensor
    model_l: Tensor
    ref_w: Tensor
    ref_l: Tensor

    def metrics(self) -> dict[str, Tensor]:
        return {
            "error_model_w": self.model_w.detach().mean(),
            "error_model_l": self.model_l.detach().mean(),
            "error_ref_w": self.ref_w.detach().mean(),
            "error_ref_l": self.ref_l.detach().mean(),
        }


def pair_errors(models: TrainingModels, x_t: Tensor, t: Tensor, cond: Conditioning, target: Tensor, target_kind: Target) -> PairErrors:
    """Errors of policy (with gradients) and reference (without) on [winners; losers].

    x_t, target: [2B, C, h, w]; t: [2B]; cond: 2B rows. One batched forward per network: the
    reference first (no grad), then the policy."""
    backbone = models.backbone
    with torch.no_grad(), models.reference() as reference:
        ref_error = per_sample_error(network_output(reference, x_t, t, cond, target_kind), target)  # [2B]
    model_error = per_sample_error(network_output(backbone, x_t, t, cond, target_kind), target)  # [2B]
    model_w, model_l = model_error.chunk(2)
    ref_w, ref_l = ref_error.chunk(2)
    return PairErrors(model_w, model_l, ref_w, ref_l)


def noised_pairs(
    models: TrainingModels,
    batch: PreferenceBatch,
    prompt_dropout: float,
    share_noise: bool = True,
    t: Tensor | None = None,
    eps: Tensor | None = None,
    target_kind: Target = "native",
) -> tuple[Tensor, Tensor, Conditioning, Tensor]:
    """x_t, t, cond and target of [winners; losers] with DPO's sampling: per pair one t ~ U{0..T−1}
    (unless ``t`` [B] is given) and one ε (unless ``eps`` [B, C, h, w] is given) shared by winner
    and loser (``share_noise``; otherwise the loser draws its own), captions dropped with probability
    ``prompt_dropout``. Returns x_t [2B, C, h, w], t [2B], cond (2B rows), target [2B, C, h, w]."""
    backbone = models.backbone
    schedule = backbone.schedule
    device = backbone.device
    if t is None:
        t = randint_per_sample(batch.rng.per_sample("t"), schedule.num_train_timesteps)  # [B]
    prompts = drop_prompts(batch.prompts, rand_per_sample(batch.rng.per_sample("dropout")), prompt_dropout)
    x0 = pair_latents(backbone, batch.images_w, batch.images_l)  # [2B, C, h, w]
    shape = x0.shape[1:]
    if eps is None:
        eps = randn_per_sample(batch.rng.per_sample("eps"), shape)  # [B, C, h, w]
    if share_noise:
        eps = torch.cat([eps, eps])
    else:
        eps = torch.cat([eps, randn_per_sample(batch.rng.per_sample("eps_l"), shape)])
    eps = eps.to(device=device, dtype=x0.dtype)  # [2B, ...]
    t2 = torch.cat([t, t]).to(device)  # [2B]
    x_t = schedule.add_noise(x0, eps, t2)
    cond = backbone.encode_prompts(prompts)
    cond = Conditioning.cat([cond, cond])
    return x_t, t2, cond, denoising_target(schedule, x0, eps, t2, target_kind)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class DPOConfig(MethodConfig):
    """Diffusion-DPO options (defaults = the reference code)."""

    beta: float = Field(5000.0, gt=0, description="β of the DPO loss (reference code 5000; paper SD1.5: 2000)")
    prompt_dropout: float = Field(0.2, ge=0, le=1, description="share of captions replaced by the empty prompt")
    share_noise: bool = Field(True, description="winner and loser share ε (and always t)")
    target: Target = Field("native", description="native: compare with the network's own target (v for v-models); epsilon: ε")


class DPO(Method):
    """Diffusion-DPO: the loss of METHODS.md §1 on preference pairs."""

    name = "dpo"
    config_class = DPOConfig
    headline_metric = "implicit_accuracy"

    def loss(self, batch: PreferenceBatch, models: TrainingModels) -> LossOutput:
        config: DPOConfig = self.config
        x_t, t, cond, target = noised_pairs(models, batch, config.prompt_dropout, config.share_noise, target_kind=config.target)
        errors = pair_errors(models, x_t, t, cond, target, config.target)
        loss, inside = dpo_loss(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, config.beta)
        return LossOutput(loss, {"loss": loss.detach(), "implicit_accuracy": (inside > 0).float().mean(), **errors.metrics()})
