"""The shapes world's CLIP: a small convolutional image encoder aligned with the frozen MiniLM
sentence space (the text tower is :func:`prefalign.backbones.text.shared_text_encoder`).

Architecture (``ClipConfig``): the image in [0, 1] is normalised, two coordinate channels (x, y)
are appended (so absolute position — a prompt attribute — survives the convolutions), then a list
of *blocks* runs in order::

    stem conv 3×3 (5 → c0) · residual(c0) · down(c0 → c1) · residual(c1) · down(c1 → c2)
    · residual(c2) · down(c2 → c3) · residual(c3)          # 32² → 4² for a 32-pixel image

and the head (GroupNorm · SiLU · 1×1 conv to ``head_channels`` · flatten · linear) maps the final
feature map to the 384-d sentence space; the output is L2-normalised. Flattening (not pooling)
keeps the spatial layout, which position and size prompts need. ``blocks`` is the unit of
PrefPaint's ``fix_rate``: a reward model may unfreeze the last (1 − fix_rate) of them.

Zero-shot classification of an attribute: the nearest (cosine) sentence embedding among candidate
prompts that differ from the image's prompt *only* in that attribute.

A CLIP model is a folder: ``clip.json`` (config, training summary, metrics), ``model.safetensors``,
``README.md`` (the card). The shipped one is ``shapes-clip`` (``prefalign pretrain clip``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from prefalign.backbones.text import DEFAULT_MAX_TOKENS, EMBED_DIM, TEXT_ENCODER_NAME, shared_text_encoder
from prefalign.errors import PrefalignError

SHIPPED_CLIP_DIR = Path(__file__).resolve().parent.parent / "models" / "shapes-clip"
CLIP_CONFIG_FILE = "clip.json"
CLIP_WEIGHTS_FILE = "model.safetensors"
ZERO_SHOT_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "background", "style")

# Per-channel statistics of the world's renders (roughly), for input normalisation.
_IMAGE_MEAN = (0.55, 0.52, 0.48)
_IMAGE_STD = (0.33, 0.32, 0.33)


class ClipConfig(BaseModel):
    """Architecture of the world's CLIP image encoder."""

    image_size: int = Field(32, ge=8)
    channels: tuple[int, int, int, int] = (32, 64, 96, 128)
    head_channels: int = Field(64, ge=1, description="1×1 conv width before flattening the final map")
    embed_dim: int = EMBED_DIM
    groups: int = Field(8, ge=1, description="GroupNorm groups")
    text_encoder: str = TEXT_ENCODER_NAME
    max_tokens: int = DEFAULT_MAX_TOKENS
    init_logit_scale: float = Field(2.659, description="log(1/0.07), CLIP's initial temperature")


class ResidualBlock(nn.Module):
    """GN · SiLU · conv3×3 · GN · SiLU · conv3×3, plus the input: [B, C, H, W] → same."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class DownBlock(nn.Module):
    """GN · SiLU · strided conv3×3: [B, C_in, H, W] → [B, C_out, H/2, W/2]."""

    def __init__(self, channels_in: int, channels_out: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels_in)
        self.conv = nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)))


class ShapesClip(nn.Module):
    """Image tower of the world's CLIP (see module docstring); the text tower is frozen MiniLM."""

    def __init__(self, config: ClipConfig | None = None, metadata: dict | None = None):
        super().__init__()
        self.config = config or ClipConfig()
        self.metadata = dict(metadata or {})
        c, g = self.config.channels, self.config.groups
        blocks: list[nn.Module] = [nn.Conv2d(5, c[0], 3, padding=1), ResidualBlock(c[0], g)]
        for c_in, c_out in zip(c[:-1], c[1:]):
            blocks += [DownBlock(c_in, c_out, g), ResidualBlock(c_out, g)]
        self.blocks = nn.ModuleList(blocks)
        final = self.config.image_size // 2 ** (len(c) - 1)
        self.head_norm = nn.GroupNorm(g, c[-1])
        self.head_conv = nn.Conv2d(c[-1], self.config.head_channels, 1)
        self.projection = nn.Linear(self.config.head_channels * final * final, self.config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(self.config.init_logit_scale))
        self.register_buffer("image_mean", torch.tensor(_IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(_IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    # ---- image tower ---------------------------------------------------------------------------
    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] → normalised image + (x, y) coordinate channels [B, 5, S, S]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise PrefalignError(f"the CLIP encoder expects images [B, 3, H, W], got {tuple(images.shape)}")
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            raise PrefalignError(
                f"this CLIP encoder takes {size}×{size} images, got {images.shape[-1]}×{images.shape[-2]}; "
                "resize the images or train a CLIP of that size (`prefalign pretrain clip --image-size`)"
            )
        x = (images.to(self.image_mean.dtype) - self.image_mean) / self.image_std
        coords = torch.linspace(-1, 1, size, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
        grid = torch.stack([grid_x, grid_y])[None].expand(x.shape[0], -1, -1, -1)
        return torch.cat([x, grid], 1)

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Apply ``blocks[start:stop]`` to an activation (the input of block ``start``)."""
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Final feature map [B, C, s, s] → unnormalised embedding [B, D]."""
        h = self.head_conv(F.silu(self.head_norm(feature_map)))
        return self.projection(h.flatten(1))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings [B, D] (differentiable w.r.t. the images)."""
        return F.normalize(self.head(self.run_blocks(self._input(images))), dim=-1)

    forward = encode_images

    def encode_images_with_statistics(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the tower: the normalised embedding [B, D] (as :meth:`encode_images`) and the
        channel-wise mean and standard deviation of every residual block's output, concatenated
        [B, 2·Σ channels]. The contrastive embedding is trained to be invariant to what a caption
        does not say — blur, noise, contrast, blockiness — and these early-layer statistics keep
        exactly that (a texture descriptor in the style of Gram/AdaIN statistics)."""
        x = self._input(images)
        stats = []
        for block in self.blocks:
            x = block(x)
            if isinstance(block, ResidualBlock):
                stats += [x.mean((2, 3)), x.std((2, 3))]
        return F.normalize(self.head(x), dim=-1), torch.cat(stats, 1)

    @property
    def statistics_dim(self) -> int:
        """Width of the statistics: 2 × the channels of each residual block (one per stage)."""
        return 2 * sum(self.config.channels)

    def block_input(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """The activation entering ``blocks[block]`` (used to cache the frozen part of the tower)."""
        return self.run_blocks(self._input(images), 0, block)

    # ---- text tower (frozen MiniLM) -----------------------------------------------------------
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised MiniLM sentence embeddings [B, D] (no gradients; cached per prompt)."""
        embeddings = shared_text_encoder(self.config.max_tokens).encode(list(prompts))[1]
        return embeddings.to(self.logit_scale.device)

    def similarity(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity [B] of each image with its prompt (the world's CLIP score)."""
        return (self.encode_images(images) * self.encode_text(prompts)).sum(-1)

    # ---- freezing (PrefPaint's fix_rate) ------------------------------------------------------
    def frozen_block_count(self, fix_rate: float) -> int:
        """Blocks kept frozen for ``fix_rate`` ∈ [0, 1]: ``int(len(blocks) · fix_rate)`` (the
        reference code's rounding); the head trains whenever a block does."""
        if not 0.0 <= fix_rate <= 1.0:
            raise PrefalignError(f"fix_rate must be in [0, 1], got {fix_rate}")
        return int(len(self.blocks) * fix_rate)

    def set_trainable(self, fix_rate: float) -> int:
        """Freeze the first ``frozen_block_count(fix_rate)`` blocks (all of them, and the head, when
        ``fix_rate == 1``); returns the number of frozen blocks."""
        frozen = self.frozen_block_count(fix_rate)
        self.requires_grad_(False)
        if frozen < len(self.blocks):
            for block in self.blocks[frozen:]:
                block.requires_grad_(True)
            for module in (self.head_norm, self.head_conv, self.projection):
                module.requires_grad_(True)
        return frozen

    # ---- persistence --------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, card: str | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / CLIP_WEIGHTS_FILE))
        (path / CLIP_CONFIG_FILE).write_text(json.dumps({"kind": "shapes-clip", "config": self.config.model_dump(), **self.metadata}, indent=2))
        if card is not None:
            (path / "README.md").write_text(card)
        return path


def is_clip_folder(path: str | Path) -> bool:
    return (Path(path) / CLIP_CONFIG_FILE).is_file()


def resolve_clip_path(name_or_path: str | Path) -> Path:
    """``"shapes-clip"`` (the shipped encoder) or a folder → the folder (checked)."""
    if str(name_or_path) == "shapes-clip":
        path = SHIPPED_CLIP_DIR
        if not is_clip_folder(path):
            raise PrefalignError(f"the shipped CLIP is not in this checkout ({path}); train it with `prefalign pretrain clip`")
        return path
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise PrefalignError(f"CLIP encoder {str(name_or_path)!r} not found; give 'shapes-clip' or a folder written by `prefalign pretrain clip`")
    if not is_clip_folder(path):
        raise PrefalignError(f"{path} is not a CLIP folder (no {CLIP_CONFIG_FILE}); give a folder written by `prefalign pretrain clip`")
    return path


def load_clip(name_or_path: str | Path = "shapes-clip", device: str | torch.device = "cpu") -> ShapesClip:
    """Load a CLIP encoder folder (or the shipped ``shapes-clip``), in eval mode, frozen."""
    from safetensors.torch import load_file

    path = resolve_clip_path(name_or_path)
    meta = json.loads((path / CLIP_CONFIG_FILE).read_text())
    config = ClipConfig.model_validate(meta.pop("config"))
    meta.pop("kind", None)
    model = ShapesClip(config, metadata=meta)
    weights = path / CLIP_WEIGHTS_FILE
    if not weights.is_file():
        raise PrefalignError(f"CLIP folder {path} is missing {CLIP_WEIGHTS_FILE}")
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------------------------


def attribute_options(attribute: str) -> list:
    """The values an attribute can take (style includes ``None``, the plain image)."""
    from prefalign.worlds.shapes import prompts as world

    options = {
        "colour": list(world.COLOURS),
        "shape": list(world.SHAPES),
        "size": list(world.SIZES),
        "position": list(world.POSITIONS),
        "background": list(world.BACKGROUNDS),
        "style": [None, *world.STYLES],
    }
    if attribute not in options:
        raise PrefalignError(f"unknown attribute {attribute!r}; choose one of {list(options)}")
    return options[attribute]


def candidate_prompts(scene, attribute: str) -> list[str]:
    """Prompts equal to ``scene``'s except for ``attribute`` (one per option, in option order)."""
    return [replace(scene, **{attribute: value}).prompt for value in attribute_options(attribute)]


@torch.no_grad()
def zero_shot_predictions(clip: ShapesClip, images: torch.Tensor, scenes: Sequence, attribute: str, batch_size: int = 256) -> torch.Tensor:
    """Index of the predicted option [B] for ``attribute`` (nearest candidate prompt embedding)."""
    options = attribute_options(attribute)
    predictions = []
    for start in range(0, len(scenes), batch_size):
        chunk = list(scenes[start : start + batch_size])
        embeddings = clip.encode_images(images[start : start + batch_size].to(clip.logit_scale.device))  # [b, D]
        prompts = [p for scene in chunk for p in candidate_prompts(scene, attribute)]
        text = clip.encode_text(prompts).view(len(chunk), len(options), -1)  # [b, K, D]
        predictions.append(torch.einsum("bd,bkd->bk", embeddings, text).argmax(1).cpu())
    return torch.cat(predictions)


def zero_shot_accuracy(clip: ShapesClip, images: torch.Tensor, scenes: Sequence, attribute: str) -> float:
    """Share of images whose ``attribute`` is classified correctly (zero-shot)."""
    options = attribute_options(attribute)
    truth = torch.tensor([options.index(getattr(scene, attribute)) for scene in scenes])
    return float((zero_shot_predictions(clip, images, scenes, attribute) == truth).float().mean())


def zero_shot_report(clip: ShapesClip, count: int = 512, seed: int = 12345, split: str = "train") -> dict[str, float]:
    """The CLIP bars: zero-shot accuracy of colour, shape, size, position and background on clean
    unstyled renders, and of style on clean renders whose style is uniform over {plain, 3 styles}."""
    from prefalign.worlds.shapes.prompts import STYLES, sample_scenes
    from prefalign.worlds.shapes.render import render

    size = clip.config.image_size
    scenes = sample_scenes(count, seed, split)
    images = render(scenes, seed=seed, size=size).images
    report = {f"{a}_accuracy": zero_shot_accuracy(clip, images, scenes, a) for a in ZERO_SHOT_ATTRIBUTES if a != "style"}
    generator = torch.Generator().manual_seed(seed + 1)
    styles = [None, *STYLES]
    styled = [s.with_style(styles[int(i)]) for s, i in zip(scenes, torch.randint(0, len(styles), (count,), generator=generator))]
    report["style_accuracy"] = zero_shot_accuracy(clip, render(styled, seed=seed + 1, size=size).images, styled, "style")
    return report


__all__ = [
    "ClipConfig",
    "ShapesClip",
    "load_clip",
    "is_clip_folder",
    "resolve_clip_path",
    "attribute_options",
    "candidate_prompts",
    "zero_shot_predictions",
    "zero_shot_accuracy",
    "zero_shot_report",
    "ZERO_SHOT_ATTRIBUTES",
    "SHIPPED_CLIP_DIR",
]
