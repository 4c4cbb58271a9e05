"""The prompt grammar of the shapes world.

A scene is one coloured shape on a plain background, described by a prompt such as
``"a small red triangle in the top left on a beige background"``, optionally followed by a style
suffix (``", sketch style"``). Attributes: colour (8), shape (6), size (3), position (5),
background (4). A fixed set of (colour, shape) combinations never appears in pretraining data, so
generalisation to unseen combinations can be measured ("held-out" prompts).
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, replace

from prefalign.errors import PrefalignError

# RGB in [0, 1]. Chosen to be far apart from each other and from every background.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (0.98, 0.55, 0.05),
    "yellow": (0.95, 0.88, 0.10),
    "green": (0.10, 0.70, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.75),
    "pink": (0.98, 0.50, 0.75),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
# Size = circumradius of the shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.15, "medium": 0.22, "large": 0.29}
# Centre as (x, y) fractions of the image side; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.32, 0.32),
    "top right": (0.68, 0.32),
    "bottom left": (0.32, 0.68),
    "bottom right": (0.68, 0.68),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "beige": (0.90, 0.85, 0.72),
    "gray": (0.50, 0.50, 0.50),
    "white": (0.97, 0.97, 0.97),
    "black": (0.06, 0.06, 0.06),
}
STYLES: tuple[str, ...] = ("sketch", "winter", "starry")

# (colour, shape) pairs never shown in pretraining: every colour and every shape is seen, but not
# these combinations.
HELD_OUT_COMBINATIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("orange", "cross"),
        ("yellow", "triangle"),
        ("green", "diamond"),
        ("cyan", "circle"),
        ("blue", "square"),
        ("purple", "triangle"),
        ("pink", "circle"),
    }
)

_PROMPT_RE = re.compile(
    r"^an? (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?:in the|at the) (?P<position>[\w ]+?) "
    r"on an? (?P<background>\w+) background(?:, (?P<style>\w+) style)?$"
)


@dataclass(frozen=True)
class Scene:
    """The attributes a prompt describes."""

    colour: str
    shape: str
    size: str
    position: str
    background: str
    style: str | None = None

    @property
    def prompt(self) -> str:
        where = "at the center" if self.position == "center" else f"in the {self.position}"
        text = f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"
        return f"{text}, {self.style} style" if self.style else text

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_COMBINATIONS

    def with_style(self, style: str | None) -> Scene:
        return replace(self, style=style)


def parse_prompt(prompt: str) -> Scene:
    """Parse a prompt of the grammar back into a :class:`Scene` (PrefalignError if it is not one)."""
    match = _PROMPT_RE.match(prompt.strip().lower())
    if match is None:
        raise PrefalignError(
            f"not a shapes-world prompt: {prompt!r}; expected e.g. "
            "'a small red triangle in the top left on a beige background'"
        )
    scene = Scene(**{k: v for k, v in match.groupdict().items()})
    _check(scene)
    return scene


def try_parse_prompt(prompt: str) -> Scene | None:
    try:
        return parse_prompt(prompt)
    except PrefalignError:
        return None


def _check(scene: Scene) -> None:
    for value, allowed, name in (
        (scene.colour, COLOURS, "colour"),
        (scene.shape, SHAPES, "shape"),
        (scene.size, SIZES, "size"),
        (scene.position, POSITIONS, "position"),
        (scene.background, BACKGROUNDS, "background"),
    ):
        if value not in allowed:
            raise PrefalignError(f"unknown {name} {value!r}; choose one of {sorted(allowed)}")
    if scene.style is not None and scene.style not in STYLES:
        raise PrefalignError(f"unknown style {scene.style!r}; choose one of {list(STYLES)}")


def all_scenes(split: str = "all") -> list[Scene]:
    """Every unstyled scene, in a fixed order. ``split``: "all", "train" (held-in) or "held_out"."""
    if split not in ("all", "train", "held_out"):
        raise PrefalignError(f"unknown split {split!r}; use all, train or held_out")
    scenes = [
        Scene(c, s, z, p, b)
        for c, s, z, p, b in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS, BACKGROUNDS)
    ]
    if split == "train":
        return [s for s in scenes if not s.held_out]
    if split == "held_out":
        return [s for s in scenes if s.held_out]
    return scenes


def sample_scenes(
    n: int, seed: int, split: str = "train", style_probability: float = 0.0
) -> list[Scene]:
    """``n`` scenes drawn uniformly (with replacement) from ``split``; a style is added with
    probability ``style_probability``. Deterministic in ``seed``."""
    rng = random.Random(seed)
    pool = all_scenes(split)
    out = []
    for _ in range(n):
        scene = rng.choice(pool)
        if rng.random() < style_probability:
            scene = scene.with_style(rng.choice(STYLES))
        out.append(scene)
    return out


def sample_prompts(n: int, seed: int, split: str = "train", style_probability: float = 0.0) -> list[str]:
    return [s.prompt for s in sample_scenes(n, seed, split, style_probability)]
