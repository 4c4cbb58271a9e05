"""The simulated human annotator of the shapes world.

It is a plain scorer, ``score(images, prompts) -> Tensor[B]`` in [0, 1], built from interpretable
pixel features. Each feature compares a *measurement* of the image with the same measurement of a
noiseless reference render of the prompt (no jitter, no defect, the prompt's style), so one
procedure serves every colour, background and style:

    measure(image): background = median of the border pixels; foreground mask = pixels far from
    it (after a 3×3 median filter, which removes isolated dots: stars, snow, pixel noise);
    foreground colour, centroid, area, edge sharpness, background spread, blockiness, style
    statistics.

Features (each in [0, 1], 1 = as the prompt asks):
- ``colour_fidelity``: foreground (and background) colour vs the reference's;
- ``shape_fidelity``: soft IoU of the foreground mask with the reference's, after centring both and
  scaling the image's to the reference's area (so size errors do not count twice);
- ``sharpness``: strongest edge gradient per unit of fg/bg contrast, relative to the reference;
- ``clean_background``: background pixel spread above the reference's (noise, artefacts);
- ``position``: centroid distance; ``size``: log area ratio; ``in_frame``: foreground on the image
  border (a cut object);
- ``no_blockiness``: share of gradient energy on the 8×8 block grid (compression-like blocks);
- ``style_adherence``: style statistics (greyscale, cool tint, speckle, dark sky) vs the reference.

``score`` is the persona's weighted mean of the features. Pairwise labels are Bradley–Terry draws
with a temperature, plus ties at a configured rate; pointwise labels are 1–7 ratings with rater
noise. Attribute checks (colour / shape / size / position / background / style correct) are the
metrics of prompt fidelity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from prefalign.errors import PrefalignError
from prefalign.worlds.shapes.prompts import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, STYLES, Scene, parse_prompt
from prefalign.worlds.shapes.render import render

FEATURES: tuple[str, ...] = (
    "colour_fidelity",
    "shape_fidelity",
    "sharpness",
    "clean_background",
    "position",
    "size",
    "in_frame",
    "no_blockiness",
    "style_adherence",
)

PERSONAS: dict[str, dict[str, float]] = {
    # Cares about everything; prompt fidelity a little more than image quality.
    "balanced": {
        "colour_fidelity": 2.0, "shape_fidelity": 2.0, "sharpness": 1.0, "clean_background": 1.0,
        "position": 1.0, "size": 1.0, "in_frame": 1.0, "no_blockiness": 1.0, "style_adherence": 1.0,
    },
    # Wants exactly what the prompt says; tolerant of image quality.
    "literal": {
        "colour_fidelity": 3.0, "shape_fidelity": 3.0, "sharpness": 0.3, "clean_background": 0.3,
        "position": 2.0, "size": 2.0, "in_frame": 1.0, "no_blockiness": 0.3, "style_adherence": 2.0,
    },
    # Wants a clean, crisp picture; tolerant of small prompt deviations.
    "aesthete": {
        "colour_fidelity": 1.0, "shape_fidelity": 1.0, "sharpness": 3.0, "clean_background": 3.0,
        "position": 0.5, "size": 0.5, "in_frame": 1.5, "no_blockiness": 3.0, "style_adherence": 1.0,
    },
}


@dataclass
class Measurements:
    """Per-image measurements, all tensors with leading dim B."""

    background: torch.Tensor  # [B, 3]
    foreground_colour: torch.Tensor  # [B, 3]
    mask: torch.Tensor  # [B, S, S] soft foreground (median-filtered)
    shape_mask: torch.Tensor  # [B, S, S] unfiltered foreground near the object, for shape matching
    mass: torch.Tensor  # [B] foreground pixels (soft count)
    centroid: torch.Tensor  # [B, 2] (x, y) as fractions of the side
    area: torch.Tensor  # [B] fraction of the image
    edge_sharpness: torch.Tensor  # [B]
    background_spread: torch.Tensor  # [B]
    block_energy_share: torch.Tensor  # [B]
    border_share: torch.Tensor  # [B]
    style_stats: torch.Tensor  # [B, 5]

    def __getitem__(self, index) -> Measurements:
        return Measurements(**{k: getattr(self, k)[index] for k in self.__dataclass_fields__})

    @staticmethod
    def cat(items: Sequence[Measurements]) -> Measurements:
        return Measurements(**{k: torch.cat([getattr(m, k) for m in items]) for k in Measurements.__dataclass_fields__})


def _luminance(images: torch.Tensor) -> torch.Tensor:
    return 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]


def _box3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)


def _median3(x: torch.Tensor) -> torch.Tensor:
    """3×3 median filter [B, C, H, W] → same: removes isolated dots (stars, snow, noise) and keeps
    edges."""
    b, c, h, w = x.shape
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3)  # [B, C*9, H*W]
    patches = patches.view(b, c, 9, h * w).transpose(2, 3).contiguous()  # median over the last dim is fast
    return patches.median(dim=-1).values.view(b, c, h, w)


def _channel_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over dim 1 ([B, C, …] → [B, …]); much faster on CPU than ``norm(dim=1)``."""
    return x.pow(2).sum(1).sqrt()


def measure(images: torch.Tensor) -> Measurements:
    """Measure a batch of images [B, 3, S, S] in [0, 1] (see module docstring)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise PrefalignError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    x = images.float().clamp(0, 1)
    b, _, s, _ = x.shape
    smooth = _median3(x)
    border = torch.cat([smooth[:, :, 0, :], smooth[:, :, -1, :], smooth[:, :, 1:-1, 0], smooth[:, :, 1:-1, -1]], dim=2)
    background = border.median(dim=2).values  # [B, 3]

    distance = _channel_norm(smooth - background[:, :, None, None])  # [B, S, S]
    mask = ((distance - 0.06) / 0.14).clamp(0, 1)  # [B, S, S]
    # The shape is compared on the unfiltered mask (the median filter rounds thin corners), kept
    # only where the filtered mask says "object nearby" so isolated dots do not count.
    raw_distance = _channel_norm(x - background[:, :, None, None])
    near = F.max_pool2d(mask[:, None], 3, 1, 1)[:, 0]
    shape_mask = ((raw_distance - 0.06) / 0.14).clamp(0, 1) * near
    mass = mask.sum((1, 2))
    safe_mass = mass.clamp(min=1e-3)

    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    cx = (mask * coords[None, None, :]).sum((1, 2)) / safe_mass
    cy = (mask * coords[None, :, None]).sum((1, 2)) / safe_mass
    interior = mask**2
    foreground_colour = (smooth * interior[:, None]).sum((2, 3)) / interior.sum((1, 2)).clamp(min=1e-3)[:, None]

    # Edge sharpness: mean of the strongest gradients, per unit of fg/bg contrast.
    gx = _channel_norm(x[:, :, :, 1:] - x[:, :, :, :-1])  # [B, S, S-1]
    gy = _channel_norm(x[:, :, 1:, :] - x[:, :, :-1, :])  # [B, S-1, S]
    gradients = torch.cat([gx.flatten(1), gy.flatten(1)], 1)
    top = gradients.topk(8, dim=1).values.mean(1)
    contrast = (foreground_colour - background).norm(dim=1)
    edge_sharpness = top / (contrast + 0.05)

    # Background spread, away from the object.
    near_object = F.max_pool2d(mask[:, None], 5, 1, 2)[:, 0]
    weight = (1 - near_object).clamp(0, 1)
    residual = ((x - background[:, :, None, None]) ** 2).sum(1)
    background_spread = torch.sqrt((residual * weight).sum((1, 2)) / weight.sum((1, 2)).clamp(min=1.0))

    # Blockiness: share of |gradient| on the block grid (block = S // 8).
    block = max(s // 8, 2)
    on_grid = (torch.arange(s - 1) + 1) % block == 0
    energy_x = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().sum((1, 2))  # [B, S-1]
    energy_y = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().sum((1, 3))  # [B, S-1]
    energy = energy_x + energy_y
    block_energy_share = energy[:, on_grid].sum(1) / energy.sum(1).clamp(min=1e-6)

    ring = torch.zeros(s, s, dtype=torch.bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    border_share = (mask * ring).sum((1, 2)) / safe_mass

    # Style statistics: colourfulness, cool tint of the background, bright speckle density,
    # background luminance, background spread.
    spread = (x.max(1).values - x.min(1).values).mean((1, 2))
    tint = background[:, 2] - background[:, 0]
    lum = _luminance(x)
    speckle = ((lum[:, None] - _box3(lum[:, None]))[:, 0] > 0.06).float().mean((1, 2))
    style_stats = torch.stack([spread, tint, speckle, _luminance(background[:, :, None, None])[:, 0, 0], background_spread], 1)

    return Measurements(
        background=background,
        foreground_colour=foreground_colour,
        mask=mask,
        shape_mask=shape_mask,
        mass=mass,
        centroid=torch.stack([cx, cy], 1),
        area=mass / (s * s),
        edge_sharpness=edge_sharpness,
        background_spread=background_spread,
        block_energy_share=block_energy_share,
        border_share=border_share,
        style_stats=style_stats,
    )


def centred_masks(m: Measurements, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Foreground masks resampled so the centroid is at the centre (and, with ``scale`` [B], the
    mask shrunk by that factor): [B, S, S]."""
    b = m.mask.shape[0]
    scale = torch.ones(b) if scale is None else scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = m.centroid * 2 - 1
    grid = F.affine_grid(theta, (b, 1, *m.mask.shape[1:]), align_corners=False)
    return F.grid_sample(m.shape_mask[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0]


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.minimum(a, b).sum((-2, -1)) / torch.maximum(a, b).sum((-2, -1)).clamp(min=1e-6)


# Scales of the style statistics (how far apart two styles are on each).
_STYLE_SCALES = torch.tensor([0.08, 0.06, 0.02, 0.15, 0.06])


# Rotations of the shape references: renders are jittered by up to ±12°, so the shape check takes
# the best match over a few rotations.
_REFERENCE_ROTATIONS = (-math.radians(10), 0.0, math.radians(10))
# Two options of an attribute whose references differ by less than this are indistinguishable under
# the prompt's style (e.g. backgrounds under "starry", similar luminances under "sketch").
_INDISTINGUISHABLE = 0.06


@dataclass
class Reference:
    """Measurements of the noiseless renders the annotator compares an image against."""

    own: Measurements  # [1] the prompt itself
    centred_mask: torch.Tensor  # [1, S, S]
    shapes: torch.Tensor  # [len(SHAPES), len(_REFERENCE_ROTATIONS), S, S] centred masks
    colours: torch.Tensor  # [len(COLOURS), 3] foreground colours of every colour
    backgrounds: torch.Tensor  # [len(BACKGROUNDS), 3]
    styles: torch.Tensor  # [1 + len(STYLES), 5] style stats: unstyled, then each style


def _reference_renders(scene: Scene) -> tuple[list[Scene], list[float]]:
    """The scenes (and rotations) rendered to build one :class:`Reference`, in a fixed order."""
    shape_scenes = [replace(scene, shape=s) for s in SHAPES for _ in _REFERENCE_ROTATIONS]
    rotations = [0.0] + [r for _ in SHAPES for r in _REFERENCE_ROTATIONS]
    others = (
        [replace(scene, colour=c) for c in COLOURS]
        + [replace(scene, background=b) for b in BACKGROUNDS]
        + [scene.with_style(None)]
        + [scene.with_style(st) for st in STYLES]
    )
    scenes = [scene, *shape_scenes, *others]
    return scenes, rotations + [0.0] * len(others)


def _reference_from(m: Measurements) -> Reference:
    n_shape = len(SHAPES) * len(_REFERENCE_ROTATIONS)
    n_c, n_b = len(COLOURS), len(BACKGROUNDS)
    own = m[0:1]
    shapes = m[1 : 1 + n_shape]
    offset = 1 + n_shape
    return Reference(
        own=own,
        centred_mask=centred_masks(own),
        shapes=centred_masks(shapes).view(len(SHAPES), len(_REFERENCE_ROTATIONS), *own.mask.shape[1:]),
        colours=m.foreground_colour[offset : offset + n_c],
        backgrounds=m.background[offset + n_c : offset + n_c + n_b],
        styles=m.style_stats[offset + n_c + n_b :],
    )


def _prompted_is_nearest(distances: torch.Tensor, prompted: int, options: torch.Tensor) -> bool:
    """True if the prompted option is the nearest one, or indistinguishable from the nearest."""
    nearest = int(distances.argmin())
    return nearest == prompted or float((options[nearest] - options[prompted]).norm()) < _INDISTINGUISHABLE


# Reference measurements depend only on (prompt, image size), not on the persona: one cache for all.
_REFERENCE_CACHE: dict[tuple[str, int], Reference] = {}


class Annotator:
    """A simulated human rater (see module docstring).

    Args:
        persona: a name from :data:`PERSONAS` or a dict of feature weights.
        temperature: Bradley–Terry temperature of pairwise labels (on the [0, 1] score scale).
        tie_rate: probability that a pairwise comparison is declared a tie.
        rater_noise: std of the noise added to the [0, 1] score before rating 1–7.
    """

    def __init__(self, persona: str | dict[str, float] = "balanced", temperature: float = 0.03, tie_rate: float = 0.1, rater_noise: float = 0.05):
        if isinstance(persona, str):
            if persona not in PERSONAS:
                raise PrefalignError(f"unknown annotator persona {persona!r}; choose one of {sorted(PERSONAS)}")
            weights = PERSONAS[persona]
            self.persona = persona
        else:
            unknown = set(persona) - set(FEATURES)
            if unknown:
                raise PrefalignError(f"unknown annotator features {sorted(unknown)}; known: {list(FEATURES)}")
            weights = {k: float(persona.get(k, 0.0)) for k in FEATURES}
            self.persona = "custom"
        if not 0 <= tie_rate < 1:
            raise PrefalignError(f"tie_rate must be in [0, 1), got {tie_rate}")
        if temperature <= 0:
            raise PrefalignError(f"temperature must be positive, got {temperature}")
        self.weights = torch.tensor([weights[k] for k in FEATURES])
        self.temperature = temperature
        self.tie_rate = tie_rate
        self.rater_noise = rater_noise
        self._references = _REFERENCE_CACHE

    # ---- references ---------------------------------------------------------------------------
    def _references_for(self, prompts: Sequence[str], size: int) -> tuple[list[Scene], list[Reference]]:
        """Parse the prompts and return their references, rendering the missing ones in batches."""
        scenes = []
        for prompt in prompts:
            try:
                scenes.append(parse_prompt(prompt))
            except PrefalignError as error:
                raise PrefalignError(f"the shapes annotator can only rate shapes-world prompts: {error}") from None
        missing = list(dict.fromkeys(s for s in scenes if (s.prompt, size) not in self._references))
        if len(self._references) + len(missing) > 50_000:
            self._references.clear()
            missing = list(dict.fromkeys(scenes))
        chunk = 32
        for start in range(0, len(missing), chunk):
            group = missing[start : start + chunk]
            renders = [_reference_renders(scene) for scene in group]
            all_scenes = [s for scs, _ in renders for s in scs]
            all_rotations = [r for _, rots in renders for r in rots]
            m = measure(render(all_scenes, seed=0, size=size, jitter=False, rotations=all_rotations, supersample=2).images)
            per = len(renders[0][0])
            for i, scene in enumerate(group):
                self._references[(scene.prompt, size)] = _reference_from(m[i * per : (i + 1) * per])
        return scenes, [self._references[(s.prompt, size)] for s in scenes]

    # ---- features -----------------------------------------------------------------------------
    def features(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every feature of :data:`FEATURES` as a tensor [B] in [0, 1]."""
        if len(prompts) != images.shape[0]:
            raise PrefalignError(f"got {images.shape[0]} images for {len(prompts)} prompts")
        m = measure(images)
        scenes, refs = self._references_for(prompts, images.shape[-1])
        r = Measurements.cat([ref.own for ref in refs])
        has_object = (m.mass > 1.0).float()

        colour = 0.75 * torch.exp(-((m.foreground_colour - r.foreground_colour).norm(dim=1) ** 2) / (2 * 0.15**2))
        colour = colour * has_object + 0.25 * torch.exp(-((m.background - r.background).norm(dim=1) ** 2) / (2 * 0.15**2))
        scale = torch.sqrt(m.area / r.area.clamp(min=1e-6)).clamp(0.2, 5.0)
        prompted_shapes = torch.stack([ref.shapes[SHAPES.index(sc.shape)] for sc, ref in zip(scenes, refs)])  # [B, R, S, S]
        shape = soft_iou(centred_masks(m, scale)[:, None], prompted_shapes).max(1).values * has_object
        sharpness = (m.edge_sharpness / r.edge_sharpness.clamp(min=1e-6)).clamp(0, 1)
        clean_background = torch.exp(-(m.background_spread - r.background_spread).clamp(min=0) / 0.04)
        position = torch.exp(-(((m.centroid - r.centroid).norm(dim=1) / 0.07) ** 2)) * has_object
        size = torch.exp(-((torch.log(m.area.clamp(min=1e-6) / r.area.clamp(min=1e-6)) / 0.4) ** 2)) * has_object
        in_frame = (1 - (m.border_share - r.border_share).clamp(min=0) * 8).clamp(0, 1)
        no_blockiness = (1 - (m.block_energy_share - r.block_energy_share.clamp(min=0.3)).clamp(min=0) / 0.3).clamp(0, 1)
        style_distance = ((m.style_stats - r.style_stats) / _STYLE_SCALES).pow(2).sum(1)
        style_adherence = torch.exp(-style_distance / 8)
        values = (colour, shape, sharpness, clean_background, position, size, in_frame, no_blockiness, style_adherence)
        return dict(zip(FEATURES, values))

    def score(self, images: torch.Tensor, prompts: Sequence[str], **_: object) -> torch.Tensor:
        """Noiseless annotator score [B] in [0, 1]: the persona's weighted mean of the features."""
        feats = self.features(images, prompts)
        stacked = torch.stack([feats[k] for k in FEATURES], 1)
        return (stacked * self.weights).sum(1) / self.weights.sum()

    __call__ = score

    # ---- attribute checks ---------------------------------------------------------------------
    def attribute_checks(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Booleans [B]: is the colour / shape / size / position / background / style the prompt's?"""
        m = measure(images)
        scenes, refs = self._references_for(prompts, images.shape[-1])
        r = Measurements.cat([ref.own for ref in refs])
        scale = torch.sqrt(m.area / r.area.clamp(min=1e-6)).clamp(0.2, 5.0)
        centred = centred_masks(m, scale)
        has_object = m.mass > 1.0
        colour_ok, shape_ok, size_ok, position_ok, background_ok, style_ok = ([] for _ in range(6))
        position_names, position_xy = list(POSITIONS), torch.tensor(list(POSITIONS.values()))
        size_names, size_values = list(SIZES), torch.tensor(list(SIZES.values()))
        for i, (scene, ref) in enumerate(zip(scenes, refs)):
            shape_ok.append(SHAPES[int(soft_iou(centred[i], ref.shapes).max(1).values.argmax())] == scene.shape)
            colour_ok.append(
                _prompted_is_nearest((ref.colours - m.foreground_colour[i]).norm(dim=1), list(COLOURS).index(scene.colour), ref.colours)
            )
            background_ok.append(
                _prompted_is_nearest((ref.backgrounds - m.background[i]).norm(dim=1), list(BACKGROUNDS).index(scene.background), ref.backgrounds)
            )
            position_ok.append(position_names[int((position_xy - m.centroid[i]).norm(dim=1).argmin())] == scene.position)
            implied = SIZES[scene.size] * float(scale[i])
            size_ok.append(size_names[int((size_values - implied).abs().argmin())] == scene.size)
            styles = [None, *STYLES]
            nearest = styles[int(((ref.styles - m.style_stats[i]) / _STYLE_SCALES).pow(2).sum(1).argmin())]
            style_ok.append(nearest == scene.style)
        as_tensor = lambda values: torch.tensor(values) & has_object  # noqa: E731
        return {
            "colour": as_tensor(colour_ok),
            "shape": as_tensor(shape_ok),
            "size": as_tensor(size_ok),
            "position": as_tensor(position_ok),
            "background": torch.tensor(background_ok),
            "style": torch.tensor(style_ok),
        }

    def classify_style(self, images: torch.Tensor, prompts: Sequence[str]) -> list[str | None]:
        """The nearest style (None = plain) of each image, judged against renders of its prompt's
        content in every style — RPO's style-alignment metric."""
        m = measure(images)
        _, refs = self._references_for(prompts, images.shape[-1])
        styles = [None, *STYLES]
        return [styles[int(((ref.styles - m.style_stats[i]) / _STYLE_SCALES).pow(2).sum(1).argmin())] for i, ref in enumerate(refs)]

    # ---- labels -------------------------------------------------------------------------------
    def preference_probability(self, scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
        """Bradley–Terry P(a ≻ b | no tie) = σ((s_a − s_b) / temperature)."""
        return torch.sigmoid((scores_a - scores_b) / self.temperature)

    def label_pairs(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str], seed: int = 0) -> torch.Tensor:
        """Pairwise labels [B] as label_0 of the Pick-a-Pic schema: 1.0 (a preferred), 0.0 (b
        preferred) or 0.5 (tie). Deterministic in ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        p = self.preference_probability(self.score(images_a, prompts), self.score(images_b, prompts))
        wins = (torch.rand(p.shape, generator=generator) < p).float()
        ties = torch.rand(p.shape, generator=generator) < self.tie_rate
        return torch.where(ties, torch.full_like(wins, 0.5), wins)

    def rate(self, images: torch.Tensor, prompts: Sequence[str], seed: int = 0) -> torch.Tensor:
        """Pointwise ratings [B] on the 1–7 scale (integers as floats) with rater noise."""
        generator = torch.Generator().manual_seed(seed)
        noisy = self.score(images, prompts) + self.rater_noise * torch.randn(len(prompts), generator=generator)
        return (1 + 6 * noisy.clamp(0, 1)).round()


def annotator_scorer(persona: str = "balanced") -> Annotator:
    return Annotator(persona)


__all__ = ["Annotator", "FEATURES", "PERSONAS", "Measurements", "measure", "annotator_scorer"]
