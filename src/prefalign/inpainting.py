"""Inpainting: masked prompt images, sampling that keeps the known region, and seam quality.

- :func:`world_inpaint_prompts` — PrefPaint's "prompts" in the shapes world: a clean render of a
  world prompt (the source) with a mask of one of the two kinds (``outpaint`` / ``warp``); the
  masked prompt image is source·(1 − mask).
- :func:`inpaint` — sample an inpainting backbone with DDIM (``eta=0``) or the stochastic DDIM
  policy (``eta>0``, METHODS.md §4) and **keep the known region**: the result is
  mask·completion + (1 − mask)·source (:func:`composite`), as PrefPaint's reference pipeline does
  (``refine_inpaint``) and diffusers' inpainting pipelines with ``apply_overlay``. The trajectory
  itself is the model's own (no per-step replacement of the known region), so its log-density is
  the policy's.
- :func:`seam_error` — how visible the boundary between known region and completion is.

Masks are [B, 1, H, W] floats, 1 = repaint (diffusers' convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefalign.backbones.base import Backbone
from prefalign.errors import PrefalignError

MASK_KIND_CHOICES = ("both", "outpaint", "warp")


@dataclass
class InpaintPrompts:
    """Masked prompt images: ``prompts`` (captions of the sources), ``sources`` [N, 3, S, S] in
    [0, 1], ``masks`` [N, 1, S, S] (1 = repaint), ``kinds`` (mask kind per row)."""

    prompts: list[str]
    sources: torch.Tensor
    masks: torch.Tensor
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def masked_images(self) -> torch.Tensor:
        """source·(1 − mask): the masked prompt image in [0, 1] (the hole is black)."""
        return self.sources * (1 - self.masks)

    def select(self, rows: Sequence[int] | torch.Tensor) -> InpaintPrompts:
        index = torch.as_tensor(list(rows) if not torch.is_tensor(rows) else rows, dtype=torch.long)
        return InpaintPrompts([self.prompts[i] for i in index.tolist()], self.sources[index], self.masks[index], [self.kinds[i] for i in index.tolist()])

    def repeat_interleave(self, repeats: int) -> InpaintPrompts:
        return self.select(torch.arange(len(self)).repeat_interleave(repeats))


def mask_kinds_for(count: int, mask_kind: str) -> list[str]:
    """``both``: alternate outpaint, warp, outpaint, …; else ``count`` times the kind."""
    if mask_kind not in MASK_KIND_CHOICES:
        raise PrefalignError(f"unknown mask kind {mask_kind!r}; choose one of {list(MASK_KIND_CHOICES)}")
    if mask_kind == "both":
        return ["outpaint" if i % 2 == 0 else "warp" for i in range(count)]
    return [mask_kind] * count


def world_inpaint_prompts(prompts: Sequence[str], size: int, seed: int = 0, mask_kind: str = "both", kinds: Sequence[str] | None = None) -> InpaintPrompts:
    """Clean renders of world ``prompts`` at ``size`` px with masks (``kinds`` per row, or
    :func:`mask_kinds_for` of ``mask_kind``); deterministic in ``seed``."""
    from prefalign.worlds.shapes.masks import make_masks
    from prefalign.worlds.shapes.prompts import parse_prompt
    from prefalign.worlds.shapes.render import render

    prompts = list(prompts)
    kinds = list(kinds) if kinds is not None else mask_kinds_for(len(prompts), mask_kind)
    if len(kinds) != len(prompts):
        raise PrefalignError(f"got {len(kinds)} mask kinds for {len(prompts)} prompts")
    sources = render([parse_prompt(p) for p in prompts], seed=seed, size=size).images
    masks = torch.zeros(len(prompts), 1, size, size)
    for offset, kind in enumerate(("outpaint", "warp")):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if rows:
            masks[rows] = make_masks(kind, sources[rows], seed=seed + offset)
    return InpaintPrompts(prompts, sources, masks, kinds)


def composite(completions: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Keep the known region: mask·completion + (1 − mask)·source, mask binarised at 0.5.
    All [B, C, H, W] (masks [B, 1, H, W]) → [B, C, H, W]."""
    keep = (masks.to(completions.device) < 0.5).to(completions.dtype)
    return completions * (1 - keep) + sources.to(completions.device, completions.dtype) * keep


@torch.no_grad()
def inpaint(
    backbone: Backbone,
    items: InpaintPrompts,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    prompt_mode: str = "caption",
    batch_size: int = 64,
    keep_known: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Completions [N, 3, H, W] in [0, 1] of ``items`` (row i starts from the noise of seed + i,
    as :func:`prefalign.sampling.generate`). ``prompt_mode``: ``caption`` conditions on the text,
    ``empty`` on "" only (PrefPaint's image-only prompt). ``eta > 0`` samples the stochastic DDIM
    policy. With ``keep_known`` the known region is pasted back (:func:`composite`)."""
    from prefalign.sampling import generate

    if not backbone.is_inpainting:
        raise PrefalignError(f"{backbone.kind!r} is not an inpainting model; use shapes-inpaint or an inpainting pipeline folder")
    if prompt_mode not in ("caption", "empty"):
        raise PrefalignError(f"prompt_mode must be caption or empty, got {prompt_mode!r}")
    text = list(items.prompts) if prompt_mode == "caption" else [""] * len(items)
    sources, masks = resize_for(backbone, items.sources, items.masks)

    def condition(cond, rows):
        return backbone.inpaint_conditioning(cond, sources[rows], masks[rows])

    images = generate(backbone, text, seed=seed, steps=steps, guidance_scale=guidance_scale, eta=eta, batch_size=batch_size, progress=progress, condition=condition)
    return composite(images, sources, masks) if keep_known else images


def resize_for(backbone: Backbone, sources: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources (bilinear) and masks (nearest) at the backbone's pixel resolution."""
    from prefalign.training.trainer import pixel_resolution

    size = tuple(pixel_resolution(backbone))
    if tuple(sources.shape[-2:]) == size:
        return sources, masks
    sources = F.interpolate(sources, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    masks = (F.interpolate(masks.float(), size=size, mode="nearest") >= 0.5).float()
    return sources, masks


def boundary_differences(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean |x_p − x_q| (over channels) over 4-neighbour pixel pairs (p, q) with p known and q in
    the hole: the step across the seam, per image [B] (0 where a mask has no boundary)."""
    hole = masks.to(images.dtype) >= 0.5  # [B, 1, H, W]
    total = images.new_zeros(images.shape[0])
    count = images.new_zeros(images.shape[0])
    for dim in (2, 3):
        a, b = images.narrow(dim, 0, images.shape[dim] - 1), images.narrow(dim, 1, images.shape[dim] - 1)
        ha, hb = hole.narrow(dim, 0, hole.shape[dim] - 1), hole.narrow(dim, 1, hole.shape[dim] - 1)
        across = (ha ^ hb).to(images.dtype)  # [B, 1, ., .]
        step = (a - b).abs().mean(1, keepdim=True)  # [B, 1, ., .]
        total = total + (step * across).flatten(1).sum(1)
        count = count + across.flatten(1).sum(1)
    return total / count.clamp(min=1)


def seam_error(images: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Seam excess [B]: the mean step across the mask boundary in ``images`` minus the same in the
    ground-truth ``sources`` (0 = the seam is as smooth as the real image; > 0 = a visible edge)."""
    return boundary_differences(images, masks) - boundary_differences(sources.to(images), masks)


__all__ = [
    "InpaintPrompts",
    "MASK_KIND_CHOICES",
    "boundary_differences",
    "composite",
    "inpaint",
    "mask_kinds_for",
    "resize_for",
    "seam_error",
    "world_inpaint_prompts",
]
