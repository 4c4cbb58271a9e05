"""``prefalign world …``: look at the built-in shapes world."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from prefalign.worlds.shapes.annotator import Annotator
from prefalign.worlds.shapes.masks import MASK_KINDS, make_masks
from prefalign.worlds.shapes.prompts import STYLES, Scene
from prefalign.worlds.shapes.render import DEFECTS, render

app = typer.Typer(help="The built-in shapes world: prompts, renders, defects, styles, masks, annotator.", no_args_is_help=True)

SHOWCASE = [
    Scene("red", "triangle", "medium", "top left", "beige"),
    Scene("blue", "star", "large", "center", "white"),
    Scene("green", "cross", "small", "bottom right", "black"),
    Scene("yellow", "diamond", "medium", "top right", "gray"),
]


def world_grid(size: int = 32, seed: int = 0, persona: str = "balanced"):
    """Rows: the showcase scenes; columns: clean, each defect, each style, each mask kind — each
    labelled with its annotator score."""
    annotator = Annotator(persona)
    images, labels = [], []
    for row, scene in enumerate(SHOWCASE):
        variants: list[tuple[str, torch.Tensor, str]] = []
        clean = render([scene], seed=seed + row, size=size).images
        variants.append(("clean", clean, scene.prompt))
        for defect in DEFECTS:
            variants.append((defect, render([scene], seed=seed + row, size=size, defects=[defect]).images, scene.prompt))
        for style in STYLES:
            styled = scene.with_style(style)
            variants.append((style, render([styled], seed=seed + row, size=size).images, styled.prompt))
        for kind in MASK_KINDS:
            mask = make_masks(kind, clean, seed=seed + row)
            shown = clean * (1 - mask) + mask * torch.tensor([0.5, 0.5, 0.5])[:, None, None]
            variants.append((f"mask: {kind}", shown, ""))
        for name, image, prompt in variants:
            images.append(image[0])
            if prompt:
                score = float(annotator.score(image, [prompt])[0])
                labels.append(f"{name}\nscore {score:.2f}")
            else:
                labels.append(name)
    return torch.stack(images), labels, len(images) // len(SHOWCASE)


@app.command("show")
def show(
    out: Path = typer.Option(Path("world.png"), help="PNG file to write"),
    size: int = typer.Option(32, help="image side in pixels"),
    seed: int = typer.Option(0, help="render seed"),
    persona: str = typer.Option("balanced", help="annotator persona whose scores label the images"),
) -> None:
    """Write a labelled grid: clean renders, each quality defect, each style and each inpainting
    mask kind, with the annotator's score under every image."""
    from prefalign.images import labelled_grid

    images, labels, columns = world_grid(size, seed, persona)
    grid = labelled_grid(images, labels, columns, upscale=3, title="prefalign shapes world: clean | defects | styles | inpainting masks (annotator scores)")
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    typer.echo(f"wrote {out}")
