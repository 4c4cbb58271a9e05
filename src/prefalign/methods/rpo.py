"""Diffusion-RPO (Gu et al., 2024; METHODS.md §2): DPO generalised from the diagonal (winner i vs
loser i) to every winner i vs every loser j of a micro-batch of M pairs, weighted by how related the
pairs are:

    one t shared by the micro-batch (and, as an option, one ε)
    dW_i = e_θ(x^w_i) − e_ref(x^w_i);   dL_j = e_θ(x^l_j) − e_ref(x^l_j)
    L_ij = −(β/2)·(dW_i − dL_j)                                 M×M; the diagonal is DPO's argument
    E_i  = normalised embedding of pair i                       text, image, or both
    ω_ij = softmax_j(−(1 − E_i·E_j)/τ)                          row-normalised
    loss = mean_i mean_j −log σ(ω_ij·L_ij)                      weight inside the sigmoid (reference RPO)
      or   mean_i Σ_j ω_ij·(−log σ(L_ij))                       weighting="outside"

With M = 1, ω = 1 and L_11 is DPO's −(β/2)Δ: the loss is exactly DPO's (a test). Embeddings: ``text``
is the prompt's sentence embedding (``Conditioning.sentence_embeddings``: MiniLM for the shapes
world, the pooled text-encoder output for SD); ``image`` the normalised mean of the winner's and
loser's image embeddings from an image encoder (default: the world's CLIP); ``both`` concatenates the
normalised text and image embeddings /√2, so E_i·E_j is the mean of the two cosine similarities.

Across processes: dW, dL and E are gathered so the matrix spans the global micro-batch; every
process computes the same global loss but only its own terms carry gradients, so the loss to
back-propagate is multiplied by the number of processes (distributed data parallel averages the
gradients, which then sum to the exact gradient of the global loss).
"""

from __future__ import annotations

import importlib
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from prefalign.errors import PrefalignError
from prefalign.methods.base import (
    LossOutput,
    Method,
    MethodConfig,
    PreferenceBatch,
    Target,
    TrainingModels,
    randint_per_sample,
    randn_per_sample,
)
from prefalign.methods.dpo import noised_pairs, pair_errors


# --------------------------------------------------------------------------------------------------
# The equations
# --------------------------------------------------------------------------------------------------


def rpo_weights(embeddings: Tensor, tau: float) -> Tensor:
    """ω_ij = softmax_j(−(1 − E_i·E_j)/τ) (METHODS.md §2). embeddings [M, D] (normalised here) → [M, M]."""
    unit = F.normalize(embeddings.float(), dim=-1)  # [M, D]
    similarity = unit @ unit.T  # [M, M]
    return (-(1 - similarity) / tau).softmax(dim=1)


def rpo_logits(delta_w: Tensor, delta_l: Tensor, beta: float) -> Tensor:
    """L_ij = −(β/2)·(dW_i − dL_j) (METHODS.md §2). delta_w, delta_l [M] → [M, M]; diag = DPO's −(β/2)Δ."""
    return -0.5 * beta * (delta_w[:, None] - delta_l[None, :])


def rpo_loss(
    delta_w: Tensor, delta_l: Tensor, embeddings: Tensor, beta: float, tau: float, weighting: str = "inside"
) -> tuple[Tensor, Tensor, Tensor]:
    """The RPO loss (METHODS.md §2); returns (loss [], L [M, M], ω [M, M]).

    weighting="inside": mean_i mean_j −log σ(ω_ij·L_ij); "outside": mean_i Σ_j ω_ij·(−log σ(L_ij))."""
    logits = rpo_logits(delta_w, delta_l, beta)  # [M, M]
    weights = rpo_weights(embeddings, tau).to(logits.dtype)  # [M, M]
    if weighting == "inside":
        loss = -F.logsigmoid(weights * logits).mean()
    elif weighting == "outside":
        loss = (weights * -F.logsigmoid(logits)).sum(1).mean()
    else:
        raise PrefalignError(f"rpo weighting must be inside or outside, got {weighting!r}")
    return loss, logits, weights


def pair_embeddings(
    kind: str, text: Tensor | None, image_w: Tensor | None, image_l: Tensor | None
) -> Tensor:
    """E_i of pair i: text [M, D] | normalised mean of image_w, image_l [M, D'] | both (concatenated
    unit vectors /√2, so dot products average the two cosine similarities)."""
    parts = []
    if kind in ("text", "both"):
        parts.append(F.normalize(text.float(), dim=-1))
    if kind in ("image", "both"):
        parts.append(F.normalize(F.normalize(image_w.float(), dim=-1) + F.normalize(image_l.float(), dim=-1), dim=-1))
    return torch.cat(parts, dim=-1) / len(parts) ** 0.5


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class RPOConfig(MethodConfig):
    """Diffusion-RPO options (defaults = the reference LM-RPO construction, METHODS.md §2)."""

    beta: float = Field(5000.0, gt=0, description="β (the row-softmax shrinks the diagonal weight: re-tune against DPO)")
    tau: float = Field(0.5, gt=0, description="softmax temperature τ of the weights (reference 0.5; swept 0.25–0.75)")
    embedding: Literal["text", "image", "both"] = Field("text", description="what E_i embeds")
    weighting: Literal["inside", "outside"] = Field("inside", description="weight inside the sigmoid (reference) or outside")
    share_noise: Literal["pair", "batch"] = Field("pair", description="ε shared within each pair, or one ε for the whole micro-batch")
    image_encoder: str = Field(
        "shapes-clip", description="image embeddings: a CLIP folder / 'shapes-clip', or module:function taking [B,3,H,W] in [0,1]"
    )
    prompt_dropout: float = Field(0.2, ge=0, le=1, description="share of captions replaced by the empty prompt")
    target: Target = Field("native", description="native: the network's own target (v for v-models); epsilon: ε")


def load_image_embedder(spec: str, device: torch.device):
    """``module:function`` → that callable; otherwise a CLIP folder (or ``shapes-clip``) → its
    ``encode_images``."""
    if ":" in spec and not spec.startswith(("/", ".")):
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise PrefalignError(f"cannot import the image encoder {spec!r}: {error}") from None
    try:
        from prefalign.rewards.clip import load_clip
    except ImportError:  # pragma: no cover - before the rewards package ships
        raise PrefalignError("image embeddings need prefalign.rewards.clip (the world's CLIP); use rpo.embedding=text") from None
    clip = load_clip(spec, device=device)
    return clip.encode_images


class RPO(Method):
    """Diffusion-RPO on preference pairs (METHODS.md §2)."""

    name = "rpo"
    config_class = RPOConfig
    headline_metric = "implicit_accuracy"

    def setup(self, models: TrainingModels) -> None:
        config: RPOConfig = self.config
        if config.embedding in ("text", "both"):
            probe = models.backbone.encode_prompts(["a"])
            if probe.sentence_embeddings is None:
                raise PrefalignError(
                    f"this {models.backbone.kind} model gives no sentence embeddings for RPO's text weights; use rpo.embedding=image"
                )
        if config.embedding in ("image", "both") and models.image_embedder is None:
            models.image_embedder = load_image_embedder(config.image_encoder, models.backbone.device)

    def loss(self, batch: PreferenceBatch, models: TrainingModels) -> LossOutput:
        config: RPOConfig = self.config
        backbone = models.backbone
        size = len(batch)
        # one t for the (global) micro-batch; ε per pair, or one for the micro-batch
        t = randint_per_sample([batch.rng.shared("t")], backbone.schedule.num_train_timesteps).expand(size)  # [B]
        eps = None
        if config.share_noise == "batch":
            eps = randn_per_sample([batch.rng.shared("eps")], backbone.latent_shape).expand(size, *backbone.latent_shape)
        x_t, t2, cond, target = noised_pairs(models, batch, config.prompt_dropout, True, t=t, eps=eps, target_kind=config.target)
        errors = pair_errors(models, x_t, t2, cond, target, config.target)
        delta_w = errors.model_w - errors.ref_w  # [B]
        delta_l = errors.model_l - errors.ref_l  # [B]

        with torch.no_grad():
            text = backbone.encode_prompts(batch.prompts).sentence_embeddings if config.embedding != "image" else None
            image_w = image_l = None
            if config.embedding != "text":
                image_w = models.image_embedder(batch.images_w.to(backbone.device))
                image_l = models.image_embedder(batch.images_l.to(backbone.device))
            embeddings = pair_embeddings(config.embedding, text, image_w, image_l).to(delta_w.device)  # [B, D]

        global_w, global_l = models.gather(delta_w), models.gather(delta_l)  # [M]
        global_embeddings = models.gather(embeddings)  # [M, D]
        loss, logits, weights = rpo_loss(global_w, global_l, global_embeddings, config.beta, config.tau, config.weighting)
        diagonal = logits.diagonal().detach()
        metrics = {
            "loss": loss.detach(),
            "implicit_accuracy": (diagonal > 0).float().mean(),
            "offdiagonal_accuracy": (logits.detach() > 0).float().mean(),
            "diagonal_weight": weights.diagonal().mean().detach(),
            **errors.metrics(),
        }
        return LossOutput(loss * models.num_processes, metrics)
