"""``prefalign demo``: the shapes world end to end (grows with the library)."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("out/demo"), help="output folder"),
    n: int = typer.Option(4, help="samples per prompt"),
    steps: int = typer.Option(50, help="sampling steps"),
    quick: bool = typer.Option(False, help="fewer prompts and steps, for smoke checks"),
) -> None:
    """Show the world (renders, defects, styles, masks, annotator scores), then sample held-in and
    held-out prompts with the shipped model and score them with the annotator."""
    from prefalign.backbones.loading import load_backbone
    from prefalign.commands.world import world_grid
    from prefalign.images import labelled_grid
    from prefalign.sampling import generate
    from prefalign.worlds.shapes.annotator import Annotator
    from prefalign.worlds.shapes.prompts import sample_prompts

    out.mkdir(parents=True, exist_ok=True)
    images, labels, columns = world_grid()
    labelled_grid(images, labels, columns, upscale=3, title="the shapes world").save(out / "world.png")
    typer.echo(f"1/2 world: {out / 'world.png'}")

    backbone = load_backbone("shapes-t2i")
    annotator = Annotator()
    count = 3 if quick else 6
    steps = min(steps, 20) if quick else steps
    for split in ("train", "held_out"):
        prompts = sample_prompts(count, seed=1, split=split)
        expanded = [p for p in prompts for _ in range(n)]
        samples = generate(backbone, expanded, seed=0, steps=steps, guidance_scale=3.0, progress=True)
        scores = annotator.score(samples, expanded)
        checks = annotator.attribute_checks(samples, expanded)
        captions = [f"{p}\nscore {float(s):.2f}" if i % n == 0 else f"score {float(s):.2f}" for i, (p, s) in enumerate(zip(expanded, scores))]
        labelled_grid(samples, captions, columns=n, upscale=3, title=f"shapes-t2i samples ({split} prompts, {steps} DDIM steps, CFG 3)").save(out / f"samples_{split}.png")
        accuracy = ", ".join(f"{k} {float(v.float().mean()):.0%}" for k, v in checks.items())
        typer.echo(f"2/2 {split}: mean annotator score {float(scores.mean()):.3f}; {accuracy}; {out / f'samples_{split}.png'}")
