"""PrefPaint's reward model with its confidence bound (Liu et al., NeurIPS 2024; METHODS.md §4).

Architecture (``RewardModelConfig``)::

    tokens = [ CLIP(image), stats(image), MiniLM(prompt), CLIP(masked prompt image) ]
             (CLIP and MiniLM tokens [B, 384] · W_in; stats [B, 640] · W_stats, only with
             ``image_statistics``; the prompt token when ``use_prompt``; the masked-image token
             when ``inpainting``)
    tokens = tokens + type embedding                                          # [B, T, d_model]
    h      = TransformerEncoderLayer(tokens)                                  # [B, T, d_model]
    z      = LinearMLP(concat_T h)          # linear layers + dropout, *no activation*  [B, 256]
    r      = wᵀ z                           # bias-free head                            [B]

CLIP is the world's image encoder (``shapes-clip``; frozen, or its last (1 − fix_rate) blocks
trained). **Image statistics** (``image_statistics``, a choice of this project, off in PrefPaint):
a contrastive encoder is trained to map every render of a caption to one point, so the quality cues
a rater reacts to (blur, noise, contrast, blockiness) are what its embedding discards; the channel
mean and standard deviation of each residual block of the frozen tower keep them, as one more token
(see :meth:`~prefalign.rewards.clip.ShapesClip.encode_images_with_statistics`). **Text conditioning** (a choice of this project; PrefPaint's inpainting prompts are
images only): for text-to-image the prompt's frozen MiniLM sentence embedding — the space CLIP's
images were aligned to — is one more token, so the transformer layer can compare image and prompt
by attention; a reward model for inpainting adds the masked prompt image token and keeps the
prompt token (empty prompts embed to one constant token).

Because r is linear in z, ridge-regression / linear-bandit theory bounds the reward error at a new
sample by β_δ·‖z‖_{V⁻¹} with V = λI + Σ_i z_i z_iᵀ over the training features (λ = 0.01): see
:func:`ridge_matrix`, :func:`bound_theory`; the reference code's ‖V⁻¹z‖₂ is :func:`bound_reference`.
PrefPaint's trust factor γ = clip(exp(−k·b(z) + β_γ), 1, γ_max) (:func:`trust_gamma`) weights each
sample's policy-gradient term in RL.

A reward model is a folder: ``reward_model.json`` (config, training summary, metrics),
``model.safetensors`` (token projections, transformer layer, MLP, head), ``confidence.safetensors``
(V and V⁻¹, float64), ``encoder/`` (its CLIP, including any trained blocks) and ``README.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from prefalign.errors import PrefalignError
from prefalign.rewards.base import Scorer
from prefalign.rewards.clip import ShapesClip, load_clip

REWARD_CONFIG_FILE = "reward_model.json"
REWARD_WEIGHTS_FILE = "model.safetensors"
CONFIDENCE_FILE = "confidence.safetensors"
ENCODER_DIR = "encoder"


# ---------------------------------------------------------------------------------------------
# The confidence bound and the trust factor (pure functions)
# ---------------------------------------------------------------------------------------------


def ridge_matrix(features: torch.Tensor, ridge_lambda: float = 0.01) -> torch.Tensor:
    """V = λI + Σ_i z_i z_iᵀ (PrefPaint §3.2, the design matrix of ridge regression).

    features: [N, d] training features z_i → V: [d, d], float64."""
    z = features.detach().double()
    return ridge_lambda * torch.eye(z.shape[1], dtype=torch.float64, device=z.device) + z.T @ z


def accumulate_ridge_matrix(matrix: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """V + Σ_i z_i z_iᵀ for a new chunk of features [N, d] (V built in pieces over a large set)."""
    z = features.detach().double()
    return matrix + z.T @ z


def inverse_ridge_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """V⁻¹ [d, d] (V is symmetric positive definite; solved via Cholesky, float64)."""
    cholesky = torch.linalg.cholesky(matrix.double())
    return torch.cholesky_inverse(cholesky)


def bound_theory(features: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """‖z‖_{V⁻¹} = √(zᵀ V⁻¹ z) — the theory's bound (error ≤ β_δ·‖z‖_{V⁻¹}).

    features: [B, d]; inverse: V⁻¹ [d, d] → [B]."""
    z = features.double()
    return torch.einsum("bi,ij,bj->b", z, inverse.double().to(z.device), z).clamp(min=0).sqrt()


def bound_reference(features: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """‖V⁻¹ z‖₂ — the norm PrefPaint's released code uses in the trust factor.

    features: [B, d]; inverse: V⁻¹ [d, d] → [B]."""
    return (features.double() @ inverse.double().to(features.device).T).norm(dim=-1)


BoundNorm = Literal["reference", "theory"]


def confidence_bound(features: torch.Tensor, inverse: torch.Tensor, norm: BoundNorm = "theory") -> torch.Tensor:
    """b(z) with the chosen norm: "theory" √(zᵀV⁻¹z) or "reference" ‖V⁻¹z‖₂."""
    if norm == "theory":
        return bound_theory(features, inverse)
    if norm == "reference":
        return bound_reference(features, inverse)
    raise PrefalignError(f"unknown bound norm {norm!r}; use theory or reference")


def trust_gamma(bound: torch.Tensor, trust_k: float = 0.05, trust_beta: float = 0.7, trust_gamma_max: float = 2.21) -> torch.Tensor:
    """PrefPaint's reward trust factor γ = clip(exp(−k·b + β_γ), 1, γ_max) (METHODS.md §4;
    reference k = 0.05, β_γ = 0.7, γ_max = 2.21). bound: [B] → γ: [B]."""
    return torch.exp(-trust_k * bound + trust_beta).clamp(min=1.0, max=trust_gamma_max)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class RewardModelConfig(BaseModel):
    """Architecture and bound settings of a PrefPaint reward model."""

    encoder: str = Field("shapes-clip", description="CLIP image encoder: 'shapes-clip' or a folder from `prefalign pretrain clip`")
    inpainting: bool = Field(False, description="add the masked prompt image as a token (PrefPaint's inpainting reward)")
    use_prompt: bool = Field(True, description="add the prompt's sentence embedding as a token (text-to-image conditioning)")
    image_statistics: bool = Field(
        False,
        description="add a token of the frozen CLIP tower's early-layer statistics (channel mean/std of each residual block): "
        "the quality cues — blur, noise, contrast, blockiness — that the contrastive embedding is trained to ignore; needs fix_rate 1",
    )
    d_model: int = Field(384, ge=8)
    num_heads: int = Field(8, ge=1)
    feedforward_dim: int = Field(1024, ge=8)
    transformer_dropout: float = Field(0.1, ge=0, lt=1)
    mlp_dims: tuple[int, ...] = Field((1024,), description="hidden widths of the linear MLP (no activations)")
    mlp_dropout: float = Field(0.2, ge=0, lt=1)
    feature_dim: int = Field(256, ge=1, description="d of z")
    fix_rate: float = Field(1.0, ge=0, le=1, description="share of CLIP blocks kept frozen (1 = frozen encoder; reference code 0.7)")
    ridge_lambda: float = Field(0.01, gt=0, description="λ of V = λI + Σ z zᵀ")
    trust_bound: BoundNorm = Field("reference", description="b(z) of the trust factor: reference ‖V⁻¹z‖₂ or theory √(zᵀV⁻¹z)")
    trust_k: float = Field(0.05, ge=0)
    trust_beta: float = 0.7
    trust_gamma_max: float = Field(2.21, ge=1)


class RewardModel(nn.Module, Scorer):
    """PrefPaint's reward model (see module docstring): a differentiable scorer with features z,
    the confidence bound and the trust factor."""

    differentiable = True
    has_confidence = True

    def __init__(self, config: RewardModelConfig | None = None, clip: ShapesClip | None = None, metadata: dict | None = None):
        nn.Module.__init__(self)
        self.config = config or RewardModelConfig()
        self.metadata = dict(metadata or {})
        self.name = self.metadata.get("name", "reward-model")
        self.clip = clip if clip is not None else load_clip(self.config.encoder)
        embed = self.clip.config.embed_dim
        c = self.config
        if c.image_statistics and c.fix_rate < 1:
            raise PrefalignError("image_statistics needs a frozen encoder (fix_rate 1): the statistics are cached with the embedding")
        self.token_kinds = (
            ["image"] + (["image_statistics"] if c.image_statistics else []) + (["prompt"] if c.use_prompt else []) + (["masked_image"] if c.inpainting else [])
        )
        self.embed_dim = embed
        self.token_projection = nn.Linear(embed, c.d_model)
        if c.image_statistics:
            self.statistics_projection = nn.Sequential(nn.LayerNorm(self.clip.statistics_dim), nn.Linear(self.clip.statistics_dim, c.d_model))
        self.type_embedding = nn.Parameter(torch.zeros(len(self.token_kinds), c.d_model))
        nn.init.normal_(self.type_embedding, std=0.02)
        self.transformer = nn.TransformerEncoderLayer(
            c.d_model, c.num_heads, c.feedforward_dim, c.transformer_dropout, activation="gelu", batch_first=True, norm_first=True
        )
        layers: list[nn.Module] = []
        width = c.d_model * len(self.token_kinds)
        for hidden in (*c.mlp_dims, c.feature_dim):
            layers += [nn.Linear(width, hidden), nn.Dropout(c.mlp_dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers[:-1])  # linear layers with dropout between, no activation
        self.head = nn.Linear(c.feature_dim, 1, bias=False)
        self.register_buffer("ridge", c.ridge_lambda * torch.eye(c.feature_dim, dtype=torch.float64))
        self.register_buffer("ridge_inverse", torch.eye(c.feature_dim, dtype=torch.float64) / c.ridge_lambda)
        self.register_buffer("ridge_count", torch.zeros((), dtype=torch.long))
        self.frozen_blocks = self.clip.set_trainable(c.fix_rate)

    # ---- encoder ------------------------------------------------------------------------------
    @property
    def encoder_frozen(self) -> bool:
        return self.frozen_blocks == len(self.clip.blocks)

    def cache_input(self, images: torch.Tensor) -> torch.Tensor:
        """What the trainable part of the encoder starts from (no gradients): the CLIP embedding
        [B, D] when the encoder is frozen (with ``image_statistics``: [embedding, statistics]
        [B, D + S]), else the activation entering the first trained block."""
        with torch.no_grad():
            return self._image_input(images) if self.encoder_frozen else self.clip.block_input(images, self.frozen_blocks)

    def _image_input(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP embedding [B, D], followed by the tower's statistics when ``image_statistics``."""
        if not self.config.image_statistics:
            return self.clip.encode_images(images)
        return torch.cat(self.clip.encode_images_with_statistics(images), 1)

    def embed_cached(self, cached: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`cache_input`: the CLIP embedding [B, D] (with gradients to trained blocks)."""
        if self.encoder_frozen:
            return cached
        return F.normalize(self.clip.head(self.clip.run_blocks(cached, self.frozen_blocks)), dim=-1)

    def prompt_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.clip.encode_text(list(prompts))

    # ---- features and reward ------------------------------------------------------------------
    def features_from_embeddings(self, image: torch.Tensor, prompt: torch.Tensor | None = None, masked_image: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, feature_dim] from the token embeddings (each [B, D]; the image's is [B, D + S] with
        ``image_statistics``, as :meth:`cache_input` gives it)."""
        D = self.embed_dim
        tokens = [self.token_projection(image[:, :D])]
        if self.config.image_statistics:
            if image.shape[1] == D:
                raise PrefalignError("this reward model also reads the encoder's statistics; pass cache_input(images), not the bare embedding")
            tokens.append(self.statistics_projection(image[:, D:]))
        if self.config.use_prompt:
            if prompt is None:
                raise PrefalignError("this reward model is conditioned on the prompt; pass prompts")
            tokens.append(self.token_projection(prompt.to(image.dtype)))
        if self.config.inpainting:
            if masked_image is None:
                raise PrefalignError("this is an inpainting reward model; pass masked_images (the masked prompt images)")
            tokens.append(self.token_projection(masked_image[:, :D]))
        x = torch.stack(tokens, 1) + self.type_embedding  # [B, T, d_model]
        h = self.transformer(x)  # [B, T, d_model]
        return self.mlp(h.flatten(1))  # [B, feature_dim]

    def reward_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """r = wᵀz: [B, d] → [B]."""
        return self.head(features)[:, 0]

    def features(self, images: torch.Tensor, prompts: Sequence[str] | None = None, masked_images: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """z [B, feature_dim]; differentiable w.r.t. ``images`` (and ``masked_images``)."""
        device = self.head.weight.device
        image = self._image_input(images.to(device))
        prompt = self.prompt_embeddings(prompts if prompts is not None else [""] * images.shape[0]) if self.config.use_prompt else None
        masked = self.clip.encode_images(masked_images.to(device)) if (self.config.inpainting and masked_images is not None) else None
        return self.features_from_embeddings(image, prompt, masked)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None = None, **cond: Any) -> torch.Tensor:
        """Reward r [B] (logit scale); gradients reach ``images``."""
        if prompts is not None and len(prompts) != images.shape[0]:
            raise PrefalignError(f"got {images.shape[0]} images for {len(prompts)} prompts")
        return self.reward_from_features(self.features(images, prompts, **cond))

    forward = score

    # ---- confidence ---------------------------------------------------------------------------
    def set_confidence(self, features: torch.Tensor) -> None:
        """V = λI + Σ z zᵀ over the training features [N, d], and V⁻¹."""
        matrix = ridge_matrix(features, self.config.ridge_lambda)
        self.ridge.copy_(matrix)
        self.ridge_inverse.copy_(inverse_ridge_matrix(matrix))
        self.ridge_count.fill_(features.shape[0])

    def bound(self, features: torch.Tensor, norm: BoundNorm = "theory") -> torch.Tensor:
        """b(z) [B] for features z [B, d] (theory: ‖z‖_{V⁻¹}; reference: ‖V⁻¹z‖₂)."""
        return confidence_bound(features, self.ridge_inverse, norm)

    def trust_gamma(self, features: torch.Tensor) -> torch.Tensor:
        """PrefPaint's γ(z) [B] with this model's trust settings."""
        c = self.config
        return trust_gamma(self.bound(features, c.trust_bound), c.trust_k, c.trust_beta, c.trust_gamma_max).float()

    def score_with_confidence(self, images: torch.Tensor, prompts: Sequence[str] | None = None, **cond: Any) -> dict[str, torch.Tensor]:
        """reward, z, both bounds and γ in one pass."""
        z = self.features(images, prompts, **cond)
        return {
            "reward": self.reward_from_features(z),
            "features": z,
            "bound": self.bound(z, "theory").float(),
            "bound_reference": self.bound(z, "reference").float(),
            "trust_gamma": self.trust_gamma(z),
        }

    # ---- persistence --------------------------------------------------------------------------
    def _own_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.") and not k.startswith("ridge")}

    def save_pretrained(self, path: str | Path, card: str | None = None) -> Path:
        """Write the reward model folder (self-contained: the encoder is copied into it)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self._own_state().items()}, str(path / REWARD_WEIGHTS_FILE))
        save_file(
            {"V": self.ridge.detach().cpu(), "V_inverse": self.ridge_inverse.detach().cpu(), "count": self.ridge_count.detach().cpu().reshape(1)},
            str(path / CONFIDENCE_FILE),
        )
        self.clip.save_pretrained(path / ENCODER_DIR)
        config = self.config.model_dump()
        config["encoder"] = ENCODER_DIR
        (path / REWARD_CONFIG_FILE).write_text(json.dumps({"kind": "prefpaint-reward-model", "config": config, **self.metadata}, indent=2, default=float))
        if card is not None:
            (path / "README.md").write_text(card)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> RewardModel:
        from safetensors.torch import load_file

        path = Path(path)
        if not is_reward_model_folder(path):
            raise PrefalignError(f"{path} is not a reward model folder (no {REWARD_CONFIG_FILE}); give one written by `prefalign reward train`")
        meta = json.loads((path / REWARD_CONFIG_FILE).read_text())
        config = RewardModelConfig.model_validate(meta.pop("config"))
        meta.pop("kind", None)
        encoder = path / config.encoder if not Path(config.encoder).is_absolute() and (path / config.encoder).is_dir() else config.encoder
        for file in (REWARD_WEIGHTS_FILE, CONFIDENCE_FILE):
            if not (path / file).is_file():
                raise PrefalignError(f"reward model folder {path} is missing {file}; re-train or re-copy it")
        model = cls(config, load_clip(encoder, device), metadata={**meta, "name": meta.get("name", path.name)})
        missing, unexpected = model.load_state_dict(load_file(str(path / REWARD_WEIGHTS_FILE)), strict=False)
        missing = [k for k in missing if not k.startswith("clip.") and not k.startswith("ridge")]
        if missing or unexpected:
            raise PrefalignError(f"{path}/{REWARD_WEIGHTS_FILE} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        confidence = load_file(str(path / CONFIDENCE_FILE))
        model.ridge.copy_(confidence["V"])
        model.ridge_inverse.copy_(confidence["V_inverse"])
        model.ridge_count.fill_(int(confidence["count"][0]))
        # A loaded model is a scorer: frozen (gradients reach the images only) and in eval mode.
        return model.to(device).eval().requires_grad_(False)


def is_reward_model_folder(path: str | Path) -> bool:
    return (Path(path) / REWARD_CONFIG_FILE).is_file()


__all__ = [
    "RewardModel",
    "RewardModelConfig",
    "ridge_matrix",
    "accumulate_ridge_matrix",
    "inverse_ridge_matrix",
    "bound_theory",
    "bound_reference",
    "confidence_bound",
    "trust_gamma",
    "is_reward_model_folder",
]
