"""Image files and grids: reading with clear errors, writing PNGs, labelled grids (no torchvision)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from prefalign.errors import PrefalignError


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] → PIL RGB."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def from_pil(image: Image.Image) -> torch.Tensor:
    """PIL → [3, H, W] float in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, size: int | tuple[int, int] | None = None, resize: bool = True) -> torch.Tensor:
    """Read an image file as [3, H, W] in [0, 1].

    With ``size``, an image of another size is resized (bicubic) with a warning when ``resize``,
    or refused with a clear error otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise PrefalignError(f"image file not found: {path}")
    try:
        with Image.open(path) as handle:
            handle.load()
            image = handle.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise PrefalignError(f"{path} is not a readable image ({error.__class__.__name__}); give a PNG or JPEG file") from None
    if size is not None:
        target = (size, size) if isinstance(size, int) else tuple(size)
        if image.size != (target[1], target[0]):
            if not resize:
                raise PrefalignError(f"{path} is {image.size[0]}×{image.size[1]} but the model needs {target[1]}×{target[0]}; resize it or pass --resize")
            warnings.warn(f"{path.name}: resizing {image.size[0]}×{image.size[1]} to {target[1]}×{target[0]}", stacklevel=2)
            image = image.resize((target[1], target[0]), Image.BICUBIC)
    return from_pil(image)


def save_image(image: torch.Tensor, path: str | Path, upscale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = to_pil(image)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    pil.save(path)
    return path


def image_grid(images: torch.Tensor, columns: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """[N, 3, H, W] → one [3, H', W'] grid image, row-major."""
    n, c, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.full((c, rows * (h + padding) + padding, columns * (w + padding) + padding), pad_value)
    for index in range(n):
        r, k = divmod(index, columns)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = images[index].detach().cpu().float()
    return grid


def labelled_grid(
    images: torch.Tensor,
    labels: Sequence[str],
    columns: int,
    upscale: int = 4,
    title: str | None = None,
) -> Image.Image:
    """A grid of images with a caption under each (PIL), for `world show`, sample grids, reports."""
    n, _, h, w = images.shape
    cell_w, cell_h = w * upscale, h * upscale
    font = ImageFont.load_default()
    line_h = 11
    max_lines = max((len(_wrap(label, cell_w)) for label in labels), default=0)
    caption_h = max_lines * line_h + 4
    title_h = 18 if title else 0
    rows = (n + columns - 1) // columns
    pad = 4
    canvas = Image.new("RGB", (columns * (cell_w + pad) + pad, title_h + rows * (cell_h + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 3), title, fill="black", font=font)
    for index in range(n):
        r, k = divmod(index, columns)
        x0 = pad + k * (cell_w + pad)
        y0 = title_h + pad + r * (cell_h + caption_h + pad)
        canvas.paste(to_pil(images[index]).resize((cell_w, cell_h), Image.NEAREST), (x0, y0))
        for j, line in enumerate(_wrap(labels[index], cell_w)):
            draw.text((x0, y0 + cell_h + 2 + j * line_h), line, fill="black", font=font)
    return canvas


def _wrap(text: str, width_px: int, char_px: int = 6) -> list[str]:
    limit = max(4, width_px // char_px)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        words, line = paragraph.split(), ""
        for word in words:
            candidate = f"{line} {word}".strip()
            if len(candidate) > limit and line:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines
