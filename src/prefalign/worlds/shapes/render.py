"""Renderer of the shapes world: scenes → RGB images, with jitter, quality defects and styles.

Images are float tensors in [0, 1] of shape [B, 3, S, S] (S = ``size``, default 32). Shapes are
rasterised with 4× supersampling, so edges are anti-aliased and small renders stay recognisable.
Every random choice comes from one ``torch.Generator`` seeded by the caller, so a batch is a pure
function of (scenes, seed, defects).

Defects model the quality problems of web-scale training data (DESIGN.md): blur, noise, colour
shift, wrong size, off-position, object cut by the border, low contrast, blockiness. The first
three and the last two are image operations; wrong size, off-position and cut-by-border change
the geometry of the render itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefalign.errors import PrefalignError
from prefalign.worlds.shapes.prompts import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene

DEFECTS: tuple[str, ...] = (
    "blur",
    "noise",
    "colour_shift",
    "wrong_size",
    "off_position",
    "cut_by_border",
    "low_contrast",
    "blockiness",
)
GEOMETRIC_DEFECTS = frozenset({"wrong_size", "off_position", "cut_by_border"})
SUPERSAMPLE = 4


@dataclass
class Geometry:
    """Per-sample geometry of a batch of renders (all tensors [B]); lengths are fractions of S."""

    centre_x: torch.Tensor
    centre_y: torch.Tensor
    radius: torch.Tensor
    rotation: torch.Tensor  # radians
    shape_index: torch.Tensor  # long, index into SHAPES


# ---------------------------------------------------------------------------------------------
# Shape coverage
# ---------------------------------------------------------------------------------------------


def _regular_polygon_inside(r: torch.Tensor, theta: torch.Tensor, n: int, vertex_angle: float, circumradius: float) -> torch.Tensor:
    """Inside test of a regular n-gon in polar coordinates: r·cos(φ') ≤ R·cos(π/n), with φ' the
    angle to the nearest edge's mid-normal."""
    sector = 2 * math.pi / n
    phi = torch.remainder(theta - vertex_angle, sector) - sector / 2
    return r * torch.cos(phi) <= circumradius * math.cos(math.pi / n)


def _star_inside(r: torch.Tensor, theta: torch.Tensor, outer: float = 1.15, inner: float = 0.5) -> torch.Tensor:
    """Five-pointed star, one point up: inside the straight edge between an outer vertex (angle 0 in
    the sector frame) and the neighbouring inner vertex (angle π/5)."""
    sector = 2 * math.pi / 5
    phi = (torch.remainder(theta + math.pi / 2 + sector / 2, sector) - sector / 2).abs()
    px, py = r * torch.cos(phi), r * torch.sin(phi)
    ax, ay = outer, 0.0
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    # Origin and the point must lie on the same side of the line a→b.
    cross_point = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    cross_origin = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)
    return cross_point * cross_origin >= 0


def shape_inside(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean inside test of ``shape`` at local coordinates (u, v) in units of the circumradius
    (v grows downwards)."""
    r = torch.sqrt(u * u + v * v)
    theta = torch.atan2(v, u)
    if shape == "circle":
        return r <= 0.85
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.7
    if shape == "diamond":
        return u.abs() + v.abs() <= 1.0
    if shape == "triangle":
        return _regular_polygon_inside(r, theta, 3, -math.pi / 2, 1.15)
    if shape == "star":
        return _star_inside(r, theta)
    if shape == "cross":
        arm, length = 0.3, 0.92
        return ((u.abs() <= arm) & (v.abs() <= length)) | ((v.abs() <= arm) & (u.abs() <= length))
    raise PrefalignError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def coverage(geometry: Geometry, size: int, supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Anti-aliased coverage α ∈ [0, 1] of each sample's shape: [B, 1, S, S]."""
    hi = size * supersample
    coords = (torch.arange(hi, dtype=torch.float32) + 0.5) / hi  # pixel centres in [0, 1]
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # [hi, hi]
    dx = x[None] - geometry.centre_x[:, None, None]
    dy = y[None] - geometry.centre_y[:, None, None]
    cos, sin = torch.cos(geometry.rotation)[:, None, None], torch.sin(geometry.rotation)[:, None, None]
    radius = geometry.radius[:, None, None]
    u = (cos * dx + sin * dy) / radius
    v = (-sin * dx + cos * dy) / radius
    inside = torch.zeros(u.shape, dtype=torch.bool)
    for index, shape in enumerate(SHAPES):
        rows = geometry.shape_index == index
        if rows.any():
            inside[rows] = shape_inside(shape, u[rows], v[rows])
    return F.avg_pool2d(inside.float()[:, None], supersample)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def scene_geometry(scenes: Sequence[Scene], generator: torch.Generator, jitter: bool = True) -> Geometry:
    """Nominal geometry of each scene plus render jitter (centre ±0.03, size ×[0.92, 1.08],
    rotation ±12°)."""
    n = len(scenes)
    cx = torch.tensor([POSITIONS[s.position][0] for s in scenes])
    cy = torch.tensor([POSITIONS[s.position][1] for s in scenes])
    radius = torch.tensor([SIZES[s.size] for s in scenes])
    shape_index = torch.tensor([SHAPES.index(s.shape) for s in scenes])
    rotation = torch.zeros(n)
    if jitter:
        cx = cx + _uniform(generator, n, -0.03, 0.03)
        cy = cy + _uniform(generator, n, -0.03, 0.03)
        radius = radius * _uniform(generator, n, 0.92, 1.08)
        rotation = _uniform(generator, n, -1.0, 1.0) * math.radians(12)
    return Geometry(cx, cy, radius, rotation, shape_index)


def _apply_geometric_defect(geometry: Geometry, row: int, defect: str, generator: torch.Generator) -> None:
    if defect == "wrong_size":
        too_big = torch.rand(1, generator=generator).item() < 0.5
        geometry.radius[row] *= 1.55 if too_big else 0.5
    elif defect == "off_position":
        angle = torch.rand(1, generator=generator).item() * 2 * math.pi
        distance = 0.15 + 0.07 * torch.rand(1, generator=generator).item()
        geometry.centre_x[row] = (geometry.centre_x[row] + distance * math.cos(angle)).clamp(0.2, 0.8)
        geometry.centre_y[row] = (geometry.centre_y[row] + distance * math.sin(angle)).clamp(0.2, 0.8)
    elif defect == "cut_by_border":
        # Push the shape across the nearest border so that ~40-60 % of its radius sticks out.
        cx, cy, r = geometry.centre_x[row].item(), geometry.centre_y[row].item(), geometry.radius[row].item()
        overshoot = r * (0.4 + 0.2 * torch.rand(1, generator=generator).item())
        side = min(((cx, "left"), (1 - cx, "right"), (cy, "top"), (1 - cy, "bottom")))[1]
        if side == "left":
            geometry.centre_x[row] = r - overshoot
        elif side == "right":
            geometry.centre_x[row] = 1 - r + overshoot
        elif side == "top":
            geometry.centre_y[row] = r - overshoot
        else:
            geometry.centre_y[row] = 1 - r + overshoot


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample σ (pixels): [B, C, H, W] → same."""
    radius = int(math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)  # [B, K]
    b, c, h, w = images.shape
    x = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    x = x.reshape(1, b * c, h + 2 * radius, w + 2 * radius)
    k = kernels.repeat_interleave(c, 0)  # [B*C, K]
    x = F.conv2d(x, k[:, None, None, :], groups=b * c)
    x = F.conv2d(x, k[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def _apply_image_defect(image: torch.Tensor, defect: str, generator: torch.Generator) -> torch.Tensor:
    """One image-space defect on one image [3, S, S]."""
    size = image.shape[-1]
    if defect == "blur":
        sigma = torch.tensor([(1.0 + 0.8 * torch.rand(1, generator=generator).item()) * size / 32])
        return gaussian_blur(image[None], sigma)[0]
    if defect == "noise":
        std = 0.08 + 0.07 * torch.rand(1, generator=generator).item()
        return image + std * torch.randn(image.shape, generator=generator)
    if defect == "colour_shift":
        direction = torch.randn(3, generator=generator)
        direction = direction / direction.norm()
        return image + (0.22 + 0.08 * torch.rand(1, generator=generator).item()) * direction[:, None, None]
    if defect == "low_contrast":
        mean = image.mean(dim=(1, 2), keepdim=True)
        return mean + (image - mean) * (0.3 + 0.1 * torch.rand(1, generator=generator).item())
    if defect == "blockiness":
        block = max(size // 8, 2)
        small = F.avg_pool2d(image[None], block)
        return F.interpolate(small, scale_factor=block, mode="nearest")[0]
    raise PrefalignError(f"unknown defect {defect!r}; choose one of {list(DEFECTS)}")


# ---------------------------------------------------------------------------------------------
# Styles
# ---------------------------------------------------------------------------------------------


def _luminance(image: torch.Tensor) -> torch.Tensor:
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


def _apply_style(image: torch.Tensor, alpha: torch.Tensor, style: str, generator: torch.Generator) -> torch.Tensor:
    """Style transform of one clean render [3,S,S] given its coverage [1,S,S]."""
    size = image.shape[-1]
    if style == "sketch":
        # Greyscale pencil outline on paper: light fill, dark edge of ~1 px.
        eroded = -F.max_pool2d(-alpha[None], 3, 1, 1)[0]
        outline = (alpha - eroded).clamp(0, 1)
        fill = 0.55 + 0.35 * _luminance(image)
        grey = 0.95 * (1 - alpha) + fill * alpha
        grey = grey * (1 - outline) + 0.12 * outline
        return grey.expand(3, -1, -1).clone()
    if style == "winter":
        tint = torch.tensor([0.80, 0.90, 1.10])[:, None, None]
        cool = image * tint + torch.tensor([0.02, 0.06, 0.12])[:, None, None]
        snow = (torch.rand((1, size, size), generator=generator) < 0.07).float()
        return cool * (1 - snow) + 0.97 * snow
    if style == "starry":
        y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        phase = 2 * math.pi * torch.rand(1, generator=generator).item()
        swirl = 0.5 + 0.5 * torch.sin(9 * torch.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2) * 2 + 3 * torch.atan2(y - 0.5, x - 0.5) + phase)
        sky = torch.tensor([0.05, 0.07, 0.22])[:, None, None] + 0.12 * swirl[None] * torch.tensor([0.3, 0.5, 1.0])[:, None, None]
        stars = (torch.rand((1, size, size), generator=generator) < 0.05).float()
        sky = sky * (1 - stars) + torch.tensor([1.0, 0.95, 0.6])[:, None, None] * stars
        return sky * (1 - alpha) + image * alpha
    raise PrefalignError(f"unknown style {style!r}")


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


@dataclass
class RenderResult:
    images: torch.Tensor  # [B, 3, S, S] in [0, 1]
    coverage: torch.Tensor  # [B, 1, S, S]: α of the (possibly displaced) shape
    geometry: Geometry


def render(
    scenes: Sequence[Scene],
    seed: int = 0,
    size: int = 32,
    defects: Sequence[str | None] | None = None,
    jitter: bool = True,
    generator: torch.Generator | None = None,
    rotations: Sequence[float] | None = None,
    supersample: int = SUPERSAMPLE,
) -> RenderResult:
    """Render ``scenes`` (optionally each with one defect) as [B, 3, size, size] images in [0, 1].

    Styles come from each scene's ``style``. ``defects[i]`` is None for a clean render or one of
    :data:`DEFECTS`. Deterministic in ``seed`` (or in the state of ``generator`` if given).
    ``rotations`` (radians, one per scene) overrides the drawn rotation, and ``supersample`` sets the
    anti-aliasing factor (the annotator renders its references with both).
    """
    if size < 8:
        raise PrefalignError(f"image size {size} is too small; use at least 8 pixels")
    if defects is None:
        defects = [None] * len(scenes)
    if len(defects) != len(scenes):
        raise PrefalignError(f"got {len(defects)} defects for {len(scenes)} scenes")
    for defect in defects:
        if defect is not None and defect not in DEFECTS:
            raise PrefalignError(f"unknown defect {defect!r}; choose one of {list(DEFECTS)}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    geometry = scene_geometry(scenes, generator, jitter)
    if rotations is not None:
        geometry.rotation = torch.as_tensor(list(rotations), dtype=torch.float32)
    for row, defect in enumerate(defects):
        if defect in GEOMETRIC_DEFECTS:
            _apply_geometric_defect(geometry, row, defect, generator)
    alpha = coverage(geometry, size, supersample)

    colour = torch.tensor([COLOURS[s.colour] for s in scenes])[:, :, None, None]
    background = torch.tensor([BACKGROUNDS[s.background] for s in scenes])[:, :, None, None]
    if jitter:
        colour = colour + 0.04 * (2 * torch.rand(colour.shape, generator=generator) - 1)
        background = background + 0.03 * (2 * torch.rand(background.shape, generator=generator) - 1)
    images = background * (1 - alpha) + colour * alpha

    out = []
    for row, scene in enumerate(scenes):
        image = images[row]
        if scene.style is not None:
            image = _apply_style(image, alpha[row], scene.style, generator)
        defect = defects[row]
        if defect is not None and defect not in GEOMETRIC_DEFECTS:
            image = _apply_image_defect(image, defect, generator)
        out.append(image)
    return RenderResult(torch.stack(out).clamp(0, 1), alpha, geometry)


def render_images(scenes: Sequence[Scene], seed: int = 0, size: int = 32, defects: Sequence[str | None] | None = None) -> torch.Tensor:
    """Just the images of :func:`render`."""
    return render(scenes, seed=seed, size=size, defects=defects).images


def template_coverage(shape_index: torch.Tensor, centre_x: torch.Tensor, centre_y: torch.Tensor, radius: torch.Tensor, rotation: torch.Tensor, size: int) -> torch.Tensor:
    """Coverage of un-jittered shapes at the given geometry ([B] tensors) — used by the annotator to
    compare an image's foreground with what the prompt asks for."""
    return coverage(Geometry(centre_x, centre_y, radius, rotation, shape_index), size, supersample=2)
