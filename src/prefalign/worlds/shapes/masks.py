"""Inpainting masks of the shapes world, the two kinds of PrefPaint's data:

- ``outpaint``: boundary crops — one or two sides of the image are unknown (image extension);
- ``warp``: disocclusion holes from shifting the view — the object (near) moves more than the
  background (far), so the region the object covered before the shift, plus a thin band on the side
  the view moves away from, has no content and must be filled.

Masks are float tensors [B, 1, S, S] with 1 = region to repaint (diffusers' convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefalign.errors import PrefalignError

MASK_KINDS: tuple[str, ...] = ("outpaint", "warp")


def outpaint_masks(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A band of 25–45 % of the side on one side, or of 20–30 % on each of two sides."""
    masks = torch.zeros(count, 1, size, size)
    for i in range(count):
        sides = torch.randperm(4, generator=generator)[: 1 + int(torch.rand(1, generator=generator) < 0.4)]
        low, spread = (0.25, 0.2) if len(sides) == 1 else (0.2, 0.1)
        for side in sides.tolist():
            width = int(size * (low + spread * float(torch.rand(1, generator=generator))))
            if side == 0:
                masks[i, :, :, :width] = 1
            elif side == 1:
                masks[i, :, :, size - width :] = 1
            elif side == 2:
                masks[i, :, :width, :] = 1
            else:
                masks[i, :, size - width :, :] = 1
    return masks


def warp_masks(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Holes where the foreground object was before a view shift of 3–6 px (scaled with S/32),
    dilated by one pixel, plus the band of background that enters the view."""
    from prefalign.worlds.shapes.annotator import measure

    count, _, size, _ = images.shape
    foreground = (measure(images).mask > 0.3).float()[:, None]  # [B, 1, S, S]
    masks = torch.zeros(count, 1, size, size)
    for i in range(count):
        shift = max(1, round((3 + 3 * float(torch.rand(1, generator=generator))) * size / 32))
        horizontal = bool(torch.rand(1, generator=generator) < 0.5)
        sign = 1 if bool(torch.rand(1, generator=generator) < 0.5) else -1
        dims = 3 if horizontal else 2
        moved = torch.roll(foreground[i], sign * shift, dims=dims - 1)
        hole = (foreground[i] - moved).clamp(min=0)
        band = max(1, shift // 2)
        edge = torch.zeros_like(hole)
        if horizontal:
            edge[..., :, :band] = 1 if sign > 0 else 0
            edge[..., :, size - band :] = 1 if sign < 0 else 0
        else:
            edge[..., :band, :] = 1 if sign > 0 else 0
            edge[..., size - band :, :] = 1 if sign < 0 else 0
        masks[i] = torch.maximum(hole, edge)
    return (F.max_pool2d(masks, 3, 1, 1) > 0).float()


def make_masks(kind: str, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Masks of ``kind`` for ``images`` [B, 3, S, S]; deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "outpaint":
        return outpaint_masks(images.shape[0], images.shape[-1], generator)
    if kind == "warp":
        return warp_masks(images, generator)
    raise PrefalignError(f"unknown mask kind {kind!r}; choose one of {list(MASK_KINDS)}")
