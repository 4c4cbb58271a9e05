"""SFT baseline (METHODS.md §1, last line): plain denoising regression on the preferred image only.

    loss = mean over winners of e_θ(x_t^w, ε, t),   t ~ U{0..T−1}, ε ~ N(0, I), x_t^w = √ᾱ_t x_0^w + √(1−ᾱ_t) ε

i.e. the DDPM objective on the preferred half of the data (the Diffusion-DPO code's ``train_method=sft``,
including its 20 % caption dropout and the native target).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

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
    per_sample_error,
    rand_per_sample,
    randint_per_sample,
    randn_per_sample,
)


def sft_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """mean_B e(prediction, target) = mean over (B, C, H, W) of (prediction − target)². [B, C, H, W] → []."""
    return per_sample_error(prediction, target).mean()


class SFTConfig(MethodConfig):
    prompt_dropout: float = Field(0.2, ge=0, le=1, description="share of captions replaced by the empty prompt")
    target: Target = Field("native", description="native: the network's own target (v for v-models); epsilon: ε")


class SFT(Method):
    """Supervised fine-tuning on the preferred images (no reference network)."""

    name = "sft"
    config_class = SFTConfig
    needs_reference = False

    def loss(self, batch: PreferenceBatch, models: TrainingModels) -> LossOutput:
        config: SFTConfig = self.config
        backbone = models.backbone
        schedule = backbone.schedule
        t = randint_per_sample(batch.rng.per_sample("t"), schedule.num_train_timesteps).to(backbone.device)  # [B]
        prompts = drop_prompts(batch.prompts, rand_per_sample(batch.rng.per_sample("dropout")), config.prompt_dropout)
        with torch.no_grad():
            x0 = backbone.images_to_latents(batch.images_w.to(backbone.device))  # [B, C, h, w]
        eps = randn_per_sample(batch.rng.per_sample("eps"), x0.shape[1:]).to(device=x0.device, dtype=x0.dtype)
        x_t = schedule.add_noise(x0, eps, t)
        cond = backbone.encode_prompts(prompts)
        prediction = network_output(backbone, x_t, t, cond, config.target)
        loss = sft_loss(prediction, denoising_target(schedule, x0, eps, t, config.target))
        return LossOutput(loss, {"loss": loss.detach(), "error_model_w": loss.detach()})
