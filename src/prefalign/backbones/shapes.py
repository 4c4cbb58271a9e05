"""The shapes-world backbone: a diffusers ``UNet2DConditionModel`` in pixel space, conditioned on
MiniLM token states by cross-attention.

A shapes model is a folder::

    prefalign.json                       {"kind": "shapes-t2i", "image_size": 32, "max_tokens": 24, ...}
    unet/config.json, unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json      a diffusers DDIMScheduler config (the noise schedule)
    README.md                            the model card

"Latents" of a pixel model are the image rescaled to [-1, 1].
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from prefalign.backbones.base import Backbone, Conditioning
from prefalign.backbones.text import DEFAULT_MAX_TOKENS, EMBED_DIM, TEXT_ENCODER_NAME, shared_text_encoder
from prefalign.diffusion.schedule import NoiseSchedule
from prefalign.errors import PrefalignError

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SHIPPED_MODELS = {"shapes-t2i": SHIPPED_MODELS_DIR / "shapes-t2i", "shapes-inpaint": SHIPPED_MODELS_DIR / "shapes-inpaint"}
MODEL_CONFIG_FILE = "prefalign.json"

DEFAULT_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": True,  # x̂_0 ∈ [-1, 1]: pixel space with a cosine schedule needs it (see NoiseSchedule)
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}


def shapes_unet_config(
    image_size: int = 32,
    in_channels: int = 3,
    block_out_channels: Sequence[int] = (32, 64, 64),
    attention_head_dim: int = 4,
) -> dict:
    """Architecture of the shapes UNet: cross-attention only at 1/2 and 1/4 resolution (attention
    at full resolution is ~5× slower on CPU for little gain at 32²)."""
    return {
        "sample_size": image_size,
        "in_channels": in_channels,
        "out_channels": 3,
        "block_out_channels": list(block_out_channels),
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": EMBED_DIM,
        "attention_head_dim": attention_head_dim,
        "norm_num_groups": 8,
    }


def new_shapes_unet(config: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


class ShapesBackbone(Backbone):
    """Pixel-space text-to-image (``kind="shapes"``) or inpainting (``kind="shapes-inpaint"``,
    7 input channels: noisy image + mask + masked image) model of the shapes world."""

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler_config: dict,
        image_size: int,
        kind: str = "shapes",
        max_tokens: int = DEFAULT_MAX_TOKENS,
        model_config: dict | None = None,
    ):
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        self.image_size = image_size
        self.kind = kind
        self.max_tokens = max_tokens
        self.model_config = dict(model_config or {})
        self.text_encoder = shared_text_encoder(max_tokens)

    # prompts
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        tokens, sentences = self.text_encoder.encode(prompts)
        return Conditioning(encoder_hidden_states=tokens, sentence_embeddings=sentences).to(self.device)

    # latents
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def images_to_latents(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    # inpainting
    def inpaint_conditioning(self, cond: Conditioning, images: torch.Tensor, masks: torch.Tensor) -> Conditioning:
        """``cond.with_concat([mask, masked image])`` — the 4 extra input channels of a shapes
        inpainting model (layout of SD-inpainting: UNet input = [x_t, mask, masked image]).

        images: [B, 3, S, S] in [0, 1]; masks: [B, 1, S, S] (or [B, S, S]), 1 = repaint, binarised
        at 0.5. The masked image is (2·image − 1)·(1 − mask): the hole is 0 in [-1, 1]."""
        if not self.is_inpainting:
            raise PrefalignError(f"inpaint_conditioning needs an inpainting model; this backbone is {self.kind!r} (use shapes-inpaint)")
        if masks.ndim == 3:
            masks = masks[:, None]
        if images.ndim != 4 or tuple(masks.shape) != (images.shape[0], 1, *images.shape[-2:]):
            raise PrefalignError(f"masks must be [B, 1, H, W] matching the images {tuple(images.shape)}, got {tuple(masks.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise PrefalignError(f"images are {tuple(images.shape[-2:])} but this model works at {self.image_size}×{self.image_size}; resize them")
        if len(cond) != images.shape[0]:
            raise PrefalignError(f"got {len(cond)} prompts for {images.shape[0]} images to inpaint; give one prompt per image")
        masks = (masks.to(device=self.device, dtype=torch.float32) >= 0.5).float()  # [B, 1, S, S]
        masked = self.images_to_latents(images.to(device=self.device, dtype=torch.float32)) * (1 - masks)  # [B, 3, S, S]
        return cond.with_concat(torch.cat([masks, masked], dim=1))

    # persistence
    def save_pretrained(self, path: str | Path, card: str | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        (path / "scheduler").mkdir(exist_ok=True)
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
        config = {
            **self.model_config,
            "kind": "shapes-t2i" if self.kind == "shapes" else self.kind,
            "image_size": self.image_size,
            "max_tokens": self.max_tokens,
            "text_encoder": TEXT_ENCODER_NAME,
        }
        (path / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if card is not None:
            (path / "README.md").write_text(card)
        return path


def resolve_shapes_model_path(name_or_path: str | Path) -> Path:
    """A shipped model name (``shapes-t2i``) or a folder → the folder."""
    if str(name_or_path) in SHIPPED_MODELS:
        path = SHIPPED_MODELS[str(name_or_path)]
        if not (path / MODEL_CONFIG_FILE).is_file():
            raise PrefalignError(
                f"the shipped model {name_or_path!r} is not in this checkout ({path}); "
                f"train it with `prefalign pretrain {str(name_or_path).removeprefix('shapes-')}`"
            )
        return path
    return Path(name_or_path)


def is_shapes_model_folder(path: Path) -> bool:
    return (Path(path) / MODEL_CONFIG_FILE).is_file()


def load_shapes_backbone(name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ShapesBackbone:
    from diffusers import UNet2DConditionModel

    path = resolve_shapes_model_path(name_or_path)
    config_file = path / MODEL_CONFIG_FILE
    if not config_file.is_file():
        raise PrefalignError(f"{path} is not a shapes model folder (no {MODEL_CONFIG_FILE})")
    config = json.loads(config_file.read_text())
    for part in ("unet/config.json", "scheduler/scheduler_config.json"):
        if not (path / part).is_file():
            raise PrefalignError(f"shapes model folder {path} is missing {part}")
    unet = UNet2DConditionModel.from_pretrained(path / "unet", dtype=dtype).to(device).eval()
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    kind = "shapes-inpaint" if config.get("kind") == "shapes-inpaint" else "shapes"
    return ShapesBackbone(unet, scheduler_config, int(config["image_size"]), kind, int(config.get("max_tokens", DEFAULT_MAX_TOKENS)), config)
